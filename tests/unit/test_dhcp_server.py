"""The server's persist path with a real lease store on tmp files, a recording route socket
and recording packet sockets: for every kind of grant the journal is written and
fdatasync'ed, then the /32 route is installed, and only then does the ACK leave; when any of
those steps fails nothing leaves at all."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, cast

import pytest

from cocoon_net.dhcp import frames, packet
from cocoon_net.dhcp import server as server_module
from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.leases import LeaseTable
from cocoon_net.dhcp.model import ZERO_IP, DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.server import STALE_DISCOVER_SECONDS, Counters, DhcpServer
from cocoon_net.dhcp.settings import DhcpSettings
from cocoon_net.dhcp.store import LeaseStore
from cocoon_net.errors import CocoonError
from cocoon_net.node import rtnl
from cocoon_net.node.guard import Guard

A = IPv4Address
GW = A("172.20.100.1")
RELAY = A("172.20.100.250")
POOL = [A(f"172.20.100.{i}") for i in range(2, 6)]
HERE_GROUP = server_module.HERE_GROUP  # as the module has it, before a test changes it
SETTINGS = DhcpSettings(
    server_id=GW,
    subnet=IPv4Network("172.20.100.0/24"),
    router=GW,
    relay_allowed_from=frozenset({RELAY}),
)
SERVER_MAC = bytes.fromhex("0200000000fe")
VM_MAC = "02:00:00:00:00:01"
RELAY_MAC = "02:00:00:00:00:fa"
T0 = 1_000_000.0
BCAST = A("255.255.255.255")
IP = POOL[0]
IFINDEX = 7


@dataclass
class Events:
    """Everything observable, in the order it happened: ("fsync", journal text),
    ("route", ops), ("send", DHCP message)."""

    log: list[tuple[str, object]] = field(default_factory=list)
    fsync_threads: list[str] = field(default_factory=list)  # where each fsync ran

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.log]


class RecordingCounters(Counters):
    """The metrics the server reports, as ("packet", type, result), ("lease", ok),
    ("route", op, ok), ("drop", reason) and ("gate", "closed" or "opened"); and apart, in
    `reads`, how many frames each read of the socket took."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []
        self.reads: list[int] = []

    def packet(self, mtype: str, result: str) -> None:
        self.seen.append(("packet", mtype, result))

    def drop(self, reason: str) -> None:
        self.seen.append(("drop", reason))

    def lease(self, ok: bool) -> None:
        self.seen.append(("lease", ok))

    def route(self, op: str, ok: bool) -> None:
        self.seen.append(("route", op, ok))

    def gate_closed(self) -> None:
        self.seen.append(("gate", "closed"))

    def gate_opened(self, seconds_closed: float) -> None:
        self.seen.append(("gate", "opened"))

    def read(self, frames: int) -> None:
        self.reads.append(frames)


class RecordingRoutes(rtnl.RouteSocket):
    """A route socket that records its batches instead of talking to the kernel."""

    def __init__(self, events: Events, fail: bool = False) -> None:  # no netlink socket
        self.events, self.fail = events, fail

    def apply(self, ops: object, ifindex: int) -> dict[rtnl.RouteOp, str]:
        batch = list(cast("list[rtnl.RouteOp]", ops))
        assert ifindex == IFINDEX
        self.events.log.append(("route", batch))
        return dict.fromkeys(batch, "Network is unreachable") if self.fail else {}


class RecordingGuard(Guard):
    """A VM guard that records its updates (the elements wanted) instead of talking to
    nftables, or fails them."""

    def __init__(self, events: Events, fail: bool = False) -> None:  # no nftables
        self.events, self.fail = events, fail
        self.elements: dict[IPv4Address, str] = {}

    def update(self, wanted: Mapping[IPv4Address, str | None]) -> None:
        self.events.log.append(("guard", dict(wanted)))
        if self.fail:
            raise CocoonError("nftables: No buffer space available")
        self.elements.update({ip: mac for ip, mac in wanted.items() if mac is not None})


