"""The DHCP server's I/O: frames in, policy, durable changes, routes, frames out.

Requests are read at layer 2 from a packet socket on the bridge (as Kea does), so the server
sees each frame's Ethernet source and the policy can refuse a chaddr that is not the sender's.
Replies leave as layer-2 frames too: a client without an address yet is reached by unicast
to its MAC, with no ARP entry needed. Relayed requests (from relays the operator allowed) are
answered through a UDP socket bound to the gateway's port 67; that socket also keeps the
kernel from answering unicast renewals with ICMP port-unreachable.

Order for a REQUEST that binds an address: the table decides at once (one thread, so no two
requests can take the same address), the journal records are fsync'ed (group commit), the
/32 route is installed and the guard lets the VM's MAC use the address (node/guard.py), and
only then does the ACK leave. A failure at any step sends nothing:
the client retries, and the periodic route reconcile repairs the kernel.

Pipeline: decisions that need the disk wait in one list. A single flusher task commits what the
list holds as one group; while that fsync runs, the loop keeps reading and deciding, and what
it decides forms the next group, handed to the journal writer as soon as the previous group is
on disk, before that group's routes, guard update and replies. So the disk, the route and guard
batches and the replies all work per group, and the group grows with the load. A small group
found with nothing in flight and the journal writer idle (a low rate) is committed in the
loop's own thread instead (_commit_here): same order, without the hand-off to the writer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, NamedTuple

from cocoon_net import config
from cocoon_net.dhcp import effects, frames, packet, policy
from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.leases import Change, LeaseTable
from cocoon_net.dhcp.model import ZERO_IP, MessageType, Opt
from cocoon_net.dhcp.ratelimit import RateLimiter
from cocoon_net.dhcp.settings import DhcpSettings
from cocoon_net.dhcp.store import LeaseStore
from cocoon_net.errors import CocoonError
from cocoon_net.node import nic, rtnl
from cocoon_net.node.guard import Guard

log = logging.getLogger("cocoon_net.dhcp")

BROADCAST_MAC = b"\xff" * 6
_READ_BATCH = 64  # frames handled per wake-up before yielding to other tasks
_SO_BINDTODEVICE = 25
_SO_TIMESTAMPNS = 35  # asm-generic/socket.h; the socket module does not export it
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
_SOL_PACKET = 263
_PACKET_STATISTICS = 6  # struct tpacket_stats; reading it resets the counters
_SO_MEMINFO = 55  # its first two u32: SK_MEMINFO_RMEM_ALLOC (bytes queued), SK_MEMINFO_RCVBUF
_MEMINFO = struct.Struct("@II")
_DISCOVER = int(MessageType.DISCOVER)
_MESSAGE_TYPE = int(Opt.MESSAGE_TYPE)  # a plain int: an enum member is slow to look up
# What a decision without changes makes durable; shared, and never changed by its readers.
_NOTHING_DURABLE: tuple[list[Record], set[IPv4Address]] = ([], set())
# Decisions in a group that may be committed in the loop's own thread (_commit_here): a
# group this small comes from a wake-up that found little to do, so the loop has time for
# the fsync; a larger one means load, and its fsync overlaps the next decisions instead.
HERE_GROUP = 4

# Overload: a request that waited in the receive queue this long tells that the server is
# behind. An OFFER then only adds a REQUEST to a queue that is already too long, while the
# REQUESTs in it complete exchanges already under way: a late DISCOVER is dropped unread (its
# client sends another), so past capacity the work goes to finishing exchanges and goodput
# stays at capacity instead of collapsing under a backlog of exchanges nobody can finish.
STALE_DISCOVER_SECONDS = 0.25
# Any request older than this is dropped unread: RFC 2131 §4.1 clients retransmit after 4 s
# (+-1), so by then a reply answers a message its client has already replaced.
STALE_REQUEST_SECONDS = 3.0
# The DISCOVER gate. Shedding a late DISCOVER in Python still costs its read, and past twice
# the server's capacity the queue fills faster than DISCOVERs get late: the kernel then drops
# at the tail whatever comes, REQUESTs too, each one an OFFER made for nothing. So once the
# queue is deep (gate_closes) the socket's filter is swapped for one that drops DISCOVERs in
# the kernel (frames.BPF_DHCP_SERVER_NO_DISCOVER), at no cost to this process; the REQUESTs of
# the exchanges already under way keep the room. It opens again once the queue is down to a
# quarter (gate_opens). A client whose DISCOVER was dropped sends another (RFC 2131 §4.1), as
# it would after a drop anywhere on its way.
GATE_LOG_SECONDS = 60.0  # an overload is logged at most this often; the metrics count each
# Read pacing. At a moderate rate each request is a wake-up of its own, and an idle Python
# process wakes with cold caches: the wake-up, not the decision, was most of what a request
# cost (at 1,000 DORA/s, about twice the CPU of the same work done back to back). So while
# requests keep coming the socket is read at most once per READ_INTERVAL, and each read takes
# what queued meanwhile: one wake-up, one journal write and fsync, one route and guard batch
# for all of it, as a NIC's interrupt moderation does for the kernel. The price is at most
# this much added to a reply, against the seconds a DHCP client waits (RFC 2131 §4.1). A
# request after a quiet interval is read at once, and a read that stopped at a full batch is
# followed by the next at once: pacing never lets the queue grow under load.
READ_INTERVAL = config.DEFAULT_READ_INTERVAL_MS / 1000


def next_read_at(started: float, frames_read: int, drained: bool, interval: float) -> float | None:
    """When to read the socket again after a read that began at `started` (monotonic) and
    took `frames_read` frames: `started + interval` when it read some and emptied the queue
    (more are likely on their way, and they will wait together), or None to read as soon as
    a frame is queued (nothing came; or the read stopped at a full batch with more queued,
    where waiting would only lengthen the queue; or pacing is off)."""
    if interval <= 0 or frames_read == 0 or not drained:
        return None
    return started + interval


def gate_closes(queued: int, limit: int, stale_discovers: int) -> bool:
    """Whether to stop the kernel queueing new DISCOVERs, after a full batch of reads: the
    receive queue holds `queued` bytes of its `limit` (half is left for the REQUESTs behind
    them), or `stale_discovers` of the batch waited past STALE_DISCOVER_SECONDS while more
    is queued. Never with nothing queued: what is queued when the gate closes wakes the
    server to read on until the queue is short (gate_opens), which opens it again; with
    nothing, no DISCOVER would ever come to wake it."""
    return queued > 0 and (stale_discovers > 0 or 2 * queued >= limit)


def gate_opens(queued: int, limit: int) -> bool:
    """Whether to let DISCOVERs queue again, after a full batch of reads while the gate is
    closed: the queue is down to a quarter of its `limit`. Not only once it is empty: a
    server that reads its queue to the end before new clients may queue has, for a moment,
    nothing to do while they keep coming, and when a storm ends it holds no exchanges left
    to complete. A quarter is work for about a tenth of a second, so a DISCOVER let in now is
    read well within STALE_DISCOVER_SECONDS."""
    return 4 * queued < limit


def shed_reason(age: float, frame: bytes) -> str | None:
    """Why a request frame that waited `age` seconds in the receive queue is dropped unread,
    or None to serve it. Only a late frame is looked into, and only for its option 53."""
    if age < STALE_DISCOVER_SECONDS:
        return None
    if age >= STALE_REQUEST_SECONDS:
        return "stale_request"
    return "stale_discover" if _peek_type(frame) == _DISCOVER else None


class _Durable(NamedTuple):
    """A decision whose changes must be on disk (and routed) before its reply may leave.
    A named tuple: one is built per grant, in one step."""

    changes: tuple[Change, ...]
    reply: policy.Reply | None
    type_name: str
    records: list[Record]
    touched: set[IPv4Address]


@dataclass(frozen=True)
class _Group:
    """Decisions committed together: one journal write, one route batch, one guard update."""

    items: list[_Durable]
    done: asyncio.Future[None] | None  # None: the store refused it at once (it has failed)


class Counters:
    """Where the server reports what it did; the daemon plugs Prometheus in here."""

    def packet(self, mtype: str, result: str) -> None:
        pass

    def drop(self, reason: str) -> None:
        pass

    def lease(self, ok: bool) -> None:
        pass

    def route(self, op: str, ok: bool) -> None:
        pass

    def gate_closed(self) -> None:
        pass

    def gate_opened(self, seconds_closed: float) -> None:
        pass

    def read(self, frames: int) -> None:
        """One read of the receive queue that took `frames` frames (at least one)."""


@dataclass
class ServerState:
    """What the server keeps beside the table: the bridge it is bound to."""

    ifindex: int = 0
    mac: bytes = b""
    exhausted_since: float | None = None  # start of the current pool-exhaustion burst
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    pending: list[_Durable] = field(default_factory=list)  # decided, not yet handed to the store
    flushing: bool = False  # the flusher task runs; it takes `pending` when it may
    # Groups handed to the store whose routes, guard update and replies have not run yet.
    in_flight: deque[_Group] = field(default_factory=deque)
    drained_at: float = -STALE_REQUEST_SECONDS  # monotonic time the queue was last seen empty
    gate_closed_at: float | None = None  # monotonic; None while the DISCOVER gate is open
    gate_logged_at: float = -GATE_LOG_SECONDS  # monotonic time an overload was last logged
    # Read pacing: while `read_timer` is set, the socket's reader is off and the timer reads.
    read_timer: asyncio.TimerHandle | None = None


class DhcpServer:
    def __init__(
        self,
        *,
        bridge: str,
        settings: DhcpSettings,
        table: LeaseTable,
        store: LeaseStore,
        routes: rtnl.RouteSocket,
        guard: Guard | None = None,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.time,
        read_interval: float = READ_INTERVAL,
    ) -> None:
        self.bridge = bridge
        self.settings = settings
        self.table = table
        self.store = store
        self.routes = routes
        self.guard = guard
        self.counters = counters or Counters()
        self.clock = clock
        self.read_interval = read_interval
        self.limiter = RateLimiter.from_settings(settings)
        self.state = ServerState()
        self._packet_sock: socket.socket | None = None
        self._udp_sock: socket.socket | None = None
        self._framer_cache: frames.Framer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ sockets

    @property
    def bound(self) -> bool:
        return self._packet_sock is not None

    def open(self) -> None:
        """Bind to the bridge as it is now (called again after the bridge was recreated)."""
        self.close_sockets()
        self._loop = asyncio.get_running_loop()
        ifindex = rtnl.ifindex(self.bridge)
        if ifindex is None:
            raise CocoonError(f"bridge {self.bridge} does not exist")
        mac = _link_mac(self.bridge)
        sock = frames.open_server_socket(self.bridge)
        _grow_receive_buffer(sock)
        # The kernel's receive time of each frame: how long it waited for us (shed_reason).
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.bridge.encode())
            udp.bind((str(self.settings.server_id), policy.SERVER_PORT))
        except OSError as exc:
            sock.close()
            udp.close()
            raise CocoonError(
                f"cannot bind {self.settings.server_id}:67 on {self.bridge}: "
                f"{exc.strerror or exc} (is another DHCP server running?)"
            ) from None
        udp.setblocking(False)
        self._packet_sock, self._udp_sock = sock, udp
        self.state.ifindex, self.state.mac = ifindex, mac
        self.state.gate_closed_at = None  # a new socket takes DISCOVERs
        self._loop.add_reader(sock.fileno(), self._on_frames)
        self._loop.add_reader(udp.fileno(), self._drain_udp)
        log.info("serving DHCP on %s (index %d)", self.bridge, ifindex)

    def close_sockets(self) -> None:
        self._stop_read_timer()
        for sock in (self._packet_sock, self._udp_sock):
            if sock is None:
                continue
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._packet_sock = self._udp_sock = None

    async def drain(self) -> None:
        """Stop reading requests and wait for those in flight (commit, route, reply) to finish.

        The sockets stay open until close_sockets(): a request already made durable still
        gets its route and its ACK during a graceful stop.
        """
        self._stop_read_timer()
        if self._loop is not None:
            for sock in (self._packet_sock, self._udp_sock):
                if sock is not None:
                    self._loop.remove_reader(sock.fileno())
        while self.state.tasks:
            await asyncio.gather(*list(self.state.tasks), return_exceptions=True)

    def _drain_udp(self) -> None:
        # Unicast renewals arrive here as well as on the packet socket, which handles them.
        assert self._udp_sock is not None
        for _ in range(_READ_BATCH):
            try:
                self._udp_sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def _on_frames(self) -> None:
        started = time.monotonic()
        frames_read, drained = 0, False
        try:
            frames_read, drained = self._read_frames(self.state.pending)
        finally:
            # Whatever happened, the socket is read again: by the timer or by its reader (a
            # read that failed counts as one that found nothing). A timer left fired with
            # the reader off would leave the socket unread for good.
            self._pace(next_read_at(started, frames_read, drained, self.read_interval))
            if frames_read:
                self.counters.read(frames_read)
            if self.state.pending and not self.state.flushing and not self._commit_here():
                self.state.flushing = True
                self._spawn(self._flush())

    def _pace(self, read_at: float | None) -> None:
        """Read next at `read_at` (monotonic, by a timer, with the socket's reader off), or
        when the next frame is queued (None: the reader on)."""
        loop, sock = self._loop, self._packet_sock
        if loop is None or sock is None:
            return
        timer = self.state.read_timer
        if read_at is None or read_at <= time.monotonic():
            if timer is not None:
                timer.cancel()
                self.state.read_timer = None
                loop.add_reader(sock.fileno(), self._on_frames)
            return
        if timer is None:
            loop.remove_reader(sock.fileno())
        else:
            timer.cancel()
        # The loop's clock is time.monotonic() too (asyncio's loop.time()).
        self.state.read_timer = loop.call_at(read_at, self._on_frames)

    def _stop_read_timer(self) -> None:
        """No more timed reads; whoever stops them also sees to the reader."""
        if self.state.read_timer is not None:
            self.state.read_timer.cancel()
            self.state.read_timer = None

    def _commit_here(self) -> bool:
        """Commit a small group with nothing else in flight without leaving this callback:
        the journal write and fsync in this thread, then routes, guard and replies. At a low
        rate each REQUEST is a group of its own, and the hand-off to the journal writer and
        back costs more CPU than the fsync. False when the writer is busy or the group is
        large: then its fsync should overlap the decisions that follow (_flush)."""
        items = self.state.pending
        if len(items) > HERE_GROUP:
            return False
        try:
            if not self.store.commit_here([record for item in items for record in item.records]):
                return False
        except CocoonError as exc:
            log.debug("lease store: %s; not answering", exc)
            self.state.pending = []
            self._not_durable(items)
            return True
        self.state.pending = []
        self._complete(items)
        return True

    def _read_frames(self, batch: list[_Durable]) -> tuple[int, bool]:
        """Read and decide up to a batch of queued frames: (how many were read, whether the
        queue was read to its end)."""
        sock = self._packet_sock
        if sock is None:
            return 0, False
        # The queue is in arrival order, so once one frame is fresh, so is every frame behind
        # it: those are read with recv(), which skips the timestamp and the sender address
        # (for a packet socket, Python looks the interface name up with an ioctl per call).
        # And every frame queued now came after the queue was last found empty: if that was
        # recently enough, even the first is fresh.
        fresh = time.monotonic() - self.state.drained_at < STALE_DISCOVER_SECONDS
        stale_discovers = 0
        for frames_read in range(_READ_BATCH):
            try:
                if fresh:
                    data = sock.recv(4096)
                else:
                    data, ancillary, _flags, _addr = sock.recvmsg(4096, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                self.state.drained_at = time.monotonic()
                if self.state.gate_closed_at is not None:
                    self._open_gate(sock)
                return frames_read, True
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    log.warning("bridge %s went away: %s", self.bridge, exc.strerror)
                    self.close_sockets()
                    return frames_read, False
                raise
            if not fresh:
                age = 0.0
                if ancillary:
                    sec, nsec = _TIMESPEC.unpack_from(ancillary[0][2])
                    # The wall clock, as the kernel stamps: never self.clock, which a test may
                    # move.
                    age = time.time() - sec - nsec / 1e9
                fresh = age < STALE_DISCOVER_SECONDS
                reason = shed_reason(age, data)
                if reason is not None:
                    self.counters.drop(reason)
                    stale_discovers += reason == "stale_discover"
                    continue
            try:
                durable = self.handle_frame(data)
            except Exception:  # a bug must cost one packet, never the server
                self.counters.drop("internal_error")
                log.exception("internal error handling a packet; dropped it")
                continue
            if durable is not None:
                batch.append(durable)
        # A full batch means more is queued: report what the kernel dropped for a full
        # receive buffer since the last look (rarely asked: only when the queue is deep).
        _packets, dropped = struct.unpack(
            "@II", sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        )
        for _ in range(dropped):
            self.counters.drop("receive_buffer_full")
        queued, limit = _MEMINFO.unpack(
            sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
        )
        if self.state.gate_closed_at is None:
            if gate_closes(queued, limit, stale_discovers):
                self._close_gate(sock, queued, dropped)
        elif gate_opens(queued, limit):
            # Also when this batch read the queue to its end: with no frame left to wake the
            # server and no DISCOVER let in, nothing would, and the gate would stay closed.
            self._open_gate(sock)
        return _READ_BATCH, False

    def _close_gate(self, sock: socket.socket, queued: int, dropped: int) -> None:
        """New DISCOVERs are dropped by the kernel from now until the queue is short again."""
        try:
            frames.set_filter(sock, discovers=False)
        except OSError as exc:
            log.error("cannot shed DISCOVERs in the kernel: %s", exc.strerror or exc)
            return
        now = time.monotonic()
        self.state.gate_closed_at = now
        self.counters.gate_closed()
        if now - self.state.gate_logged_at >= GATE_LOG_SECONDS:
            self.state.gate_logged_at = now
            log.warning(
                "overloaded: %d bytes of requests queued, %d dropped for a full queue; new "
                "DISCOVERs are dropped in the kernel until the queue is short again, REQUESTs are "
                "still served (logged at most once a minute, "
                "cocoon_net_dhcp_discover_gate_closed_total counts every time)",
                queued, dropped,
            )  # fmt: skip

    def _open_gate(self, sock: socket.socket) -> None:
        closed_at = self.state.gate_closed_at
        assert closed_at is not None
        try:
            frames.set_filter(sock, discovers=True)
        except OSError as exc:
            # Left as it is, the socket would refuse new clients for good: closed instead,
            # it is opened anew (with the whole filter) by the daemon's next host check.
            log.error("cannot take DISCOVERs again: %s; the DHCP socket is closed until the "
                      "next host check opens it", exc.strerror or exc)  # fmt: skip
            self.close_sockets()
            return
        self.state.gate_closed_at = None
        self.counters.gate_opened(time.monotonic() - closed_at)

    # ------------------------------------------------------------------ requests

    def handle_frame(self, data: bytes) -> _Durable | None:
        """Decide on one frame. Replies that need nothing durable leave at once; the rest
        come back to be committed, routed and then answered."""
        try:
            frame = frames.parse_frame(data)
            if frame is None:
                return None
            request = packet.decode(frame.payload)
        except packet.MalformedPacket as exc:
            self.counters.drop(exc.reason)
            log.debug("dropped malformed packet: %s", exc)
            return None
        now = self.clock()
        src_mac = frame.src_mac
        ctx = policy.RequestContext(
            # A VM's frame comes from its chaddr: the text decode() made of that is the same.
            src_mac=request.mac if src_mac == request.chaddr else src_mac.hex(":"),
            src_ip=frame.src_ip,
            dst_ip=frame.dst_ip,
            broadcast=frame.dst_mac == BROADCAST_MAC or frame.dst_ip == policy.BROADCAST_IP,
        )
        decision = policy.handle(request, ctx, self.table, self.settings, now, limiter=self.limiter)
        type_name = _TYPE_NAMES.get(request.options.get(_MESSAGE_TYPE), "bootp")
        self._note_exhaustion(decision, now)
        changes = decision.changes
        records, touched = effects.durable(changes) if changes else _NOTHING_DURABLE
        if isinstance(decision, policy.Drop):
            self.counters.drop(decision.reason)
            self.counters.packet(type_name, decision.reason)
            if records or touched:
                return _Durable(changes, None, type_name, records, touched)
            return None
        if not records and not touched:
            self._send(decision, type_name)  # OFFER, NAK, INFORM: nothing to make durable
            return None
        return _Durable(changes, decision, type_name, records, touched)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    def _submit(self) -> _Group | None:
        """Hand everything decided so far to the journal writer as one group."""
        items, self.state.pending = self.state.pending, []
        if not items:
            return None
        done: asyncio.Future[None] | None
        try:
            done = self.store.submit([record for item in items for record in item.records])
        except CocoonError as exc:
            log.debug("lease store: %s; not answering", exc)
            done = None
        group = _Group(items, done)
        self.state.in_flight.append(group)
        return group

    async def _flush(self) -> None:
        # One group on its way to the disk at a time. Once it is there, the next group goes to
        # the writer first, so that fsync overlaps this group's routes, guard and replies.
        try:
            group = self._submit()
            while group is not None:
                durable = await self._durable(group)
                following = self._submit()
                if durable:
                    self._complete(group.items)
                self.state.in_flight.popleft()
                group = following
        finally:
            self.state.flushing = False
            self.state.in_flight.clear()  # after a failure nothing still waits for its group

    def unsettled(self) -> set[IPv4Address]:
        """Addresses whose lease changed in the table but not yet on disk: their route,
        guard element and reply follow once it is (commit, fdatasync, route, guard, reply),
        so until then the kernel rightly lags the table for them."""
        out: set[IPv4Address] = set()
        for items in (self.state.pending, *(group.items for group in self.state.in_flight)):
            for item in items:
                out |= item.touched
        return out

    async def _durable(self, group: _Group) -> bool:
        if group.done is not None:
            try:
                await group.done
                return True
            except CocoonError as exc:
                log.debug("lease store: %s; not answering", exc)
        self._not_durable(group.items)
        return False

    def _not_durable(self, items: list[_Durable]) -> None:
        # The store said it once, as an error, when it failed: it fails for good.
        for item in items:
            if item.reply is not None:
                self.counters.packet(item.type_name, "store_failed")
                self.counters.lease(False)

    def _complete(self, items: list[_Durable]) -> None:
        """Routes and guard for a group on disk, then its replies."""
        touched: set[IPv4Address] = set().union(*[item.touched for item in items])
        route_failed = self.sync_routes(touched)
        guard_failed = self.sync_guard(touched)
        failed = route_failed | guard_failed
        for item in items:
            if item.reply is None:
                continue
            if failed:
                granted = effects.grants(item.changes)
                if granted & failed:
                    # No ACK for an address the VPC cannot reach or the VM may not use yet;
                    # the client retries and the reconcile loop repairs the route or guard.
                    why = "route_failed" if granted & route_failed else "guard_failed"
                    self.counters.packet(item.type_name, why)
                    self.counters.lease(False)
                    continue
            self._send(item.reply, item.type_name)

    def sync_routes(self, ips: set[IPv4Address]) -> set[IPv4Address]:
        """Make the routes of ips match the table; return the addresses that failed."""
        if not ips or not self.bound:
            return set(ips) if ips and not self.bound else set()
        now = self.clock()
        needs_route = self.table.needs_route
        ops = [rtnl.RouteOp(needs_route(ip, now), ip) for ip in sorted(ips, key=int)]
        try:
            failures = self.routes.apply(ops, self.state.ifindex)
        except CocoonError as exc:
            log.error("routes: %s", exc)
            failures = {op: str(exc) for op in ops}
        count = self.counters.route
        for op in ops:
            # Hashing an op hashes its address in Python: asked only when something failed.
            count("add" if op.add else "del", op not in failures if failures else True)
        for op, reason in failures.items():
            log.error("route %s %s/32 dev %s: %s", "add" if op.add else "del", op.ip,
                      self.bridge, reason)  # fmt: skip
        return {op.ip for op in failures}

    def sync_guard(self, ips: set[IPv4Address]) -> set[IPv4Address]:
        """Make the guard's elements of ips match the table, in one nftables transaction;
        return the addresses that failed (all of them, when it fails)."""
        if self.guard is None or not ips:
            return set()
        wanted = effects.guard_elements(self.table, self.guard.elements, ips, self.clock())
        try:
            self.guard.update(wanted)
        except CocoonError as exc:
            log.error("guard: %s", exc)
            return set(ips)
        return set()

    def _note_exhaustion(self, decision: policy.Decision, now: float) -> None:
        exhausted = isinstance(decision, policy.Drop) and decision.reason == "pool_exhausted"
        if exhausted and self.state.exhausted_since is None:
            self.state.exhausted_since = now
            stats = self.table.stats(now)
            log.warning(
                "pool exhausted: %d addresses, %d leased, %d offered, %d quarantined; new "
                "clients get no offer until one is free",
                stats.total, stats.leased, stats.offered, stats.quarantined,
            )  # fmt: skip
        elif not exhausted and isinstance(decision, policy.Reply):
            if self.state.exhausted_since is not None:
                log.info("pool has free addresses again")
            self.state.exhausted_since = None

    # ------------------------------------------------------------------ replies

    def _framer(self) -> frames.Framer:
        """The frame builder for our MAC and server address (either may change on a reload or
        a rebind)."""
        framer, server_ip = self._framer_cache, int(self.settings.server_id)
        if framer is None or framer.src_mac != self.state.mac or framer.src_ip != server_ip:
            framer = frames.Framer(self.state.mac, self.settings.server_id, policy.SERVER_PORT)
            self._framer_cache = framer
        return framer

    def _send(self, reply: policy.Reply, type_name: str) -> None:
        message = reply.message
        result = _TYPE_NAMES.get(message.options.get(_MESSAGE_TYPE), "reply")
        try:
            payload = packet.encode(message, max_size=reply.max_size)
        except (packet.MessageTooLarge, ValueError) as exc:
            log.error("reply to %s does not fit: %s", message.mac, exc)
            self.counters.packet(type_name, "too_large")
            return
        dest = reply.dest
        try:
            if self._udp_sock is None or self._packet_sock is None:
                raise OSError("not bound to the bridge")
            if dest.port == policy.SERVER_PORT:
                self._udp_sock.sendto(payload, (str(dest.ip), policy.SERVER_PORT))
            else:
                mac = dest.mac
                # Most replies go to the client's MAC: its chaddr, the bytes that text came from.
                if mac == message.mac:
                    dst_mac = message.chaddr
                else:
                    dst_mac = bytes.fromhex(mac.replace(":", ""))
                frame = self._framer().frame(dst_mac, int(dest.ip), dest.port, payload)
                self._packet_sock.send(frame)
        except OSError as exc:
            log.error("send %s to %s: %s", result, dest.ip, exc)
            self.counters.packet(type_name, "send_failed")
            if result == "ack":
                self.counters.lease(False)
            return
        self.counters.packet(type_name, result)
        if result == "ack" and message.yiaddr != ZERO_IP:
            self.counters.lease(True)
            log.info("ACK %s -> %s", message.yiaddr, message.mac)
        elif result == "nak":
            self.counters.lease(False)
            log.info("NAK -> %s", message.mac)


# Option 53 -> the metric label of a request's or a reply's type; what is not a known type is
# "bootp" for a request and "reply" for a reply.
_TYPE_NAMES: dict[bytes | None, str] = {bytes([mtype]): mtype.name.lower() for mtype in MessageType}


# A boot storm of hundreds of VMs arrives faster than one Python thread decodes it; the
# default receive buffer (~200 KiB) held about 370 DISCOVERs before the kernel dropped. 4 MiB
# holds about 7,400, and the DISCOVER gate closes at half of that: about a quarter of a second
# of requests at the rate this server completes exchanges, as long as shed_reason lets a
# DISCOVER wait.
RECEIVE_BUFFER = 4 << 20
_SO_RCVBUFFORCE = 33


def _grow_receive_buffer(sock: socket.socket) -> None:
    try:  # as root, past net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


def _peek_type(frame: bytes) -> int | None:
    """Option 53 of a frame the kernel filter let in (IPv4, UDP to port 67, unfragmented)."""
    if len(frame) < frames.ETH_HEADER_SIZE + 1:
        return None
    udp = frames.ETH_HEADER_SIZE + (frame[frames.ETH_HEADER_SIZE] & 0x0F) * 4
    return packet.peek_message_type(frame, udp + frames.UDP_HEADER_SIZE)


def _link_mac(name: str) -> bytes:
    # Asked through netlink (`ip`), not /sys: /sys shows the namespace it was mounted in,
    # not the one this process joined with --netns.
    link = nic.link(name)
    if link is None or not link.mac:
        raise CocoonError(f"bridge {name} has no MAC address")
    return bytes.fromhex(link.mac.replace(":", ""))
