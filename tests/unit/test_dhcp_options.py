"""Option values against the RFCs' own examples, and which options a reply carries in what order."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoon_net.dhcp import options
from cocoon_net.dhcp.model import DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.settings import DhcpSettings
from cocoon_net.errors import UsageError

A = IPv4Address
N = IPv4Network
GW = A("172.20.100.1")
SETTINGS = DhcpSettings(server_id=GW, subnet=N("172.20.100.0/24"), router=GW)
MAC = bytes.fromhex("020000000001")


def req(**opts: bytes) -> DhcpMessage:
    return DhcpMessage(
        Op.BOOTREQUEST,
        7,
        bytes.fromhex("020000000001"),
        options={int(k): v for k, v in opts.items()},
    )


def prl(*codes: int) -> dict[str, bytes]:
    return {str(int(Opt.PARAM_REQUEST_LIST)): bytes(codes)}


def build(
    request: DhcpMessage, settings: DhcpSettings = SETTINGS, leased: bool = True
) -> dict[int, bytes]:
    return options.build(request, MessageType.ACK, settings, leased)


# RFC 3442 §3, the table of destination descriptors (router 10.0.0.1 appended to each).
@pytest.mark.parametrize(
    ("net", "descriptor"),
    [
        ("0.0.0.0/0", "00"),
        ("10.0.0.0/8", "080a"),
        ("10.0.0.0/24", "180a0000"),
        ("10.17.0.0/16", "100a11"),
        ("10.27.129.0/24", "180a1b81"),
        ("10.229.0.128/25", "190ae50080"),
        ("10.198.122.47/32", "200ac67a2f"),
    ],
)
def test_classless_route_encoding_matches_rfc3442_examples(net: str, descriptor: str) -> None:
    value = options.classless_routes([(N(net), A("10.0.0.1"))])
    assert value.hex() == descriptor + "0a000001"


def test_classless_routes_always_carry_a_default_route() -> None:
    # RFC 3442: a client taking 121 ignores option 3, so 0/0 must be inside 121.
    s = replace(SETTINGS, classless_routes=((N("10.0.0.0/8"), A("172.20.100.254")),))
    out = build(req(**prl(Opt.CLASSLESS_ROUTES, Opt.MS_CLASSLESS_ROUTES)), s)
    expected = "080a" + "ac1464fe" + "00" + "ac146401"
    assert out[Opt.CLASSLESS_ROUTES].hex() == expected
    assert out[Opt.MS_CLASSLESS_ROUTES] == out[Opt.CLASSLESS_ROUTES]
    explicit = replace(s, classless_routes=((N("0.0.0.0/0"), A("172.20.100.9")),))
    assert build(req(**prl(Opt.CLASSLESS_ROUTES)), explicit)[Opt.CLASSLESS_ROUTES].hex() == (
        "00ac146409"
    )


def test_search_list_uses_rfc3397_compression_example() -> None:
    # RFC 3397 §3: "eng.apple.com." and "marketing.apple.com."; the second points at offset 4.
    value = options.search_list(["eng.apple.com.", "marketing.apple.com"])
    assert value == b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04"


def test_search_list_without_shared_suffix_and_repeated_name() -> None:
    assert options.search_list(["a.b", "c.d"]) == b"\x01a\x01b\x00\x01c\x01d\x00"
    assert options.search_list(["a.b", "a.b"]) == b"\x01a\x01b\x00\xc0\x00"


def test_scalar_builders() -> None:
    assert options.u32(86400) == bytes.fromhex("00015180")
    assert options.u16(1460) == bytes.fromhex("05b4")
    assert options.ip_list([A("8.8.8.8"), A("1.1.1.1")]) == bytes.fromhex("0808080801010101")
    assert options.domain_string("example.com.") == b"example.com"


def test_requested_options_come_in_client_order_after_the_head() -> None:
    s = replace(SETTINGS, dns=(A("8.8.8.8"),), mtu=1460, domain_name="vm.local", ntp=(GW,))
    out = build(req(**prl(26, 42, 15, 6, 3, 1)), s)
    assert list(out) == [53, 54, 51, 58, 59, 26, 42, 15, 6, 3, 1]


def test_unrequested_extras_are_left_out_but_basics_stay() -> None:
    s = replace(SETTINGS, dns=(A("8.8.8.8"),), mtu=1460, search=("a.example",))
    out = build(req(**prl(Opt.INTERFACE_MTU)), s)
    assert set(out) == {53, 54, 51, 58, 59, 26, 1, 3, 6}


def test_no_parameter_list_gets_everything_but_classless_routes() -> None:
    s = replace(
        SETTINGS,
        dns=(A("8.8.8.8"),),
        mtu=1500,
        domain_name="x.example",
        classless_routes=((N("10.0.0.0/8"), GW),),
    )
    out = build(req(), s)
    assert {1, 3, 6, 15, 26} <= set(out)
    assert Opt.CLASSLESS_ROUTES not in out
    assert Opt.MS_CLASSLESS_ROUTES not in out


def test_no_dns_means_no_option_6_not_an_empty_one() -> None:
    out = build(req(**prl(Opt.DNS)))
    assert Opt.DNS not in out
    assert all(value for value in out.values())


def test_lease_times_only_with_a_lease() -> None:
    with_lease = build(req())
    assert options.u32(86400) == with_lease[Opt.LEASE_TIME]
    assert with_lease[Opt.RENEWAL_TIME] == options.u32(43200)
    assert with_lease[Opt.REBINDING_TIME] == options.u32(75600)
    inform = build(req(), leased=False)  # RFC 2131 table 3: no 51 in an ACK to INFORM
    assert not {Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME} & set(inform)


def test_client_id_and_relay_info_echoed_last() -> None:
    request = req(**{"61": b"\x01abc", "82": b"\x01\x02xy", **prl(61, 82, 3)})
    out = build(request)
    assert list(out)[-2:] == [61, 82]
    assert out[61] == b"\x01abc"
    assert out[82] == b"\x01\x02xy"


def test_nak_chain_carries_only_identity() -> None:
    request = req(**{"61": b"\x01abc", **prl(1, 3, 6)})
    out = options.build(request, MessageType.NAK, SETTINGS, False, options.NAK_CHAIN)
    assert list(out) == [53, 54, 61]


@pytest.mark.parametrize(
    ("asked", "mtu", "expected"),
    [
        (None, None, 548),
        (1500, None, 1472),
        (300, None, 548),  # below the RFC 2132 minimum of 576: read as 576
        (9000, 1460, 1432),  # capped by the link
    ],
)
def test_budget(asked: int | None, mtu: int | None, expected: int) -> None:
    request = req() if asked is None else req(**{"57": options.u16(asked)})
    assert options.budget(request, replace(SETTINGS, mtu=mtu)) == expected


def test_fit_drops_trailing_optional_options_first() -> None:
    opts = {53: b"\x05", 54: GW.packed, 51: b"\0" * 4, 1: b"\0" * 4, 119: b"x" * 300, 61: b"y" * 10}
    assert options.encoded_size(opts) == 240 + 1 + 3 + 6 + 6 + 6 + (4 + 300) + 12
    fitted = options.fit(opts, 300)
    assert list(fitted) == [53, 54, 51, 1, 61]
    assert options.encoded_size(fitted) <= 300
    assert options.fit(opts, 10_000) == opts


@pytest.mark.parametrize(
    ("opts", "name"),
    [
        ({"12": b"vm-1\x00"}, "vm-1"),
        ({"12": b"bad name!"}, ""),
        ({"81": b"\x00\x00\x00vm2.example.com"}, "vm2.example.com"),
        ({"81": b"\x04\x00\x00\x03vm3\x07example\x00"}, "vm3.example"),
        ({"81": b"\x04\x00\x00\x09vm3"}, ""),  # label runs past the end
        ({"12": b"first", "81": b"\x00\x00\x00second"}, "first"),
        ({}, ""),
    ],
)
def test_client_hostname(opts: dict[str, bytes], name: str) -> None:
    assert options.client_hostname(req(**opts)) == name


def test_client_id_is_hex() -> None:
    assert options.client_id(req(**{"61": b"\xff\x01"})) == "ff01"
    assert options.client_id(req()) == ""


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"server_id": A("10.0.0.1")}, "server_id"),
        ({"router": A("172.20.100.255")}, "router"),
        ({"mtu": 67}, "mtu"),
        ({"lease_time": 5}, "lease_time"),
        ({"renewal_time": 80000, "rebinding_time": 70000}, "renewal_time"),
        ({"domain_name": "bad_domain"}, "domain_name"),
        ({"search": ("ok.example", "-bad")}, "search"),
        ({"dns": tuple(A(i) for i in range(64))}, "dns"),
        ({"classless_routes": ((N("10.0.0.0/8"), A("9.9.9.9")),)}, "classless_routes"),
        ({"offer_hold": 0}, "offer_hold"),
        ({"decline_quarantine": -1}, "decline_quarantine"),
        ({"rate_burst": 0}, "rate limit"),
        ({"reservations": {"02:00:00:00:00:0A": A("172.20.100.5")}}, "reservation"),
        ({"reservations": {"02:00:00:00:00:0a": A("172.20.100.1")}}, "gateway"),
        ({"reservations": {"02:00:00:00:00:0a": A("10.1.1.1")}}, "not a host address"),
        (
            {
                "reservations": {
                    "02:00:00:00:00:0a": A("172.20.100.5"),
                    "02:00:00:00:00:0b": A("172.20.100.5"),
                }
            },
            "already reserved",
        ),
    ],
)
def test_settings_validate_rejects_nonsense(change: dict[str, object], fragment: str) -> None:
    bad = replace(SETTINGS, **change)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=fragment) as err:
        bad.validate()
    assert "\n" not in str(err.value)


def test_settings_defaults_are_valid() -> None:
    good = replace(
        SETTINGS,
        dns=(A("8.8.8.8"),),
        domain_name="cocoon.internal",
        search=("cocoon.internal", "example.com"),
        mtu=1460,
        reservations={"02:00:00:00:00:0a": A("172.20.100.5")},
    )
    good.validate()
    assert (good.t1, good.t2) == (43200, 75600)


# ---------------------------------------------------------------------------- edges


def opt_req(code: int, value: bytes) -> DhcpMessage:
    return DhcpMessage(Op.BOOTREQUEST, 1, b"\x02\0\0\0\0\x01", options={code: value})


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"vm-1.", "vm-1"),  # a trailing dot goes
        (b"boX.", "boX"),
        (b"a.b\0", "a.b"),  # so does a NUL terminator
        (b"boX\0", "boX"),
        (b"x" * 253, "x" * 253),  # the longest name
        (b"x" * 254, ""),
        (b"\xffvm", ""),  # not ASCII
        (b"vm 1", ""),
        (b"", ""),
    ],
)
def test_option_12_names(raw: bytes, name: str) -> None:
    assert options.client_hostname(opt_req(Opt.HOSTNAME, raw)) == name


def wire(*labels: bytes, end: bool = True) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + (b"\0" if end else b"")


@pytest.mark.parametrize(
    ("flags", "name", "expected"),
    [
        (0x01, b"vm1.example", "vm1.example"),  # S bit only: ASCII
        (0x05, wire(b"vm1", b"example"), "vm1.example"),  # E bit: wire format
        (0x04, wire(b"a"), "a"),
        (0x04, wire(b"ab", end=False), "ab"),  # unterminated, exactly filled
        (0x04, b"\x03ab", ""),  # a label longer than what is left
        (0x04, wire(b"x" * 63), "x" * 63),
        (0x04, wire(b"x" * 64), ""),  # labels are at most 63 octets
    ],
)
def test_option_81_names(flags: int, name: bytes, expected: str) -> None:
    raw = bytes([flags, 0, 0]) + name
    assert options.client_hostname(opt_req(Opt.CLIENT_FQDN, raw)) == expected


def test_domain_name_loses_only_its_trailing_dot() -> None:
    assert options.domain_string("corp.boX.") == b"corp.boX"


def test_long_values_are_counted_in_255_byte_parts() -> None:
    size = options.encoded_size
    assert size({1: b"x" * 256}) - size({1: b"x" * 255}) == 3  # one byte and one more header
    assert size({1: b"x" * 255}) - size({1: b"x" * 254}) == 1


def test_options_that_fit_exactly_are_all_kept() -> None:
    opts = build(req())
    assert options.fit(opts, options.encoded_size(opts)) == opts
    assert options.fit(opts, options.encoded_size(opts) - 1) != opts


def test_a_large_max_message_size_is_capped_by_the_link() -> None:
    big = opt_req(Opt.MAX_MESSAGE_SIZE, b"\xff\xff")
    assert options.budget(big, SETTINGS) == 1500 - 28
    assert options.budget(big, replace(SETTINGS, mtu=9000)) == 9000 - 28


def test_without_option_55_the_lease_times_lead() -> None:
    codes = list(build(DhcpMessage(Op.BOOTREQUEST, 1, b"\x02\0\0\0\0\x01")))
    assert codes[:5] == [
        Opt.MESSAGE_TYPE, Opt.SERVER_ID, Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME
    ]  # fmt: skip


def test_u32_takes_the_whole_unsigned_range() -> None:
    assert options.u32(0xFFFFFFFE) == b"\xff\xff\xff\xfe"


def test_search_domains_and_ntp_servers_are_sent_when_asked() -> None:
    settings = replace(SETTINGS, search=("a.example", "b.example"), ntp=(A("10.0.0.9"),))
    got = build(req(**prl(Opt.DOMAIN_SEARCH, Opt.NTP)), settings)
    assert got[Opt.DOMAIN_SEARCH] == options.search_list(["a.example", "b.example"])
    assert got[Opt.DOMAIN_SEARCH].startswith(b"\x01a\x07example\x00")
    assert got[Opt.NTP] == A("10.0.0.9").packed


def test_search_names_keep_their_last_letters() -> None:
    assert options.search_list(["a.boX"]) == b"\x01a\x03box\x00"  # lower-cased, not cut


# Shared by all examples, so the cache holds entries of earlier clients of other kinds.
CACHED_SETTINGS = [
    replace(SETTINGS, search=search, dns=(GW,), ntp=(GW,))
    for search in ((), ("a.example",), tuple(f"d{i}.example.org" for i in range(30)))
]


@settings(max_examples=300, deadline=None)
@given(
    asked=st.none() | st.lists(st.integers(1, 254), max_size=40).map(bytes),
    client_id=st.none() | st.binary(min_size=2, max_size=60),
    agent=st.none() | st.binary(min_size=2, max_size=200),
    limit=st.sampled_from([300, 400, 548, 1472]),
    mtype=st.sampled_from([MessageType.OFFER, MessageType.ACK, MessageType.NAK]),
    leased=st.booleans(),
    cfg=st.sampled_from(CACHED_SETTINGS),
)
def test_reply_options_from_the_cache_are_what_building_them_gives(
    asked: bytes | None,
    client_id: bytes | None,
    agent: bytes | None,
    limit: int,
    mtype: MessageType,
    leased: bool,
    cfg: DhcpSettings,
) -> None:
    chain = options.NAK_CHAIN if mtype is MessageType.NAK else options.CHAIN
    opts: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes([MessageType.REQUEST])}
    for code, value in (
        (Opt.PARAM_REQUEST_LIST, asked),
        (Opt.CLIENT_ID, client_id),
        (Opt.RELAY_AGENT_INFO, agent),
    ):
        if value is not None:
            opts[code] = value
    request = DhcpMessage(op=Op.BOOTREQUEST, xid=1, chaddr=MAC, options=opts)
    expected = options.fit(options.build(request, mtype, cfg, leased, chain), limit)
    # Twice: the first call fills the cache, the second is served from it; and a client of
    # the same kind with other echoed values gets its own values back.
    for _ in range(2):
        got = options.for_reply(request, mtype, cfg, leased, chain, limit)
        assert list(got.items()) == list(expected.items())
    other = dict(opts)
    for code in (Opt.CLIENT_ID, Opt.RELAY_AGENT_INFO):
        if code in other:
            other[code] = bytes(reversed(other[code]))
    twin = replace(request, options=other)
    got = options.for_reply(twin, mtype, cfg, leased, chain, limit)
    assert list(got.items()) == list(
        options.fit(options.build(twin, mtype, cfg, leased, chain), limit).items()
    )