class RecordingSocket:
    """Stands in for the packet socket (frames in, frames out) and the relay UDP socket."""

    def __init__(self, events: Events, incoming: list[bytes] | None = None) -> None:
        self.events, self.incoming = events, incoming or []
        self.sent: list[tuple[str, str]] = []  # (destination MAC or "udp", IP)
        # Kernel receive times (wall clock) of the incoming frames that have one, by frame.
        self.stamps: dict[bytes, float] = {}
        self.reads: list[str] = []  # "recvmsg" or "recv", one per frame read

    def recvmsg(self, size: int, ancsize: int) -> tuple[bytes, list[Any], int, Any]:
        if not self.incoming:
            raise BlockingIOError
        data = self.incoming.pop(0)
        self.reads.append("recvmsg")
        stamp = self.stamps.get(data)
        if stamp is None:  # no receive timestamp: as fresh as the server can tell
            return data, [], 0, None
        sec = int(stamp)
        spec = struct.pack("@qq", sec, int((stamp - sec) * 1e9))
        return data, [(socket.SOL_SOCKET, 35, spec)], 0, None

    def recv(self, size: int) -> bytes:
        if not self.incoming:
            raise BlockingIOError
        self.reads.append("recv")
        return self.incoming.pop(0)

    def send(self, frame: bytes) -> int:
        parsed = frames.parse_frame(frame, port=68)
        assert parsed is not None
        assert frame[6:12] == SERVER_MAC and parsed.src_ip == GW
        self.sent.append((frame[:6].hex(":"), str(parsed.dst_ip)))
        self.events.log.append(("send", packet.decode(parsed.payload)))
        return len(frame)

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append(("udp", f"{address[0]}:{address[1]}"))
        self.events.log.append(("send", packet.decode(data)))
        return len(data)

    def fileno(self) -> int:
        return -1


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Events]:
    """Record every fdatasync with what the journal held when it was called."""
    out = Events()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        journal = os.readlink(f"/proc/self/fd/{fd}")
        out.log.append(("fsync", Path(journal).read_text()))
        out.fsync_threads.append(threading.current_thread().name)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield out


def request(
    mtype: MessageType,
    *,
    mac: str = VM_MAC,
    ciaddr: IPv4Address = ZERO_IP,
    giaddr: IPv4Address = ZERO_IP,
    **opts: IPv4Address,
) -> DhcpMessage:
    raw: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes([mtype])}
    for name, value in opts.items():
        raw[Opt[name.upper()]] = value.packed
    return DhcpMessage(
        Op.BOOTREQUEST,
        0xBEEF,
        bytes.fromhex(mac.replace(":", "")),
        ciaddr=ciaddr,
        giaddr=giaddr,
        options=raw,
    )


def frame(msg: DhcpMessage, *, src_mac: str, src_ip: IPv4Address, dst_ip: IPv4Address) -> bytes:
    dst_mac = b"\xff" * 6 if dst_ip == A("255.255.255.255") else SERVER_MAC
    return frames.build_frame(
        bytes.fromhex(src_mac.replace(":", "")),
        dst_mac,
        src_ip,
        dst_ip,
        67 if src_ip == RELAY else 68,
        67,
        packet.encode(msg),
    )


def vm(msg: DhcpMessage, *, src_ip: IPv4Address = ZERO_IP, dst: IPv4Address = BCAST) -> bytes:
    return frame(msg, src_mac=VM_MAC, src_ip=src_ip, dst_ip=dst)


def relayed(msg: DhcpMessage) -> bytes:
    return frame(msg, src_mac=RELAY_MAC, src_ip=RELAY, dst_ip=GW)


DISCOVER = vm(request(MessageType.DISCOVER))
SELECT = vm(request(MessageType.REQUEST, requested_ip=IP, server_id=GW))
RENEW = vm(request(MessageType.REQUEST, ciaddr=IP), src_ip=IP, dst=GW)
REBIND = vm(request(MessageType.REQUEST, ciaddr=IP), src_ip=IP)

