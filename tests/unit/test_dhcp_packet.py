"""The DHCP codec: real client captures, every reject reason, RFC 3396 and overload, properties."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoon_net.dhcp.model import ZERO_IP, DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.packet import (
    MAX_MESSAGE_SIZE,
    MalformedPacket,
    MessageTooLarge,
    decode,
    encode,
)

# DHCPDISCOVER frames captured on this kind of machine: the client ran in one network namespace
# on a veth whose MAC was set to 02:00:00:aa:bb:01, an AF_PACKET socket in the peer namespace
# read the frame (`udhcpc -f -q -n -i eth0 -s /bin/true`, busybox 1.35.0; and
# `dhclient -d -1 -sf /bin/true eth0`, ISC 4.4.3). Whole Ethernet frames; the DHCP message
# starts at octet 42 (14 Ethernet + 20 IPv4 + 8 UDP).
UDHCPC_DISCOVER_FRAME = bytes.fromhex(
    "ffffffffffff020000aabb0108004500014800000000401179a600000000ffffffff0044004301341255"
    "010106004cae706a0000000000000000000000000000000000000000020000aabb01" + "00" * 202 + "63825363"
    "3501013902024037070103060c0f1c2a3c0c756468637020312e33352e303d0701020000aabb01ff" + "00" * 20
)
DHCLIENT_DISCOVER_FRAME = bytes.fromhex(
    "ffffffffffff020000aabb01080045100148000000008011399600000000ffffffff0044004301343"
    "8c50101060022d39a170008000000000000000000000000000000000000020000aabb01"
    + "00"
    * 202
    + "63825363"
    "3501010c02766d370d011c02030f06770c2c2f1a792aff" + "00" * 37
)
UDHCPC_DISCOVER = UDHCPC_DISCOVER_FRAME[42:]
DHCLIENT_DISCOVER = DHCLIENT_DISCOVER_FRAME[42:]

MAC = bytes.fromhex("020000aabb01")


def request(**options: bytes) -> DhcpMessage:
    return DhcpMessage(
        op=Op.BOOTREQUEST,
        xid=0x1234ABCD,
        chaddr=MAC,
        options={Opt.MESSAGE_TYPE: bytes([MessageType.DISCOVER])}
        | {int(k.removeprefix("o")): v for k, v in options.items()},
    )


def reason_of(data: bytes) -> str:
    with pytest.raises(MalformedPacket) as info:
        decode(data)
    return info.value.reason


def raw_message(options: bytes, *, sname: bytes = b"", file: bytes = b"") -> bytes:
    """A valid header and cookie with these raw sname/file fields, then `options` verbatim."""
    head = bytearray(encode(request())[:240])
    head[44 : 44 + len(sname)] = sname
    head[108 : 108 + len(file)] = file
    return bytes(head) + options


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


# --- real clients --------------------------------------------------------------------------


def test_udhcpc_discover() -> None:
    msg = decode(UDHCPC_DISCOVER)
    assert msg.op is Op.BOOTREQUEST
    assert msg.xid == 0x4CAE706A
    assert msg.mac == "02:00:00:aa:bb:01"
    assert msg.message_type is MessageType.DISCOVER
    assert (msg.ciaddr, msg.giaddr, msg.flags) == (IPv4Address(0), IPv4Address(0), 0)
    assert list(msg.options) == [53, 57, 55, 60, 61]
    assert msg.options[Opt.MAX_MESSAGE_SIZE] == (576).to_bytes(2, "big")
    assert msg.options[Opt.PARAM_REQUEST_LIST] == bytes([1, 3, 6, 12, 15, 28, 42])
    assert msg.options[Opt.VENDOR_CLASS] == b"udhcp 1.35.0"
    assert msg.options[Opt.CLIENT_ID] == b"\x01" + MAC


def test_dhclient_discover() -> None:
    msg = decode(DHCLIENT_DISCOVER)
    assert msg.xid == 0x22D39A17
    assert msg.secs == 8
    assert msg.message_type is MessageType.DISCOVER
    assert msg.options[Opt.HOSTNAME] == b"vm"
    assert Opt.CLIENT_ID not in msg.options
    assert msg.options[Opt.PARAM_REQUEST_LIST][:4] == bytes([1, 28, 2, 3])


@pytest.mark.parametrize("capture", [UDHCPC_DISCOVER, DHCLIENT_DISCOVER])
def test_reencoding_a_capture_gives_the_same_bytes(capture: bytes) -> None:
    # Both clients put 53 first and send 300-octet messages, as encode() does.
    assert encode(decode(capture)) == capture


# --- every reject reason -------------------------------------------------------------------


def test_reject_reasons_of_the_fixed_header() -> None:
    good = encode(request())
    assert reason_of(good[:239]) == "too_short"
    assert reason_of(b"") == "too_short"
    assert reason_of(good + bytes(MAX_MESSAGE_SIZE)) == "too_long"
    assert reason_of(patched(good, 0, b"\x03")) == "bad_op"
    assert reason_of(patched(good, 0, b"\x00")) == "bad_op"
    assert reason_of(patched(good, 1, b"\x06")) == "bad_htype"  # IEEE 802 token ring
    assert reason_of(patched(good, 236, b"\x63\x82\x53\x64")) == "bad_cookie"


@pytest.mark.parametrize("hlen", [0, 1, 5, 7, 16, 255])
def test_only_six_octet_hardware_addresses_are_accepted(hlen: int) -> None:
    # hlen 0 gave every such client the shared identity "" in the Go server.
    assert reason_of(patched(encode(request()), 2, bytes([hlen]))) == "bad_hlen"


@pytest.mark.parametrize("mac", ["000000000000", "ffffffffffff", "01005e000001", "333300000001"])
def test_chaddr_must_name_one_nic(mac: str) -> None:
    assert reason_of(patched(encode(request()), 28, bytes.fromhex(mac))) == "bad_chaddr"


def test_reject_reasons_of_the_options() -> None:
    head = raw_message(b"")
    assert reason_of(head + b"\x35\x01\x01") == "no_end"
    assert reason_of(head + b"\x35\x01\x01\x00\x00") == "no_end"
    assert reason_of(head) == "no_end"
    assert reason_of(head + b"\x35\x05\x01\xff") == "truncated_option"
    assert reason_of(head + b"\x35\x01\x01\x0c") == "truncated_option"  # code, no length
    assert reason_of(head + b"\x35\x02\x01\x01\xff") == "bad_option_length"
    assert reason_of(head + b"\x35\x01\x03\x32\x03\x01\x02\x03\xff") == "bad_option_length"
    assert reason_of(head + b"\x35\x01\x03\x39\x01\x02\xff") == "bad_option_length"


@pytest.mark.parametrize("value", [b"\x00", b"\x04", b"\x01\x01", b""])
def test_overload_value_must_be_1_to_3(value: bytes) -> None:
    data = raw_message(b"\x35\x01\x01\x34" + bytes([len(value)]) + value + b"\xff")
    assert reason_of(data) == "bad_overload"


def test_overload_may_not_nest() -> None:
    data = raw_message(b"\x35\x01\x01\x34\x01\x01\xff", file=b"\x34\x01\x03\xff")
    assert reason_of(data) == "bad_overload"


def test_truncated_option_inside_an_overloaded_field() -> None:
    data = raw_message(b"\x35\x01\x01\x34\x01\x02\xff", sname=bytes(61) + b"\x0c\x09a")
    assert reason_of(data) == "truncated_option"


# --- option rules ----------------------------------------------------------------------------


def test_pad_is_skipped_and_nothing_after_end_is_read() -> None:
    head = raw_message(b"")
    msg = decode(head + b"\x00\x00\x35\x01\x03\x00\x0c\x02vm\xff\x0c\x03bad\xffjunk")
    assert msg.options == {53: b"\x03", 12: b"vm"}


def test_repeated_options_are_concatenated_rfc3396() -> None:
    head = raw_message(b"")
    msg = decode(head + b"\x35\x01\x01\x79\x02\x18\x0a\x0c\x01x\x79\x03\x00\x0a\x00\xff")
    assert msg.options[Opt.CLASSLESS_ROUTES] == b"\x18\x0a\x00\x0a\x00"
    assert list(msg.options) == [53, 121, 12]


def test_overload_reads_options_then_file_then_sname() -> None:
    msg = decode(
        raw_message(
            b"\x35\x01\x01\x34\x01\x03\x0c\x01a\xff",
            file=b"\x0c\x01b\x0f\x01f",  # no END: the field's end ends it
            sname=b"\x0c\x01c\xff\x0c\x01X",  # END, then ignored bytes
        )
    )
    assert msg.options[Opt.HOSTNAME] == b"abc"
    assert msg.options[Opt.DOMAIN_NAME] == b"f"
    assert Opt.OVERLOAD not in msg.options
    assert (msg.sname, msg.file) == (b"", b"")


def test_overload_of_file_keeps_sname_as_a_name() -> None:
    msg = decode(raw_message(b"\x35\x01\x01\x34\x01\x01\xff", sname=b"srv", file=b"\x0c\x01h\xff"))
    assert (msg.sname, msg.file, msg.options[Opt.HOSTNAME]) == (b"srv", b"", b"h")


def test_overload_of_sname_keeps_file_as_a_name() -> None:
    msg = decode(raw_message(b"\x35\x01\x01\x34\x01\x02\xff", sname=b"\x0c\x01h\xff", file=b"boot"))
    assert (msg.sname, msg.file, msg.options[Opt.HOSTNAME]) == (b"", b"boot", b"h")


def test_long_options_are_split_and_joined_rfc3396() -> None:
    value = bytes(range(256)) * 2 + b"tail"  # 516 octets
    data = encode(request(o119=value), max_size=1500)
    at = data.index(b"\x77\xff")
    assert data[at + 257 : at + 259] == b"\x77\xff"
    assert data[at + 514 : at + 516] == b"\x77\x06"
    assert decode(data).options[Opt.DOMAIN_SEARCH] == value


def test_encode_puts_message_type_first_and_keeps_the_rest_in_order() -> None:
    msg = DhcpMessage(
        op=Op.BOOTREPLY, xid=7, chaddr=MAC, options={1: b"\xff\xff\xff\x00", 53: b"\x02", 3: b"x"}
    )
    data = encode(msg)
    assert data[240:249] == b"\x35\x01\x02\x01\x04\xff\xff\xff\x00"
    assert list(decode(data).options) == [53, 1, 3]


def test_empty_option_values_are_kept() -> None:
    # Rapid commit (RFC 4039, option 80) is a zero-length option.
    assert decode(encode(request(o80=b""))).options[80] == b""


def test_replies_are_padded_to_300_octets() -> None:
    data = encode(DhcpMessage(op=Op.BOOTREPLY, xid=7, chaddr=MAC))
    assert len(data) == 300
    assert data[240] == 255
    assert data[241:] == bytes(59)


def test_default_size_limit_leaves_room_for_ip_and_udp_headers() -> None:
    # 576 - 28 = 548 octets: 240 + option 53 (3) + 43 (2 + 255) + 44 (2 + 45) + END (1).
    assert len(encode(request(o43=bytes(255), o44=bytes(45)))) == 548
    with pytest.raises(MessageTooLarge):
        encode(request(o43=bytes(255), o44=bytes(46)))
    assert len(encode(request(o43=bytes(255), o44=bytes(46)), max_size=549)) == 549


@pytest.mark.parametrize("code", [0, 52, 255, 256, -1])
def test_encode_refuses_framing_codes(code: int) -> None:
    with pytest.raises(ValueError, match="cannot be encoded"):
        encode(DhcpMessage(op=Op.BOOTREPLY, xid=1, chaddr=MAC, options={code: b"x"}))


def test_encode_refuses_fields_that_would_be_truncated() -> None:
    with pytest.raises(ValueError, match="longer than"):
        encode(DhcpMessage(op=Op.BOOTREPLY, xid=1, chaddr=MAC, sname=b"s" * 65))


# --- properties ------------------------------------------------------------------------------


def decode_or_reason(data: bytes) -> DhcpMessage | str:
    try:
        return decode(data)
    except MalformedPacket as exc:
        assert exc.reason.isidentifier()
        return exc.reason


@given(st.binary(max_size=700))
def test_any_bytes_give_a_message_or_malformed(data: bytes) -> None:
    decode_or_reason(data)


@given(st.binary(max_size=400), st.sampled_from([UDHCPC_DISCOVER[:240], DHCLIENT_DISCOVER[:240]]))
def test_any_options_field_gives_a_message_or_malformed(tail: bytes, head: bytes) -> None:
    decode_or_reason(head + tail)


@given(st.sampled_from([UDHCPC_DISCOVER, DHCLIENT_DISCOVER]), st.sets(st.integers(0, 299 * 8)))
def test_bit_flips_give_a_message_or_malformed(capture: bytes, bits: set[int]) -> None:
    data = bytearray(capture)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    decode_or_reason(bytes(data))


ips = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
unicast_macs = st.binary(min_size=6, max_size=6).filter(lambda m: not m[0] & 1 and any(m))
names = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"x"))
# Codes the decoder checks for a fixed length get values of that length.
fixed = {50: 4, 51: 4, 53: 1, 54: 4, 57: 2}
option_items = st.one_of(
    st.sampled_from(sorted(fixed)).flatmap(
        lambda c: st.tuples(st.just(c), st.binary(min_size=fixed[c], max_size=fixed[c]))
    ),
    st.tuples(
        st.integers(1, 254).filter(lambda c: c not in fixed and c != 52), st.binary(max_size=600)
    ),
)
messages = st.builds(
    DhcpMessage,
    op=st.sampled_from(Op),
    xid=st.integers(0, 2**32 - 1),
    chaddr=unicast_macs,
    hops=st.integers(0, 255),
    secs=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFF),
    ciaddr=ips,
    yiaddr=ips,
    siaddr=ips,
    giaddr=ips,
    sname=names,
    file=st.binary(max_size=128).map(lambda b: b.replace(b"\0", b"y")),
    options=st.lists(option_items, max_size=6).map(dict),
)


@given(messages)
def test_round_trip(msg: DhcpMessage) -> None:
    data = encode(msg, max_size=MAX_MESSAGE_SIZE)
    assert len(data) >= 300
    assert decode(data) == msg


def test_a_message_is_a_frozen_value_with_its_defaults() -> None:
    # DhcpMessage fills its fields through its instance dict (the hot path's constructor):
    # it must still compare by value, refuse assignment, and give each message its own
    # options dict.
    first = DhcpMessage(Op.BOOTREQUEST, 7, b"\x02\0\0\0\0\x01")
    second = DhcpMessage(Op.BOOTREQUEST, 7, b"\x02\0\0\0\0\x01")
    assert first == second and first.options is not second.options
    assert first.htype == 1 and first.ciaddr == ZERO_IP and first.sname == b""
    assert dataclasses.replace(first, xid=8) == DhcpMessage(Op.BOOTREQUEST, 8, first.chaddr)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.xid = 9  # type: ignore[misc]


def test_message_type_and_mac_read_from_the_fields() -> None:
    base = DhcpMessage(Op.BOOTREQUEST, 7, b"\x02\0\0\0\0\x01")
    for raw, expected in [
        (b"\x03", MessageType.REQUEST),
        (b"\x08", MessageType.INFORM),
        (b"", None),  # wrong length
        (b"\x03\x03", None),
        (b"\x09", None),  # no such type
        (b"\x00", None),
    ]:
        assert dataclasses.replace(base, options={Opt.MESSAGE_TYPE: raw}).message_type is expected
    assert base.message_type is None
    assert base.mac == "02:00:00:00:00:01" and base.mac == "02:00:00:00:00:01"
    other = dataclasses.replace(base, chaddr=b"\x02\0\0\0\0\x02")
    assert other.mac == "02:00:00:00:00:02" and other != base
    assert "mac=" not in repr(base)  # derived from chaddr, not a value of its own
