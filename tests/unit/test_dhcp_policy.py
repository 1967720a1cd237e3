"""RFC 2131 decisions end to end through policy.handle(), with messages built in memory."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from cocoon_net.dhcp import options, policy
from cocoon_net.dhcp.leases import (
    Grant,
    Hold,
    LeaseTable,
    Quarantine,
    Release,
    Renew,
    Standing,
    Withdraw,
)
from cocoon_net.dhcp.model import BROADCAST_FLAG, ZERO_IP, DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.policy import (
    BROADCAST_IP,
    BROADCAST_MAC,
    ClientState,
    Destination,
    Drop,
    Reply,
    RequestContext,
    Verdict,
    Why,
    handle,
)
from cocoon_net.dhcp.ratelimit import RateLimiter
from cocoon_net.dhcp.settings import DhcpSettings

A = IPv4Address
GW = A("172.20.100.1")
OTHER_SERVER = A("172.20.100.254")
RELAY = A("172.20.100.250")
POOL = [A(f"172.20.100.{i}") for i in range(2, 10)]
S = DhcpSettings(
    server_id=GW,
    subnet=IPv4Network("172.20.100.0/24"),
    router=GW,
    dns=(A("8.8.8.8"),),
    relay_allowed_from=frozenset({RELAY}),
)
ME = "02:00:00:00:00:01"
YOU = "02:00:00:00:00:02"
T0 = 1_000_000.0


def msg(
    mtype: MessageType | None,
    mac: str = ME,
    *,
    ciaddr: IPv4Address = ZERO_IP,
    giaddr: IPv4Address = ZERO_IP,
    flags: int = 0,
    op: Op = Op.BOOTREQUEST,
    **opts: bytes | IPv4Address,
) -> DhcpMessage:
    raw: dict[int, bytes] = {} if mtype is None else {Opt.MESSAGE_TYPE: bytes([mtype])}
    for name, value in opts.items():
        raw[Opt[name.upper()]] = value.packed if isinstance(value, IPv4Address) else value
    return DhcpMessage(
        op,
        0xCAFE,
        bytes.fromhex(mac.replace(":", "")),
        flags=flags,
        ciaddr=ciaddr,
        giaddr=giaddr,
        options=raw,
    )


def ctx(mac: str = ME, *, src: IPv4Address = ZERO_IP, broadcast: bool = True) -> RequestContext:
    return RequestContext(mac, src, BROADCAST_IP if broadcast else GW, broadcast)


def reply(decision: policy.Decision, mtype: MessageType) -> DhcpMessage:
    assert isinstance(decision, Reply), decision
    assert decision.message.message_type is mtype
    return decision.message


def dora(table: LeaseTable, mac: str, now: float = T0) -> IPv4Address:
    offer = reply(
        handle(msg(MessageType.DISCOVER, mac), ctx(mac), table, S, now), MessageType.OFFER
    )
    request = msg(MessageType.REQUEST, mac, server_id=GW, requested_ip=offer.yiaddr)
    reply(handle(request, ctx(mac), table, S, now), MessageType.ACK)
    return offer.yiaddr


# ---------------------------------------------------------------------------- client state


@pytest.mark.parametrize(
    ("sid", "req", "ciaddr", "bcast", "state"),
    [
        (True, True, False, True, ClientState.SELECTING),
        (False, True, False, True, ClientState.INIT_REBOOT),
        (False, False, True, False, ClientState.RENEWING),
        (False, False, True, True, ClientState.REBINDING),
        (False, True, True, False, ClientState.RENEWING),  # option 50 tolerated in a renewal
        (True, False, True, True, ClientState.REBINDING),
        (True, False, False, True, None),
        (False, False, False, True, None),
    ],
)
def test_client_state_per_rfc2131_4_3_2(
    sid: bool, req: bool, ciaddr: bool, bcast: bool, state: ClientState | None
) -> None:
    m = msg(MessageType.REQUEST, ciaddr=POOL[0] if ciaddr else ZERO_IP)
    if sid:
        m.options[Opt.SERVER_ID] = GW.packed
    if req:
        m.options[Opt.REQUESTED_IP] = POOL[0].packed
    assert policy.client_state(m, ctx(broadcast=bcast)) is state


@pytest.mark.parametrize("length", [0, 3, 5])
def test_an_option_50_that_is_no_address_asks_for_nothing(length: int) -> None:
    m = msg(MessageType.REQUEST, server_id=GW, requested_ip=bytes(length))
    assert policy.client_state(m, ctx()) is None  # SELECTING without the address it selected
    m.options.pop(Opt.SERVER_ID)
    assert policy.client_state(m, ctx()) is None


def test_rule_table_is_complete() -> None:
    assert {(s, st) for s in ClientState for st in Standing} == set(policy.RULES)


# ---------------------------------------------------------------------------- REQUEST rules

ADDR = POOL[3]  # .5: the address each scenario puts in a given standing for ME
OUTSIDE = A("172.20.100.200")  # in the subnet, not in the pool


def _scenario(standing: Standing) -> tuple[LeaseTable, IPv4Address]:
    table = LeaseTable(POOL)
    t = T0 - 100
    match standing:
        case Standing.LEASED:
            table.grant(ME, ADDR, t, S.lease_time)
        case Standing.OFFERED:
            table.offer(ME, T0 - 1, ADDR)
        case Standing.RESERVED:
            table.set_reservations({ME: ADDR})
        case Standing.REMEMBERED:
            table.grant(ME, ADDR, t, S.lease_time)
            table.release(ME, ADDR, t + 1)
        case Standing.RECOVERED_MINE:
            table.load([], [], {}, t, in_use={ADDR: ME})
        case Standing.RECOVERED:
            table.load([], [], {}, t, in_use={ADDR: ""})
        case Standing.USED:
            table.grant(YOU, ADDR, t, S.lease_time)
            table.release(YOU, ADDR, t + 1)
        case Standing.HELD_BY_OTHER:
            table.grant(YOU, ADDR, t, S.lease_time)
        case Standing.RESERVED_FOR_OTHER:
            table.set_reservations({YOU: ADDR})
        case Standing.QUARANTINED:
            table.grant(YOU, ADDR, t, S.lease_time)
            table.decline(YOU, ADDR, t + 1, S.decline_quarantine)
        case Standing.OUTSIDE_POOL:
            return table, OUTSIDE
    return table, ADDR


def _request(state: ClientState, addr: IPv4Address) -> tuple[DhcpMessage, RequestContext]:
    match state:
        case ClientState.SELECTING:
            return msg(MessageType.REQUEST, server_id=GW, requested_ip=addr), ctx()
        case ClientState.INIT_REBOOT:
            return msg(MessageType.REQUEST, requested_ip=addr), ctx()
        case ClientState.RENEWING:
            return msg(MessageType.REQUEST, ciaddr=addr), ctx(src=addr, broadcast=False)
        case ClientState.REBINDING:
            return msg(MessageType.REQUEST, ciaddr=addr), ctx(src=addr)


# Written out by hand from RFC 2131 §4.3.2 and the lease-loss rules in policy.py's docstring,
# columns SELECTING, INIT-REBOOT, RENEWING, REBINDING, for a MAC the table knows nothing else of.
EXPECTED: dict[Standing, tuple[str, str, str, str]] = {
    Standing.LEASED: ("ACK", "ACK", "ACK", "ACK"),
    Standing.OFFERED: ("ACK", "ACK", "ACK", "ACK"),
    Standing.RESERVED: ("ACK", "ACK", "ACK", "ACK"),
    Standing.REMEMBERED: ("ACK", "ACK", "ACK", "ACK"),
    Standing.RECOVERED_MINE: ("ACK", "ACK", "ACK", "ACK"),
    Standing.UNKNOWN: ("NAK", "silent", "ACK", "ACK"),
    Standing.RECOVERED: ("NAK", "silent", "NAK", "NAK"),
    Standing.USED: ("NAK", "NAK", "NAK", "NAK"),
    Standing.HELD_BY_OTHER: ("NAK", "NAK", "NAK", "NAK"),
    Standing.RESERVED_FOR_OTHER: ("NAK", "NAK", "NAK", "NAK"),
    Standing.QUARANTINED: ("NAK", "NAK", "NAK", "NAK"),
    Standing.OUTSIDE_POOL: ("NAK", "NAK", "NAK", "NAK"),
}
CASES = [
    (standing, state, EXPECTED[standing][i])
    for standing in Standing
    for i, state in enumerate(ClientState)
]


@pytest.mark.parametrize(("standing", "state", "outcome"), CASES)
def test_request_rules(standing: Standing, state: ClientState, outcome: str) -> None:
    table, addr = _scenario(standing)
    assert table.standing(ME, addr, T0) is standing
    before = table.snapshot()
    request, context = _request(state, addr)
    decision = handle(request, context, table, S, T0)
    if outcome == "silent":
        assert decision == Drop(Why.UNKNOWN_CLIENT)
        assert table.snapshot() == before
    elif outcome == "NAK":
        nak = reply(decision, MessageType.NAK)
        assert nak.yiaddr == ZERO_IP
        assert nak.ciaddr == ZERO_IP
        assert Opt.LEASE_TIME not in nak.options
        assert nak.options[Opt.SERVER_ID] == GW.packed
        assert isinstance(decision, Reply)
        assert decision.dest == Destination(BROADCAST_IP, 68, BROADCAST_MAC)
        assert decision.changes == ()
        assert table.snapshot() == before
    else:
        ack = reply(decision, MessageType.ACK)
        assert ack.yiaddr == addr
        renewing = state in (ClientState.RENEWING, ClientState.REBINDING)
        assert ack.ciaddr == (addr if renewing else ZERO_IP)
        assert ack.options[Opt.LEASE_TIME] == options.u32(S.lease_time)
        lease = table.lease_of(ME, T0)
        assert lease is not None
        assert (lease.ip, lease.expires) == (addr, T0 + S.lease_time)
        assert isinstance(decision, Reply)
        [change] = decision.changes
        assert change == (Renew(lease) if standing is Standing.LEASED else Grant(lease))


@pytest.mark.parametrize(
    ("state", "standing"),
    [
        (ClientState.INIT_REBOOT, Standing.UNKNOWN),
        (ClientState.RENEWING, Standing.UNKNOWN),
        (ClientState.INIT_REBOOT, Standing.RECOVERED),
    ],
)
def test_a_known_client_asking_for_a_stray_address_is_naked(
    state: ClientState, standing: Standing
) -> None:
    table, addr = _scenario(standing)
    table.grant(ME, POOL[0], T0 - 10, S.lease_time)
    assert policy.RULES[state, standing] in (Verdict.ACK_IF_NEW, Verdict.SILENT_IF_NEW)
    request, context = _request(state, addr)
    reply(handle(request, context, table, S, T0), MessageType.NAK)
    lease = table.lease_of(ME, T0)
    assert lease is not None
    assert lease.ip == POOL[0]


def test_selecting_another_server_withdraws_our_offer() -> None:
    table = LeaseTable(POOL)
    offered = reply(handle(msg(MessageType.DISCOVER), ctx(), table, S, T0), MessageType.OFFER)
    request = msg(MessageType.REQUEST, server_id=OTHER_SERVER, requested_ip=offered.yiaddr)
    decision = handle(request, ctx(), table, S, T0 + 1)
    assert decision == Drop(Why.OTHER_SERVER, (Withdraw(ME, offered.yiaddr),))
    assert table.offer_of(ME, T0 + 1) is None
    assert table.lease_of(ME, T0 + 1) is None


def test_offer_expired_before_request_is_naked_not_double_granted() -> None:
    table = LeaseTable(POOL[:1])
    offered = reply(handle(msg(MessageType.DISCOVER), ctx(), table, S, T0), MessageType.OFFER)
    reply(handle(msg(MessageType.DISCOVER, YOU), ctx(YOU), table, S, T0 + 61), MessageType.OFFER)
    request = msg(MessageType.REQUEST, server_id=GW, requested_ip=offered.yiaddr)
    reply(handle(request, ctx(), table, S, T0 + 62), MessageType.NAK)
    assert table.holder(offered.yiaddr, T0 + 62) == YOU


# ---------------------------------------------------------------------------- drops


def _drop_cases() -> list[tuple[str, Callable[[], tuple[DhcpMessage, RequestContext]], Why]]:
    d = MessageType.DISCOVER
    return [
        ("reply op", lambda: (msg(d, op=Op.BOOTREPLY), ctx()), Why.NOT_BOOTREQUEST),
        ("bootp", lambda: (msg(None), ctx()), Why.NO_MESSAGE_TYPE),
        ("bad 53", lambda: (msg(None, message_type=b"\x63"), ctx()), Why.NO_MESSAGE_TYPE),
        ("offer", lambda: (msg(MessageType.OFFER), ctx()), Why.UNEXPECTED_TYPE),
        ("spoof", lambda: (msg(d, YOU), ctx(ME)), Why.CHADDR_MISMATCH),
        ("relay", lambda: (msg(d, giaddr=GW), ctx(src=GW)), Why.RELAY_NOT_ALLOWED),
        (
            "relay off subnet",
            lambda: (msg(d, giaddr=A("10.0.0.1")), ctx(src=RELAY)),
            Why.RELAY_NOT_ALLOWED,
        ),
        ("empty request", lambda: (msg(MessageType.REQUEST), ctx()), Why.BAD_REQUEST),
        (
            "selecting without 50",
            lambda: (msg(MessageType.REQUEST, server_id=GW), ctx()),
            Why.BAD_REQUEST,
        ),
        ("decline without 50", lambda: (msg(MessageType.DECLINE), ctx()), Why.BAD_REQUEST),
        ("inform without ciaddr", lambda: (msg(MessageType.INFORM), ctx()), Why.BAD_REQUEST),
        (
            "inform off subnet",
            lambda: (msg(MessageType.INFORM, ciaddr=A("10.0.0.5")), ctx(src=A("10.0.0.5"))),
            Why.BAD_REQUEST,
        ),
        (
            "release of nothing",
            lambda: (msg(MessageType.RELEASE, ciaddr=POOL[0], server_id=GW), ctx()),
            Why.NOT_HOLDER,
        ),
        (
            "release to another server",
            lambda: (msg(MessageType.RELEASE, ciaddr=POOL[0], server_id=OTHER_SERVER), ctx()),
            Why.OTHER_SERVER,
        ),
        (
            "decline of nothing",
            lambda: (msg(MessageType.DECLINE, requested_ip=POOL[0], server_id=GW), ctx()),
            Why.NOT_HOLDER,
        ),
        (
            "decline to another server",
            lambda: (msg(MessageType.DECLINE, requested_ip=POOL[0], server_id=OTHER_SERVER), ctx()),
            Why.OTHER_SERVER,
        ),
    ]


@pytest.mark.parametrize(("name", "make", "why"), _drop_cases(), ids=[c[0] for c in _drop_cases()])
def test_drop_reasons(
    name: str, make: Callable[[], tuple[DhcpMessage, RequestContext]], why: Why
) -> None:
    table = LeaseTable(POOL)
    request, context = make()
    assert handle(request, context, table, S, T0) == Drop(why)
    assert table.snapshot() == LeaseTable(POOL).snapshot()
    assert table.stats(T0).offered == 0


def test_pool_exhausted() -> None:
    table = LeaseTable(POOL[:1])
    dora(table, ME)
    assert handle(msg(MessageType.DISCOVER, YOU), ctx(YOU), table, S, T0) == Drop(
        Why.POOL_EXHAUSTED
    )


def test_rate_limited_per_mac() -> None:
    table = LeaseTable(POOL)
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=10)
    outcomes = [
        handle(msg(MessageType.DISCOVER), ctx(), table, S, T0, limiter=limiter) for _ in range(3)
    ]
    assert [isinstance(o, Reply) for o in outcomes] == [True, True, False]
    assert outcomes[2] == Drop(Why.RATE_LIMITED)
    other = handle(msg(MessageType.DISCOVER, YOU), ctx(YOU), table, S, T0, limiter=limiter)
    assert isinstance(other, Reply)
    again = handle(msg(MessageType.DISCOVER), ctx(), table, S, T0 + 1, limiter=limiter)
    assert isinstance(again, Reply)


# ---------------------------------------------------------------------------- spoofing


def test_discover_flood_with_random_chaddrs_leaves_the_pool_intact() -> None:
    table = LeaseTable(POOL)
    rng = random.Random(7)
    for _ in range(500):
        fake = ":".join(f"{rng.randrange(256):02x}" for _ in range(6))
        assert handle(msg(MessageType.DISCOVER, fake), ctx(ME), table, S, T0) == Drop(
            Why.CHADDR_MISMATCH
        )
    assert table.stats(T0).free == len(POOL)
    assert dora(table, ME) == POOL[0]


@pytest.mark.parametrize(
    "attack",
    [
        msg(MessageType.RELEASE, YOU, ciaddr=POOL[0], server_id=GW),
        msg(MessageType.DECLINE, YOU, requested_ip=POOL[0], server_id=GW),
        msg(MessageType.REQUEST, YOU, ciaddr=POOL[1]),
        msg(MessageType.REQUEST, YOU, requested_ip=POOL[1]),
        msg(MessageType.REQUEST, YOU, server_id=OTHER_SERVER, requested_ip=POOL[0]),
    ],
)
def test_a_vm_cannot_act_for_another_vm(attack: DhcpMessage) -> None:
    table = LeaseTable(POOL)
    assert dora(table, YOU) == POOL[0]
    before = table.snapshot()
    decision = handle(attack, ctx(ME, src=POOL[3]), table, S, T0 + 5)
    assert decision == Drop(Why.CHADDR_MISMATCH)
    assert table.snapshot() == before


@pytest.mark.parametrize("mtype", [MessageType.RELEASE, MessageType.DECLINE])
def test_own_chaddr_but_someone_elses_address_changes_nothing(mtype: MessageType) -> None:
    table = LeaseTable(POOL)
    victim = dora(table, YOU)
    dora(table, ME)
    before = table.snapshot()
    attack = msg(mtype, ciaddr=victim, requested_ip=victim, server_id=GW)
    assert handle(attack, ctx(), table, S, T0 + 5) == Drop(Why.NOT_HOLDER)
    assert table.snapshot() == before


# ---------------------------------------------------------------------------- RELEASE, DECLINE


def test_release_ends_the_lease_and_the_address_stays_sticky() -> None:
    table = LeaseTable(POOL)
    mine = dora(table, ME)
    release = msg(MessageType.RELEASE, ciaddr=mine, server_id=GW)
    decision = handle(release, ctx(src=mine, broadcast=False), table, S, T0 + 10)
    assert isinstance(decision, Drop)
    assert decision.reason == Why.RELEASED
    assert [type(c) for c in decision.changes] == [Release]
    assert table.lease_of(ME, T0 + 10) is None
    dora(table, YOU, T0 + 11)
    assert dora(table, ME, T0 + 12) == mine


def test_decline_quarantines_and_next_offer_is_another_address() -> None:
    table = LeaseTable(POOL)
    bad = dora(table, ME)
    decline = msg(MessageType.DECLINE, requested_ip=bad, server_id=GW)
    decision = handle(decline, ctx(), table, S, T0 + 1)
    assert isinstance(decision, Drop)
    assert decision.reason == Why.DECLINED
    [q] = decision.changes
    assert isinstance(q, Quarantine)
    assert (q.ip, q.until) == (bad, T0 + 1 + S.decline_quarantine)
    for i, mac in enumerate([ME, YOU, "02:00:00:00:00:03"]):
        offer = handle(msg(MessageType.DISCOVER, mac), ctx(mac), table, S, T0 + 2 + i)
        assert reply(offer, MessageType.OFFER).yiaddr != bad
    # The declining client cannot INIT-REBOOT its way back into it either.
    back = msg(MessageType.REQUEST, requested_ip=bad)
    reply(handle(back, ctx(), table, S, T0 + 10), MessageType.NAK)


# ---------------------------------------------------------------------------- replies


def test_offer_header_per_rfc2131_table3() -> None:
    table = LeaseTable(POOL)
    request = replace(msg(MessageType.DISCOVER, flags=BROADCAST_FLAG), hops=0, secs=9)
    decision = handle(request, ctx(), table, S, T0)
    offer = reply(decision, MessageType.OFFER)
    assert offer.op is Op.BOOTREPLY
    assert (offer.xid, offer.chaddr, offer.flags, offer.htype) == (
        0xCAFE,
        request.chaddr,
        0x8000,
        1,
    )
    assert (offer.hops, offer.secs, offer.ciaddr, offer.siaddr) == (0, 0, ZERO_IP, ZERO_IP)
    assert offer.yiaddr == POOL[0]
    assert list(offer.options)[:2] == [Opt.MESSAGE_TYPE, Opt.SERVER_ID]
    assert isinstance(decision, Reply)
    assert decision.changes == ()
    assert decision.max_size == 548


def test_inform_gets_configuration_without_a_lease() -> None:
    table = LeaseTable(POOL)
    addr = A("172.20.100.77")
    request = msg(MessageType.INFORM, ciaddr=addr, param_request_list=bytes([6, 3]))
    decision = handle(request, ctx(src=addr, broadcast=False), table, S, T0)
    ack = reply(decision, MessageType.ACK)
    assert (ack.yiaddr, ack.ciaddr) == (ZERO_IP, addr)
    assert Opt.LEASE_TIME not in ack.options
    assert list(ack.options) == [Opt.MESSAGE_TYPE, Opt.SERVER_ID, 6, 3, 1]
    assert isinstance(decision, Reply)
    assert decision.dest == Destination(addr, 68, ME)
    assert decision.changes == ()
    assert table.stats(T0).leased == 0


@pytest.mark.parametrize(
    ("request_", "mtype", "dest"),
    [
        # giaddr set: back to the relay's port 67, through the frame's source.
        (msg(MessageType.DISCOVER, giaddr=RELAY), MessageType.OFFER, (RELAY, 67, "relay")),
        # NAK without a relay: broadcast, even for a renewing client (RFC 2131 §4.1).
        (msg(MessageType.REQUEST, ciaddr=OUTSIDE), MessageType.NAK, (BROADCAST_IP, 68, "bc")),
        # ciaddr set: unicast to it.
        (msg(MessageType.REQUEST, ciaddr=POOL[0]), MessageType.ACK, (POOL[0], 68, ME)),
        # broadcast bit: broadcast.
        (
            msg(MessageType.DISCOVER, flags=BROADCAST_FLAG),
            MessageType.OFFER,
            (BROADCAST_IP, 68, "bc"),
        ),
        # otherwise: unicast to yiaddr at chaddr.
        (msg(MessageType.DISCOVER), MessageType.OFFER, (POOL[0], 68, ME)),
    ],
)
def test_destination_per_rfc2131_4_1(
    request_: DhcpMessage, mtype: MessageType, dest: tuple[IPv4Address, int, str]
) -> None:
    table = LeaseTable(POOL)
    relay_mac = "02:aa:00:00:00:01"
    relayed = request_.giaddr != ZERO_IP
    context = ctx(relay_mac if relayed else ME, src=RELAY if relayed else ZERO_IP)
    decision = handle(request_, context, table, S, T0)
    reply(decision, mtype)
    assert isinstance(decision, Reply)
    mac = {"relay": relay_mac, "bc": BROADCAST_MAC}.get(dest[2], dest[2])
    assert decision.dest == Destination(dest[0], dest[1], mac)


def test_relayed_nak_sets_the_broadcast_bit_and_echoes_option_82() -> None:
    table = LeaseTable(POOL)
    request = msg(
        MessageType.REQUEST, giaddr=RELAY, requested_ip=OUTSIDE, relay_agent_info=b"\x01\x01x"
    )
    decision = handle(request, ctx("02:aa:00:00:00:01", src=RELAY), table, S, T0)
    nak = reply(decision, MessageType.NAK)
    assert nak.flags & BROADCAST_FLAG
    assert nak.giaddr == RELAY
    assert nak.options[Opt.RELAY_AGENT_INFO] == b"\x01\x01x"


def test_requested_options_in_client_order_and_option_57_budget() -> None:
    table = LeaseTable(POOL)
    s = replace(S, mtu=1460, domain_name="cocoon.internal")
    request = msg(
        MessageType.DISCOVER,
        param_request_list=bytes([15, 26, 6, 1, 3]),
        max_message_size=options.u16(1400),
        client_id=b"\x01abc",
    )
    decision = handle(request, ctx(), table, s, T0)
    offer = reply(decision, MessageType.OFFER)
    assert list(offer.options) == [53, 54, 51, 58, 59, 15, 26, 6, 1, 3, 61]
    assert isinstance(decision, Reply)
    assert decision.max_size == 1400 - 28


def test_cloned_client_ids_still_get_distinct_addresses() -> None:
    table = LeaseTable(POOL)
    cid = b"\xff\x00\x00\x00\x01\x00\x04same-duid"
    addrs = []
    for mac in (ME, YOU):
        offer = handle(msg(MessageType.DISCOVER, mac, client_id=cid), ctx(mac), table, S, T0)
        yiaddr = reply(offer, MessageType.OFFER).yiaddr
        request = msg(
            MessageType.REQUEST,
            mac,
            server_id=GW,
            requested_ip=yiaddr,
            client_id=cid,
            hostname=b"clone",
        )
        ack = reply(handle(request, ctx(mac), table, S, T0), MessageType.ACK)
        assert ack.options[Opt.CLIENT_ID] == cid  # RFC 6842 echo
        addrs.append(yiaddr)
    assert addrs[0] != addrs[1]
    for mac in (ME, YOU):
        lease = table.lease_of(mac, T0)
        assert lease is not None
        assert (lease.client_id, lease.hostname) == (cid.hex(), "clone")


def test_lease_loss_nobody_takes_a_held_address_whose_vm_is_unknown() -> None:
    table = LeaseTable(POOL)
    table.load([], [], {}, T0, in_use={POOL[3]: ""})
    for state in (ClientState.RENEWING, ClientState.REBINDING):
        request, context = _request(state, POOL[3])
        assert handle(request, context, table, S, T0 + 1).changes == ()
    request, context = _request(ClientState.RENEWING, POOL[3])
    reply(handle(request, context, table, S, T0 + 1), MessageType.NAK)
    assert table.lease_at(POOL[3], T0 + 1) is None


def test_lease_loss_hold_deadline_is_kept_across_loads() -> None:
    table = LeaseTable(POOL)
    changes = table.load([], [], {}, T0, in_use={POOL[3]: ""}, recovery_hold=100.0)
    assert changes == [Hold(POOL[3], T0 + 100.0)]
    # A restart later: the written deadline stands, and once past it the address is free.
    again = table.load([], [], {}, T0 + 60, in_use={POOL[3]: ""}, recovery_hold=100.0,
                       holds={POOL[3]: T0 + 100.0})  # fmt: skip
    assert again == [] and table.recovered_addresses(T0 + 60) == {POOL[3]}
    table.load([], [], {}, T0 + 101, in_use={POOL[3]: ""}, holds={POOL[3]: T0 + 100.0})
    assert table.recovered_addresses(T0 + 101) == set()


def test_lease_loss_running_vms_keep_their_addresses() -> None:
    # The lease file is gone; the kernel still routes .5 (ME answered ARP for it) and .6
    # (owner known from the start).
    table = LeaseTable(POOL)
    table.load([], [], {}, T0, in_use={POOL[3]: "", POOL[4]: YOU})
    table.identify({POOL[3]: ME})
    reboot = msg(MessageType.REQUEST, requested_ip=POOL[3])
    assert reply(handle(reboot, ctx(), table, S, T0 + 1), MessageType.ACK).yiaddr == POOL[3]
    renew = msg(MessageType.REQUEST, YOU, ciaddr=POOL[4])
    ack = handle(renew, ctx(YOU, src=POOL[4], broadcast=False), table, S, T0 + 2)
    assert reply(ack, MessageType.ACK).yiaddr == POOL[4]
    # A newcomer is never offered an address the kernel says is in use.
    third = "02:00:00:00:00:03"
    first = handle(msg(MessageType.DISCOVER, third), ctx(third), table, S, T0 + 3)
    assert reply(first, MessageType.OFFER).yiaddr == POOL[0]


# ---------------------------------------------------------------------------- reply details


def relay_ctx() -> RequestContext:
    return RequestContext("02:00:00:00:00:fa", RELAY, GW, False)


def test_a_nak_carries_no_configuration() -> None:
    nak = reply(
        handle(msg(MessageType.REQUEST, server_id=GW, requested_ip=POOL[3]), ctx(),
               LeaseTable(POOL), S, T0),
        MessageType.NAK,
    )  # fmt: skip
    assert Opt.SERVER_ID in nak.options
    for opt in (Opt.ROUTER, Opt.SUBNET_MASK, Opt.LEASE_TIME, Opt.DNS):
        assert opt not in nak.options, opt


def test_a_relayed_nak_sets_the_broadcast_bit_and_keeps_the_others() -> None:
    request = msg(
        MessageType.REQUEST, giaddr=RELAY, flags=0x0001, server_id=GW, requested_ip=POOL[3]
    )
    nak = reply(handle(request, relay_ctx(), LeaseTable(POOL), S, T0), MessageType.NAK)
    assert nak.flags == BROADCAST_FLAG | 0x0001


def test_a_relayed_ack_keeps_the_clients_flags() -> None:
    table = LeaseTable(POOL)
    discover = msg(MessageType.DISCOVER, giaddr=RELAY)
    offer = reply(handle(discover, relay_ctx(), table, S, T0), MessageType.OFFER)
    request = msg(MessageType.REQUEST, giaddr=RELAY, server_id=GW, requested_ip=offer.yiaddr)
    ack = reply(handle(request, relay_ctx(), table, S, T0), MessageType.ACK)
    assert ack.flags == 0


def test_the_reply_echoes_the_hardware_type() -> None:
    discover = replace(msg(MessageType.DISCOVER), htype=6)
    assert reply(handle(discover, ctx(), LeaseTable(POOL), S, T0), MessageType.OFFER).htype == 6


def test_a_discover_gets_the_free_address_it_asks_for() -> None:
    discover = msg(MessageType.DISCOVER, requested_ip=POOL[5])
    offer = reply(handle(discover, ctx(), LeaseTable(POOL), S, T0), MessageType.OFFER)
    assert offer.yiaddr == POOL[5]


def test_a_relayed_inform_is_answered_through_its_relay() -> None:
    inform = msg(MessageType.INFORM, giaddr=RELAY, ciaddr=POOL[2])
    decision = handle(inform, relay_ctx(), LeaseTable(POOL), S, T0)
    assert isinstance(decision, Reply)
    assert decision.dest == Destination(RELAY, 67, "02:00:00:00:00:fa")


def test_an_exhausted_pool_still_reports_the_leases_that_ran_out() -> None:
    # The only address is reserved for ME, whose lease has run out: YOU gets nothing, and the
    # expiry found on the way must still reach the journal and the routes.
    table = LeaseTable(POOL[:1], reservations={ME: POOL[0]})
    table.grant(ME, POOL[0], T0, 10)
    decision = handle(msg(MessageType.DISCOVER, YOU), ctx(YOU), table, S, T0 + 20)
    assert isinstance(decision, Drop) and decision.reason == Why.POOL_EXHAUSTED
    assert [type(c).__name__ for c in decision.changes] == ["Expire"]


# ---------------------------------------------------------------------------- reply options


def test_clients_of_different_kinds_never_share_reply_options() -> None:
    # Reply options are built once per kind of client and reused: each of these, asked
    # right after another kind, must still get exactly the options of its own kind.
    s = replace(S, mtu=1460, domain_name="cocoon.internal")
    table = LeaseTable(POOL)
    leased = [53, 54, 51, 58, 59]
    kinds = [
        (MessageType.DISCOVER, bytes([1, 3, 6]), MessageType.OFFER, [*leased, 1, 3, 6]),
        (MessageType.DISCOVER, bytes([6, 3, 1]), MessageType.OFFER, [*leased, 6, 3, 1]),
        (MessageType.DISCOVER, bytes([26, 15]), MessageType.OFFER, [*leased, 26, 15, 1, 3, 6]),
        # An ACK with a lease and one without (to an INFORM), for the same list.
        (MessageType.REQUEST, bytes([1, 3, 6]), MessageType.ACK, [*leased, 1, 3, 6]),
        (MessageType.INFORM, bytes([1, 3, 6]), MessageType.ACK, [53, 54, 1, 3, 6]),
        (MessageType.REQUEST, bytes([1, 3, 6]), MessageType.ACK, [*leased, 1, 3, 6]),
    ]
    for i, (mtype, asked, answer, codes) in enumerate(kinds * 2):
        mac = f"02:00:00:00:01:{i:02x}"
        addr = A("172.20.100.77")
        if mtype is MessageType.INFORM:
            request = msg(mtype, mac, ciaddr=addr, param_request_list=asked)
            got = reply(handle(request, ctx(mac, src=addr), table, s, T0), answer)
        elif mtype is MessageType.REQUEST:
            table = LeaseTable(POOL)
            offer = reply(
                handle(msg(MessageType.DISCOVER, mac), ctx(mac), table, s, T0), MessageType.OFFER
            )
            request = msg(mtype, mac, server_id=GW, requested_ip=offer.yiaddr,
                          param_request_list=asked)  # fmt: skip
            got = reply(handle(request, ctx(mac), table, s, T0), answer)
        else:
            table = LeaseTable(POOL)
            got = reply(handle(msg(mtype, mac, param_request_list=asked), ctx(mac), table, s, T0),
                        answer)  # fmt: skip
        assert list(got.options) == codes, (mtype, asked)


def test_a_settings_reload_is_answered_with_the_new_options() -> None:
    table = LeaseTable(POOL)
    request = msg(MessageType.DISCOVER, param_request_list=bytes([1, 3, 6, 26]))
    # Each reload makes new settings and drops the old ones, whose memory the next may take.
    for i in range(30):
        s = replace(S, dns=(A(f"10.0.0.{i + 1}"),), mtu=1000 + i, lease_time=3600 + i)
        offer = reply(handle(request, ctx(), table, s, T0), MessageType.OFFER)
        assert offer.options[Opt.DNS] == A(f"10.0.0.{i + 1}").packed
        assert offer.options[Opt.INTERFACE_MTU] == options.u16(1000 + i)
        assert offer.options[Opt.LEASE_TIME] == options.u32(3600 + i)
        del s


def test_context_destination_and_reply_keep_every_field_and_stay_frozen() -> None:
    context = RequestContext(src_mac=ME, src_ip=RELAY, dst_ip=GW, broadcast=False)
    assert (context.src_mac, context.src_ip, context.dst_ip, context.broadcast) == (
        ME, RELAY, GW, False,
    )  # fmt: skip
    dest = Destination(POOL[0], 68, ME)
    assert (dest.ip, dest.port, dest.mac, dest.broadcast) == (POOL[0], 68, ME, False)
    assert Destination(BROADCAST_IP, 68, BROADCAST_MAC).broadcast
    message = msg(MessageType.OFFER)
    assert Reply(message, dest) == Reply(message, dest, (), 548)
    full = Reply(message, dest, (Withdraw(ME, POOL[0]),), 1000)
    assert (full.message, full.dest, full.changes, full.max_size) == (
        message, dest, (Withdraw(ME, POOL[0]),), 1000,
    )  # fmt: skip
    assert context == RequestContext(ME, RELAY, GW, False)
    assert hash(dest) == hash(Destination(POOL[0], 68, ME))
    for record, name in ((context, "src_ip"), (dest, "ip"), (full, "max_size")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, None)