# Every way a REQUEST binds an address anew (a Grant), each after the exchange that makes it
# legal: (frames before, the REQUEST).
NEW_GRANTS: dict[str, tuple[list[bytes], bytes]] = {
    "selecting": ([DISCOVER], SELECT),
    "renewing-a-lost-lease": ([], RENEW),
    "rebinding-a-lost-lease": ([], REBIND),
    "relayed": (
        [relayed(request(MessageType.DISCOVER, giaddr=RELAY))],
        relayed(request(MessageType.REQUEST, giaddr=RELAY, requested_ip=IP, server_id=GW)),
    ),
}
# And every way it extends a lease the client holds (a Renew).
RENEWALS: dict[str, tuple[list[bytes], bytes]] = {
    "init-reboot": ([DISCOVER, SELECT], vm(request(MessageType.REQUEST, requested_ip=IP))),
    "renewing": ([DISCOVER, SELECT], RENEW),
    "rebinding": ([DISCOVER, SELECT], REBIND),
}
GRANTS = NEW_GRANTS | RENEWALS


@dataclass
class Rig:
    server: DhcpServer
    store: LeaseStore
    events: Events
    counters: RecordingCounters
    commit_path: str = "here"

    def feed(self, *data: bytes) -> None:
        """Frames arrive on the packet socket; wait until everything they caused is done."""
        sock = cast("RecordingSocket", self.server._packet_sock)
        sock.incoming.extend(data)

        async def run() -> None:
            self.server._on_frames()
            await self.server.drain()

        asyncio.run(run())


def rig(tmp_path: Path, events: Events, *, routes_fail: bool = False) -> Iterator[Rig]:
    store = LeaseStore(tmp_path / "leases.json", clock=lambda: T0)
    store.open()
    deadline = time.monotonic() + 5
    while not store._idle and time.monotonic() < deadline:  # the writer waits for work
        time.sleep(0.001)
    table = LeaseTable(POOL)
    counters = RecordingCounters()
    server = DhcpServer(
        counters=counters,
        bridge="cni0",
        settings=SETTINGS,
        table=table,
        store=store,
        routes=RecordingRoutes(events, fail=routes_fail),
        clock=lambda: T0,
    )
    server._packet_sock = cast("object", RecordingSocket(events))  # type: ignore[assignment]
    server._udp_sock = cast("object", RecordingSocket(events))  # type: ignore[assignment]
    server.state.ifindex, server.state.mac = IFINDEX, SERVER_MAC
    try:
        yield Rig(server, store, events, counters)
    finally:
        store.close(compact=False)


# The thread each way to the disk fsyncs in.
FSYNC_THREAD = {"here": "MainThread", "writer": "lease-journal"}


