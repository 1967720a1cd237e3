"""Layer-2 framing: parse and build against real captures, the kernel, and a real client."""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoon_net.dhcp.frames import (
    BROADCAST_MAC,
    CLIENT_PORT,
    ETH_HEADER_SIZE,
    SERVER_PORT,
    UDP_HEADER_SIZE,
    Framer,
    UdpFrame,
    build_frame,
    open_server_socket,
    parse_frame,
    set_filter,
    udp_checksum,
)
from cocoon_net.dhcp.model import DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.packet import MalformedPacket, decode, encode
from tests.support.netns import Netns, link_pair
from tests.unit.test_dhcp_packet import DHCLIENT_DISCOVER_FRAME, UDHCPC_DISCOVER_FRAME

SERVER_MAC = bytes.fromhex("0200000000fe")
CLIENT_MAC = bytes.fromhex("020000aabb01")
GATEWAY = IPv4Address("10.0.0.1")
ANY = IPv4Address(0)
ALL = IPv4Address("255.255.255.255")


def rfc1071(data: bytes) -> int:
    """The ones'-complement sum of 16-bit words, the slow obvious way (an independent oracle)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def reseal_ip(frame: bytes) -> bytes:
    """Recompute the IPv4 header checksum after a test edited the header."""
    ihl = (frame[14] & 0x0F) * 4
    header = bytearray(frame[14 : 14 + ihl])
    header[10:12] = b"\0\0"
    header[10:12] = (~rfc1071(bytes(header)) & 0xFFFF).to_bytes(2, "big")
    return frame[:14] + bytes(header) + frame[14 + ihl :]


def edit(frame: bytes, offset: int, new: bytes, *, reseal: bool = True) -> bytes:
    out = frame[:offset] + new + frame[offset + len(new) :]
    return reseal_ip(out) if reseal else out


def request_frame(payload: bytes = b"dhcp", dport: int = SERVER_PORT) -> bytes:
    return build_frame(CLIENT_MAC, BROADCAST_MAC, ANY, ALL, CLIENT_PORT, dport, payload)


def reason_of(frame: bytes) -> str:
    with pytest.raises(MalformedPacket) as info:
        parse_frame(frame)
    return info.value.reason


# --- captures and checksums --------------------------------------------------------------


@pytest.mark.parametrize("capture", [UDHCPC_DISCOVER_FRAME, DHCLIENT_DISCOVER_FRAME])
def test_parse_captured_discover(capture: bytes) -> None:
    frame = parse_frame(capture)
    assert frame == UdpFrame(CLIENT_MAC, BROADCAST_MAC, ANY, ALL, 68, 67, capture[42:])
    assert decode(frame.payload).message_type is MessageType.DISCOVER


@pytest.mark.parametrize("capture", [UDHCPC_DISCOVER_FRAME, DHCLIENT_DISCOVER_FRAME])
def test_udp_checksum_matches_what_the_clients_computed(capture: bytes) -> None:
    segment = capture[34:40] + b"\0\0" + capture[42:]
    assert udp_checksum(ANY, ALL, segment) == int.from_bytes(capture[40:42], "big")


def test_build_frame_reproduces_udhcpc_byte_for_byte() -> None:
    # busybox builds its frames in user space with TTL 64, id 0 and DF clear, as we do.
    payload = UDHCPC_DISCOVER_FRAME[42:]
    assert request_frame(payload) == UDHCPC_DISCOVER_FRAME


def test_built_checksums_verify_with_an_independent_sum() -> None:
    frame = build_frame(SERVER_MAC, CLIENT_MAC, GATEWAY, IPv4Address("10.0.0.9"), 67, 68, b"x")
    assert rfc1071(frame[14:34]) == 0xFFFF
    pseudo = frame[26:34] + b"\0\x11" + frame[38:40]
    assert rfc1071(pseudo + frame[34:]) == 0xFFFF


@given(
    payload=st.binary(max_size=700),
    dst=st.integers(0, 2**32 - 1),
    port=st.integers(0, 0xFFFF),
)
def test_every_built_frame_carries_checksums_that_verify(
    payload: bytes, dst: int, port: int
) -> None:
    # The sender's share of both sums is added once per Framer; every frame must still sum to
    # 0xFFFF as RFC 1071 computes it word by word, and never carry a UDP checksum of 0.
    frame = Framer(SERVER_MAC, GATEWAY, 67).frame(CLIENT_MAC, dst, port, payload)
    assert rfc1071(frame[14:34]) == 0xFFFF
    pseudo = frame[26:34] + b"\0\x11" + frame[38:40]
    assert rfc1071(pseudo + frame[34:]) == 0xFFFF
    assert frame[40:42] != b"\0\0"
    parsed = parse_frame(frame, port=port)
    assert parsed is not None and parsed.payload == payload


def test_a_frame_whose_udp_sum_is_zero_carries_ffff() -> None:
    # Find the two payload octets that make the computed UDP checksum 0.
    framer, dst = Framer(SERVER_MAC, GATEWAY, 67), int(ALL)
    probe = framer.frame(CLIENT_MAC, dst, 68, b"\0\0")
    wanted = (0xFFFF - (~int.from_bytes(probe[40:42], "big") & 0xFFFF)).to_bytes(2, "big")
    frame = framer.frame(CLIENT_MAC, dst, 68, wanted)
    assert frame[40:42] == b"\xff\xff"
    pseudo = frame[26:34] + b"\0\x11" + frame[38:40]
    assert rfc1071(pseudo + frame[34:]) == 0xFFFF


def test_zero_udp_checksum_is_sent_as_ffff() -> None:
    # Pick the two payload octets that make the sum 0xFFFF, i.e. a computed checksum of 0.
    header = b"\0\x43\0\x44\0\x0a\0\0"
    partial = ~udp_checksum(GATEWAY, ALL, header + b"\0\0") & 0xFFFF
    segment = header + (0xFFFF - partial).to_bytes(2, "big")
    assert rfc1071(GATEWAY.packed + ALL.packed + b"\0\x11\0\x0a" + segment) == 0xFFFF
    assert udp_checksum(GATEWAY, ALL, segment) == 0xFFFF


# --- what is not ours, and what is broken --------------------------------------------------


def test_frames_that_are_not_ours_give_none() -> None:
    good = request_frame()
    assert parse_frame(edit(good, 12, b"\x08\x06", reseal=False)) is None  # ARP
    assert parse_frame(edit(good, 12, b"\x86\xdd", reseal=False)) is None  # IPv6
    assert parse_frame(edit(good, 23, b"\x06")) is None  # TCP
    assert parse_frame(request_frame(dport=68)) is None
    assert parse_frame(request_frame(dport=68), port=68) is not None


def test_ethernet_padding_is_not_payload() -> None:
    assert parse_frame(request_frame(b"dhcp") + bytes(14)) == parse_frame(request_frame(b"dhcp"))


def test_reject_reasons() -> None:
    good = request_frame(b"payload!")
    assert reason_of(good[:13]) == "too_short"
    assert reason_of(good[:33]) == "bad_ip_header"
    assert reason_of(edit(good, 14, b"\x65")) == "bad_ip_header"  # version 6
    assert reason_of(edit(good, 14, b"\x44")) == "bad_ip_header"  # IHL 4
    assert reason_of(edit(good, 16, (len(good) - 13).to_bytes(2, "big"))) == "bad_ip_header"
    assert reason_of(edit(good, 16, b"\x00\x13")) == "bad_ip_header"  # shorter than IHL
    assert reason_of(edit(good, 24, b"\x12\x34", reseal=False)) == "bad_ip_checksum"
    assert reason_of(edit(good, 20, b"\x20\x00")) == "fragment"  # MF
    assert reason_of(edit(good, 20, b"\x00\x01")) == "fragment"  # offset 8
    assert reason_of(edit(good, 16, b"\x00\x1b")) == "bad_udp_length"  # 20 + 7: no UDP header
    assert reason_of(edit(good, 38, b"\x00\x07", reseal=False)) == "bad_udp_length"
    assert reason_of(edit(good, 38, b"\x00\x11", reseal=False)) == "bad_udp_length"


def test_a_wrong_udp_checksum_is_not_a_reason_to_drop() -> None:
    # CHECKSUM_PARTIAL frames from a local veth carry only the pseudo-header sum.
    frame = parse_frame(edit(request_frame(b"abc"), 40, b"\x00\x01", reseal=False))
    assert frame is not None
    assert frame.payload == b"abc"


def test_ip_options_move_the_udp_header() -> None:
    good = request_frame(b"opts")
    ip = bytearray(good[14:34])
    ip[0] = 0x46
    ip[2:4] = (int.from_bytes(ip[2:4], "big") + 4).to_bytes(2, "big")
    frame = reseal_ip(good[:14] + bytes(ip) + b"\x01\x01\x01\x00" + good[34:])
    parsed = parse_frame(frame)
    assert parsed is not None
    assert parsed.payload == b"opts"


# --- properties ----------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_any_bytes_give_none_a_frame_or_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedPacket):
        parse_frame(data)


@given(
    st.sampled_from([UDHCPC_DISCOVER_FRAME, DHCLIENT_DISCOVER_FRAME]),
    st.sets(st.integers(0, 8 * 60)),
)
def test_bit_flips_in_the_headers(capture: bytes, bits: set[int]) -> None:
    data = bytearray(capture)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    try:
        frame = parse_frame(bytes(data))
    except MalformedPacket:
        return
    if frame is not None:
        assert len(frame.payload) <= len(data) - 42


macs = st.binary(min_size=6, max_size=6)
ips = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
ports = st.integers(0, 0xFFFF)


@given(macs, macs, ips, ips, ports, ports, st.binary(max_size=1500))
def test_build_then_parse_round_trip(
    src_mac: bytes,
    dst_mac: bytes,
    src: IPv4Address,
    dst: IPv4Address,
    sport: int,
    dport: int,
    payload: bytes,
) -> None:
    frame = build_frame(src_mac, dst_mac, src, dst, sport, dport, payload)
    assert parse_frame(frame, port=dport) == UdpFrame(
        src_mac, dst_mac, src, dst, sport, dport, payload
    )
    assert rfc1071(frame[14:34]) == 0xFFFF
    assert rfc1071(frame[26:34] + b"\0\x11" + frame[38:40] + frame[34:]) == 0xFFFF


# --- the kernel: filter and checksums, in a namespace ---------------------------------------


def veth_in(ns: Netns) -> None:
    """Two linked ends in one namespace: frames sent on tx0 arrive on rx0."""
    ns.ip("link", "add", "tx0", "type", "veth", "peer", "name", "rx0")
    ns.ip("link", "set", "tx0", "address", CLIENT_MAC.hex(":"))
    ns.ip("link", "set", "rx0", "address", SERVER_MAC.hex(":"))
    ns.ip("link", "set", "tx0", "up")
    ns.ip("link", "set", "rx0", "up")


def sender(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((ifname, 0))
    return sock


def receive_until(sock: socket.socket, last: Callable[[bytes], bool]) -> list[bytes]:
    """Read until `last` matches; a 5 s silence ends the read early (a hang guard, not a check)."""
    got: list[bytes] = []
    while select.select([sock], [], [], 5)[0]:
        data = sock.recv(65535)
        got.append(data)
        if last(data):
            break
    return got


def filter_scenario() -> list[bytes]:
    rx = open_server_socket("rx0")
    tx = sender("tx0")
    good = request_frame(b"first")
    for frame in (
        request_frame(b"to-68", dport=68),
        edit(good, 23, b"\x06"),  # TCP
        edit(good, 12, b"\x08\x06", reseal=False),  # ARP
        edit(good, 20, b"\x20\x00"),  # first fragment (MF)
        edit(good, 20, b"\x00\x03"),  # later fragment whose data looks like port 67
        good[:12] + b"\x81\x00\x00\x05" + good[12:],  # VLAN 5
        bytes.fromhex("020000000099") + good[6:],  # unicast to another MAC
        good,
        edit(good, 0, SERVER_MAC, reseal=False),  # unicast to the server's MAC
        good[:12] + b"\x81\x00\x00\x00" + good[12:],  # priority tag, VLAN 0: untagged
    ):
        tx.send(frame)
    rx.send(request_frame(b"outgoing"))  # our own transmission out of rx0
    tx.send(request_frame(b"last"))
    return receive_until(rx, lambda f: f.endswith(b"last"))


@pytest.mark.netns
def test_bpf_filter_lets_only_dhcp_to_the_server_through(
    make_netns: Callable[[str], Netns],
) -> None:
    ns = make_netns("flt")
    veth_in(ns)
    got = [parse_frame(frame) for frame in ns.call(filter_scenario)]
    # Broadcast, unicast to the server's MAC, and the priority-tagged copy (delivered untagged).
    assert [(f.dst_mac, f.payload) if f else None for f in got] == [
        (BROADCAST_MAC, b"first"),
        (SERVER_MAC, b"first"),
        (BROADCAST_MAC, b"first"),
        (BROADCAST_MAC, b"last"),
    ]


def dhcp_frame(options: dict[int, bytes], tag: bytes, *, dport: int = SERVER_PORT) -> bytes:
    msg = DhcpMessage(Op.BOOTREQUEST, 1, CLIENT_MAC, options=options, file=tag)
    return request_frame(encode(msg), dport=dport)


def typed(mtype: MessageType, tag: bytes) -> bytes:
    return dhcp_frame({Opt.MESSAGE_TYPE: bytes([mtype]), Opt.CLIENT_ID: b"\x01" + CLIENT_MAC}, tag)


def gate_scenario() -> list[list[bytes]]:
    """What the server socket takes with its filter closed to DISCOVERs, then open again."""
    rx = open_server_socket("rx0")
    tx = sender("tx0")
    # encode() puts option 53 first; a client may not: moved behind option 61 (9 bytes).
    discover = typed(MessageType.DISCOVER, b"discover-behind-61")
    at = ETH_HEADER_SIZE + 20 + UDP_HEADER_SIZE + 240
    option_53, option_61 = discover[at : at + 3], discover[at + 3 : at + 12]
    behind_61 = discover[:at] + option_61 + option_53 + discover[at + 12 :]
    got: list[list[bytes]] = []
    for discovers in (False, True):
        set_filter(rx, discovers=discovers)
        for frame in (
            typed(MessageType.DISCOVER, b"discover"),
            typed(MessageType.REQUEST, b"request"),
            typed(MessageType.RELEASE, b"release"),
            behind_61,  # not known as one: passes
            dhcp_frame({}, b"bootp"),  # no option 53 at all
            edit(typed(MessageType.DISCOVER, b"to-68"), 36, b"\x00\x44"),  # not to port 67
        ):
            tx.send(frame)
        tx.send(typed(MessageType.INFORM, b"last"))
        tags = []
        for data in receive_until(rx, lambda f: b"last" in f):
            udp = parse_frame(data)
            assert udp is not None
            tags.append(decode(udp.payload).file.rstrip(b"\0"))
        got.append(tags)
    return got


@pytest.mark.netns
def test_the_gate_filter_drops_discovers_in_the_kernel_and_opens_again(
    make_netns: Callable[[str], Netns],
) -> None:
    ns = make_netns("gate")
    veth_in(ns)
    closed, opened = ns.call(gate_scenario)
    assert closed == [b"request", b"release", b"discover-behind-61", b"bootp", b"last"]
    assert opened == [
        b"discover", b"request", b"release", b"discover-behind-61", b"bootp", b"last"
    ]  # fmt: skip


def checksum_scenario() -> list[bytes]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"tx0")
    rx.bind(("0.0.0.0", CLIENT_PORT))
    tx = open_server_socket("rx0")

    def reply(payload: bytes) -> bytes:
        return build_frame(
            SERVER_MAC, BROADCAST_MAC, GATEWAY, ALL, SERVER_PORT, CLIENT_PORT, payload
        )

    tx.send(edit(reply(b"bad-udp-sum"), 40, b"\x12\x34", reseal=False))
    tx.send(edit(reply(b"bad-ip-sum"), 24, b"\x12\x34", reseal=False))
    tx.send(reply(b"good"))
    tx.send(reply(b"x" * 1400))
    got: list[bytes] = []
    while len(got) < 2 and select.select([rx], [], [], 5)[0]:
        got.append(rx.recv(2048))
    return got


@pytest.mark.netns
def test_kernel_accepts_built_frames_and_drops_bad_checksums(
    make_netns: Callable[[str], Netns],
) -> None:
    # The kernel's UDP socket verifies both checksums; the corrupted copies are the control.
    ns = make_netns("csum")
    veth_in(ns)
    ns.ip("addr", "add", "10.0.0.2/24", "dev", "tx0")
    assert ns.call(checksum_scenario) == [b"good", b"x" * 1400]


# --- a real client takes a lease from frames we build --------------------------------------


def serve_udhcpc(client_ns: str, script: str) -> tuple[list[DhcpMessage], str]:
    """Answer one udhcpc DORA by hand: the codec and framing, with no server logic."""
    sock = open_server_socket("br0")
    client = subprocess.Popen(
        ["ip", "netns", "exec", client_ns, "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1",
         "-i", "eth0", "-s", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    seen: list[DhcpMessage] = []
    offered = IPv4Address("10.0.0.50")
    try:
        while len(seen) < 2 and select.select([sock], [], [], 10)[0]:
            frame = parse_frame(sock.recv(4096))
            if frame is None:
                continue
            request = decode(frame.payload)
            seen.append(request)
            kind = (
                MessageType.OFFER
                if request.message_type is MessageType.DISCOVER
                else MessageType.ACK
            )
            reply = DhcpMessage(
                op=Op.BOOTREPLY,
                xid=request.xid,
                chaddr=request.chaddr,
                flags=request.flags,
                yiaddr=offered,
                siaddr=GATEWAY,
                options={
                    Opt.MESSAGE_TYPE: bytes([kind]),
                    Opt.SERVER_ID: GATEWAY.packed,
                    Opt.LEASE_TIME: (3600).to_bytes(4, "big"),
                    Opt.SUBNET_MASK: bytes([255, 255, 255, 0]),
                    Opt.ROUTER: GATEWAY.packed,
                },
            )
            payload = encode(reply)
            # Unicast to the client's MAC and offered address: it has no address yet.
            sock.send(build_frame(SERVER_MAC, request.chaddr, GATEWAY, offered, 67, 68, payload))
        out, _ = client.communicate(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return seen, out.decode(errors="replace")


@pytest.mark.netns
@pytest.mark.clients
def test_udhcpc_takes_a_lease_from_frames_we_build(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    srv, cli = make_netns("srv"), make_netns("cli")
    link_pair(srv, "br0", cli, "eth0")
    srv.ip("link", "set", "br0", "address", SERVER_MAC.hex(":"))
    srv.ip("addr", "add", "10.0.0.1/24", "dev", "br0")
    cli.ip("link", "set", "eth0", "address", CLIENT_MAC.hex(":"))
    result = tmp_path / "lease"
    script = tmp_path / "script"
    script.write_text(
        f'#!/bin/sh\n[ "$1" = bound ] && echo "$ip $subnet $router $lease" > {result}\n'
    )
    script.chmod(0o755)

    seen, output = srv.call(serve_udhcpc, cli.name, str(script))
    assert [m.message_type for m in seen] == [MessageType.DISCOVER, MessageType.REQUEST], output
    assert seen[1].ip_option(Opt.REQUESTED_IP) == IPv4Address("10.0.0.50")
    assert seen[1].ip_option(Opt.SERVER_ID) == GATEWAY
    assert result.read_text().split() == ["10.0.0.50", "255.255.255.0", "10.0.0.1", "3600"]