@pytest.fixture(params=sorted(FSYNC_THREAD))
def commit_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a group reaches the disk: committed in the loop's thread while the journal
    writer is idle, or handed to the writer (a large group, or the writer busy: under load)."""
    if request.param == "writer":
        monkeypatch.setattr(server_module, "HERE_GROUP", 0)
    return cast("str", request.param)


@pytest.fixture
def ok(tmp_path: Path, events: Events, commit_path: str) -> Iterator[Rig]:
    for made in rig(tmp_path, events):
        made.commit_path = commit_path
        yield made


@pytest.fixture
def no_route(tmp_path: Path, events: Events, commit_path: str) -> Iterator[Rig]:
    yield from rig(tmp_path, events, routes_fail=True)


@pytest.fixture
def loaded(tmp_path: Path, events: Events, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """Every group goes through the journal writer, as under load."""
    monkeypatch.setattr(server_module, "HERE_GROUP", 0)
    for made in rig(tmp_path, events):
        made.commit_path = "writer"
        yield made


def acks(events: Events) -> list[DhcpMessage]:
    sent = [cast("DhcpMessage", m) for kind, m in events.log if kind == "send"]
    return [m for m in sent if m.message_type is MessageType.ACK]


@pytest.mark.parametrize("kind", sorted(GRANTS))
def test_every_grant_is_synced_then_routed_then_acked(ok: Rig, kind: str) -> None:
    before, grant = GRANTS[kind]
    ok.feed(*before)
    ok.events.log.clear()
    ok.counters.seen.clear()
    ok.feed(grant)
    kinds = ok.events.kinds()
    assert kinds == ["fsync", "route", "send"], kinds
    assert ok.events.fsync_threads[-1] == FSYNC_THREAD[ok.commit_path]
    journal = cast("str", ok.events.log[0][1])
    assert str(IP) in journal and VM_MAC in journal  # the fsync covered this very grant
    route = cast("list[rtnl.RouteOp]", ok.events.log[1][1])
    assert route == [rtnl.RouteOp(True, IP)]
    (ack,) = acks(ok.events)
    assert ack.yiaddr == IP
    assert ok.counters.seen == [
        ("route", "add", True),
        ("packet", "request", "ack"),
        ("lease", True),
    ]


# Where each ACK goes (RFC 2131 4.1): to the relay, to ciaddr, or to the new address.
ACK_TO = {
    "selecting": (VM_MAC, str(IP)),
    "renewing-a-lost-lease": (VM_MAC, str(IP)),
    "rebinding-a-lost-lease": (VM_MAC, str(IP)),
    "relayed": ("udp", f"{RELAY}:67"),
    "init-reboot": (VM_MAC, str(IP)),
    "renewing": (VM_MAC, str(IP)),
    "rebinding": (VM_MAC, str(IP)),
}


@pytest.mark.parametrize("kind", sorted(GRANTS))
def test_each_ack_goes_where_the_rfc_says(ok: Rig, kind: str) -> None:
    before, grant = GRANTS[kind]
    ok.feed(*before)
    packets = cast("RecordingSocket", ok.server._packet_sock)
    udp = cast("RecordingSocket", ok.server._udp_sock)
    packets.sent.clear()
    udp.sent.clear()
    ok.feed(grant)
    assert packets.sent + udp.sent == [ACK_TO[kind]]


def test_a_broadcast_flag_gets_a_broadcast_reply(ok: Rig) -> None:
    flagged = replace(request(MessageType.DISCOVER), flags=0x8000)
    ok.feed(vm(flagged))
    assert cast("RecordingSocket", ok.server._packet_sock).sent == [
        ("ff:ff:ff:ff:ff:ff", "255.255.255.255")
    ]


def test_a_frame_whose_sender_is_not_its_chaddr_is_dropped(ok: Rig) -> None:
    ok.feed(frame(request(MessageType.DISCOVER), src_mac=RELAY_MAC, src_ip=ZERO_IP, dst_ip=BCAST))
    assert ok.events.log == []
    assert ok.counters.seen == [
        ("drop", "chaddr_mismatch"),
        ("packet", "discover", "chaddr_mismatch"),
    ]


def test_a_malformed_frame_is_counted_and_dropped(ok: Rig) -> None:
    good = vm(request(MessageType.DISCOVER))
    ok.feed(good[: 14 + 20 + 8 + 100])
    assert ok.events.log == []
    assert ok.counters.seen == [("drop", "bad_ip_header")]  # IP length past the frame


@pytest.mark.parametrize("kind", sorted(NEW_GRANTS))
def test_no_ack_leaves_when_the_route_cannot_be_installed(no_route: Rig, kind: str) -> None:
    before, grant = NEW_GRANTS[kind]
    no_route.feed(*before)
    no_route.events.log.clear()
    no_route.counters.seen.clear()
    no_route.feed(grant)
    assert "send" not in no_route.events.kinds()
    assert no_route.events.kinds() == ["fsync", "route"]
    assert no_route.counters.seen == [
        ("route", "add", False),
        ("packet", "request", "route_failed"),
        ("lease", False),
    ]


@pytest.mark.parametrize("kind", sorted(GRANTS))
def test_no_route_and_no_ack_when_the_fsync_fails(
    ok: Rig, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, grant = GRANTS[kind]
    ok.feed(*before)
    ok.events.log.clear()

    def broken(fd: int) -> None:
        ok.events.log.append(("fsync-failed", fd))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    ok.counters.seen.clear()
    ok.feed(grant)
    assert ok.events.kinds() == ["fsync-failed"]
    assert ok.store.stats().failed
    assert ok.counters.seen == [("packet", "request", "store_failed"), ("lease", False)]


def test_an_offer_needs_nothing_durable_and_leaves_at_once(ok: Rig) -> None:
    ok.feed(vm(request(MessageType.DISCOVER)))
    assert ok.events.kinds() == ["send"]
    sent = cast("DhcpMessage", ok.events.log[0][1])
    assert sent.message_type is MessageType.OFFER
    assert ok.counters.seen == [("packet", "discover", "offer")]


def test_a_decline_is_synced_and_its_route_removed_with_no_reply(ok: Rig) -> None:
    ok.feed(DISCOVER, SELECT)
    ok.events.log.clear()
    ok.counters.seen.clear()
    ok.feed(vm(request(MessageType.DECLINE, requested_ip=IP, server_id=GW)))
    assert ok.counters.seen == [
        ("drop", "declined"),
        ("packet", "decline", "declined"),
        ("route", "del", True),
    ]
    assert ok.events.kinds() == ["fsync", "route"]
    journal = cast("str", ok.events.log[0][1])
    assert "quarantine" in journal
    assert ok.events.log[1][1] == [rtnl.RouteOp(False, IP)]


def test_one_wake_up_is_one_commit_and_one_route_batch(ok: Rig) -> None:
    other = "02:00:00:00:00:02"
    two = [
        RENEW,
        frame(
            request(MessageType.REQUEST, mac=other, ciaddr=POOL[1]),
            src_mac=other,
            src_ip=POOL[1],
            dst_ip=GW,
        ),
    ]
    ok.feed(*two)
    assert ok.events.kinds() == ["fsync", "route", "send", "send"]
    assert sorted(m.yiaddr for m in acks(ok.events)) == POOL[:2]


def test_a_group_of_the_largest_size_committed_here_is_committed_here(ok: Rig) -> None:
    """HERE_GROUP grants in one wake-up (the renewal and one per other pool address) are
    still committed on the loop's thread; past that size they go to the writer."""
    assert len(POOL) == HERE_GROUP
    others = [(f"02:00:00:00:00:{i + 2:02x}", POOL[i]) for i in range(1, len(POOL))]
    group = [RENEW] + [
        frame(request(MessageType.REQUEST, mac=m, ciaddr=ip), src_mac=m, src_ip=ip, dst_ip=GW)
        for m, ip in others
    ]
    ok.feed(*group)
    assert ok.events.kinds()[:2] == ["fsync", "route"]
    assert ok.events.fsync_threads == [FSYNC_THREAD[ok.commit_path]]
    assert sorted(m.yiaddr for m in acks(ok.events)) == POOL


def test_an_offer_leaves_at_once_and_a_grant_waits_for_the_disk(ok: Rig) -> None:
    assert ok.server.handle_frame(DISCOVER) is None
    assert ok.events.kinds() == ["send"]
    durable = ok.server.handle_frame(SELECT)
    assert durable is not None
    assert ok.events.kinds() == ["send"]  # the ACK waits for the commit and the route


def test_a_flood_from_one_mac_is_rate_limited(ok: Rig) -> None:
    ok.feed(*[DISCOVER] * (SETTINGS.rate_burst + 5))
    assert ("drop", "rate_limited") in ok.counters.seen
    assert ok.events.kinds().count("send") <= SETTINGS.rate_burst


def test_routes_are_not_touched_while_unbound_and_count_as_failed(ok: Rig) -> None:
    ok.server._packet_sock = None
    assert ok.server.sync_routes({IP}) == {IP}
    assert ok.server.sync_routes(set()) == set()
    assert ok.events.log == []


def test_a_route_socket_error_fails_every_route_of_the_batch(
    tmp_path: Path, events: Events
) -> None:
    class Broken(RecordingRoutes):
        def apply(self, ops: object, ifindex: int) -> dict[rtnl.RouteOp, str]:
            raise CocoonError("netlink socket closed")

    for r in rig(tmp_path, events):
        r.server.routes = Broken(events)
        r.feed(DISCOVER)
        events.log.clear()
        r.counters.seen.clear()
        r.feed(SELECT)
        assert events.kinds() == ["fsync"]
        assert r.counters.seen == [
            ("route", "add", False),
            ("packet", "request", "route_failed"),
            ("lease", False),
        ]


OTHER = "02:00:00:00:00:02"


def other_renew(ip: IPv4Address) -> bytes:
    msg = request(MessageType.REQUEST, mac=OTHER, ciaddr=ip)
    return frame(msg, src_mac=OTHER, src_ip=ip, dst_ip=GW)


def test_a_failed_commit_fails_every_grant_of_its_batch(
    ok: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    ok.feed(RENEW, other_renew(POOL[1]))
    assert ok.counters.seen == [("packet", "request", "store_failed"), ("lease", False)] * 2


def test_a_failed_route_withholds_only_its_own_ack(tmp_path: Path, events: Events) -> None:
    class FailsFirst(RecordingRoutes):
        def apply(self, ops: object, ifindex: int) -> dict[rtnl.RouteOp, str]:
            batch = list(cast("list[rtnl.RouteOp]", ops))
            self.events.log.append(("route", batch))
            return {op: "No buffer space" for op in batch if op.ip == POOL[0]}

    for r in rig(tmp_path, events):
        r.server.routes = FailsFirst(events)
        r.feed(RENEW, other_renew(POOL[1]))
        assert [m.yiaddr for m in acks(events)] == [POOL[1]]


def test_a_plain_drop_leaves_nothing_to_persist(ok: Rig) -> None:
    stranger = frame(request(MessageType.DISCOVER), src_mac=OTHER, src_ip=ZERO_IP, dst_ip=BCAST)
    assert ok.server.handle_frame(stranger) is None


def test_a_bootp_request_is_counted_as_bootp(ok: Rig) -> None:
    bootp = replace(request(MessageType.DISCOVER), options={})
    ok.feed(vm(bootp))
    assert ok.counters.seen == [("drop", "no_message_type"), ("packet", "bootp", "no_message_type")]


def test_pool_exhaustion_is_noted_when_it_starts(ok: Rig) -> None:
    for n in range(len(POOL)):
        mac = f"02:00:00:00:01:{n:02x}"
        ok.feed(frame(request(MessageType.DISCOVER, mac=mac), src_mac=mac, src_ip=ZERO_IP,
                      dst_ip=BCAST))  # fmt: skip
    assert ok.server.state.exhausted_since is None
    ok.feed(DISCOVER)
    assert ("drop", "pool_exhausted") in ok.counters.seen
    assert ok.server.state.exhausted_since == T0


def test_a_decline_ahead_in_the_batch_does_not_hold_back_a_later_ack(ok: Rig) -> None:
    ok.feed(DISCOVER, SELECT)
    ok.events.log.clear()
    decline = vm(request(MessageType.DECLINE, requested_ip=IP, server_id=GW))
    ok.feed(decline, other_renew(POOL[1]))
    assert [m.yiaddr for m in acks(ok.events)] == [POOL[1]]


def test_a_group_decided_during_an_fsync_is_committed_before_the_last_groups_routes(
    loaded: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one group's fsync runs, new decisions wait; once it is on disk they go to the
    writer as the next group before that group's routes, and each ACK still waits for its own
    fsync and route."""
    real = os.fdatasync
    release = threading.Event()
    in_fsync = threading.Event()

    def held(fd: int) -> None:
        in_fsync.set()
        release.wait(5)
        real(fd)  # the recording one

    monkeypatch.setattr(os, "fdatasync", held)
    routes = cast("RecordingRoutes", loaded.server.routes)
    waiting_at_route: list[int] = []
    plain_apply = routes.apply

    def apply(ops: object, ifindex: int) -> dict[rtnl.RouteOp, str]:
        waiting_at_route.append(len(loaded.server.state.pending))
        return plain_apply(ops, ifindex)

    monkeypatch.setattr(routes, "apply", apply)
    sock = cast("RecordingSocket", loaded.server._packet_sock)

    async def run() -> None:
        sock.incoming.append(RENEW)
        loaded.server._on_frames()
        await asyncio.get_running_loop().run_in_executor(None, in_fsync.wait, 5)
        sock.incoming.append(other_renew(POOL[1]))
        loaded.server._on_frames()  # decided now; committed once the first group is on disk
        assert len(loaded.server.state.tasks) == 1 and len(loaded.server.state.pending) == 1
        release.set()
        await loaded.server.drain()

    asyncio.run(run())
    assert waiting_at_route == [0, 0]  # the second group had left before the first's routes
    log = loaded.events.log
    fsyncs = [i for i, (kind, _) in enumerate(log) if kind == "fsync"]
    assert len(fsyncs) == 2 and OTHER not in cast("str", log[fsyncs[0]][1])
    assert OTHER in cast("str", log[fsyncs[1]][1])
    routed = [cast("list[rtnl.RouteOp]", m) for kind, m in log if kind == "route"]
    assert routed == [[rtnl.RouteOp(True, POOL[0])], [rtnl.RouteOp(True, POOL[1])]]
    for ip in POOL[:2]:
        ack = next(i for i, (k, m) in enumerate(log) if k == "send" and m.yiaddr == ip)  # type: ignore[attr-defined]
        route = next(i for i, (k, m) in enumerate(log) if k == "route" and m[0].ip == ip)  # type: ignore[index]
        fsync = next(i for i in fsyncs if str(ip) in cast("str", log[i][1]))
        assert fsync < route < ack


def test_late_frames_are_read_with_their_age_until_one_is_fresh(ok: Rig) -> None:
    """A late DISCOVER is shed and a late REQUEST served; after the first fresh frame the rest
    of the queue, younger still, is read without timestamps."""
    sock = cast("RecordingSocket", ok.server._packet_sock)
    now = time.time()
    late_discover, late_select, fresh = DISCOVER, SELECT, other_renew(POOL[1])
    sock.stamps = {
        late_discover: now - 2 * STALE_DISCOVER_SECONDS,
        late_select: now - 2 * STALE_DISCOVER_SECONDS,
        fresh: now,
    }
    ok.server.table.offer(VM_MAC, T0, None)  # the SELECT's address is offered
    ok.feed(late_discover, late_select, fresh, RENEW)
    assert sock.reads == ["recvmsg", "recvmsg", "recvmsg", "recv"]
    assert ("drop", "stale_discover") in ok.counters.seen
    # The late SELECT, the fresh REQUEST and the RENEW behind it are all answered.
    assert sorted(m.yiaddr for m in acks(ok.events)) == [POOL[0], POOL[0], POOL[1]]


def test_frames_queued_since_the_queue_was_seen_empty_are_read_without_timestamps(
    ok: Rig,
) -> None:
    """Every frame in the queue arrived after the last wake-up found it empty: when that was
    less than the shedding age ago, none can be late, and no timestamp is read."""
    sock = cast("RecordingSocket", ok.server._packet_sock)
    ok.feed(DISCOVER)  # the first wake-up: the head is read with its age
    assert sock.reads == ["recvmsg"]
    ok.feed(SELECT, RENEW)  # the queue was found empty a moment ago
    assert sock.reads == ["recvmsg", "recv", "recv"]
    assert len(acks(ok.events)) == 2
    # Found empty longer ago than a DISCOVER may wait: the head's age is read again.
    ok.server.state.drained_at -= STALE_DISCOVER_SECONDS
    late = frame(request(MessageType.DISCOVER, mac=OTHER), src_mac=OTHER, src_ip=ZERO_IP,
                 dst_ip=BCAST)  # fmt: skip
    sock.stamps = {late: time.time() - 2 * STALE_DISCOVER_SECONDS}
    ok.feed(late)
    assert sock.reads[3:] == ["recvmsg"]
    assert ("drop", "stale_discover") in ok.counters.seen


@pytest.mark.parametrize("kind", sorted(NEW_GRANTS))
def test_with_a_guard_every_grant_is_synced_routed_and_guarded_before_its_ack(
    ok: Rig, kind: str
) -> None:
    ok.server.guard = RecordingGuard(ok.events)
    before, grant = NEW_GRANTS[kind]
    ok.feed(*before)
    ok.events.log.clear()
    ok.feed(grant)
    assert ok.events.kinds() == ["fsync", "route", "guard", "send"]
    assert ok.events.log[2][1] == {IP: VM_MAC}  # the VM's MAC may use its address
    (ack,) = acks(ok.events)
    assert ack.yiaddr == IP


@pytest.mark.parametrize("kind", sorted(NEW_GRANTS))
def test_no_ack_leaves_when_the_guard_cannot_be_updated(ok: Rig, kind: str) -> None:
    ok.server.guard = RecordingGuard(ok.events, fail=True)
    before, grant = NEW_GRANTS[kind]
    ok.feed(*before)
    ok.events.log.clear()
    ok.counters.seen.clear()
    ok.feed(grant)
    assert ok.events.kinds() == ["fsync", "route", "guard"]
    assert ok.counters.seen == [
        ("route", "add", True),
        ("packet", "request", "guard_failed"),
        ("lease", False),
    ]


def test_after_a_failed_commit_later_grants_are_refused_at_once(
    ok: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fails for good: a grant decided afterwards is not even handed to it, and
    is counted as unanswered for that reason."""

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    ok.feed(RENEW)
    ok.counters.seen.clear()
    ok.feed(other_renew(POOL[1]))
    assert ok.counters.seen == [("packet", "request", "store_failed"), ("lease", False)]
    assert "send" not in ok.events.kinds() and "route" not in ok.events.kinds()


def test_a_lone_grant_the_busy_writer_refuses_is_handed_to_the_writer(
    tmp_path: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's own commit (an expiry, say) holds the journal writer in its fdatasync when
    a lone REQUEST arrives: the loop's thread may not write then, so the grant goes to the
    writer, and its ACK leaves once it is on disk, with no further packet to wake the loop."""
    real = os.fdatasync
    entered, gate = threading.Semaphore(0), threading.Semaphore(0)

    def held(fd: int) -> None:
        entered.release()
        assert gate.acquire(timeout=30)
        real(fd)

    async def run(made: Rig) -> None:
        monkeypatch.setattr(os, "fdatasync", held)
        own = made.store.submit([Record.hold(POOL[3], T0 + 60)])
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, entered.acquire, True, 30)
        cast("RecordingSocket", made.server._packet_sock).incoming.append(RENEW)
        made.server._on_frames()  # refused here: the writer is busy
        gate.release()  # the daemon's own commit
        assert await loop.run_in_executor(None, entered.acquire, True, 30)
        gate.release()  # the grant's
        await own
        await made.server.drain()

    for made in rig(tmp_path, events):  # commits here while the writer is idle
        asyncio.run(run(made))
    assert [ack.yiaddr for ack in acks(events)] == [IP]
    assert events.fsync_threads == ["lease-journal", "lease-journal"]
