"""A minimal rtnetlink client for the daemon's hot path: /32 lease routes and link events.

The daemon adds a route before every ACK. `ip route replace` costs a process (about 2 ms);
one netlink message costs microseconds, and a batch of them is one sendmsg and a few reads,
with an ACK per message so every failure is attributed to its address. Bulk work outside
the hot path (host setup, teardown) uses iproute2 (routes.py).

Netlink route changes are carried out synchronously while the kernel processes sendmsg(), so
the ACKs are already queued when it returns and the blocking reads below never wait.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

from cocoon_net import bpf, config
from cocoon_net.errors import HostSetupError

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
# Cap the ACK of a failed request to its header: the default echoes the whole request.
NETLINK_CAP_ACK = 10
SOL_NETLINK = 270

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_BATCH = 256  # requests per sendmsg: their ACKs fit the socket's receive buffer
_DEL_FLAGS = NLM_F_REQUEST | NLM_F_ACK


def quiet_sender(sock: socket.socket, portid: int) -> None:
    """Have the kernel drop, before they are queued on `sock`, the notifications whose sender
    is the netlink socket `portid`: a notification carries the port of the socket whose request
    caused it (route and nftables changes alike), so the daemon is not woken to read and ignore
    the echo of each change it made itself."""
    # nlmsg_pid is in host order; a BPF word load reads the octets in network order.
    echoed = int.from_bytes(struct.pack("=I", portid), "big")
    program: bpf.Program = (
        (bpf.LD_W_ABS, 0, 0, 12),  # nlmsghdr.nlmsg_pid
        (bpf.JEQ_K, 0, 1, echoed),
        (bpf.RET_K, 0, 0, 0),
        (bpf.RET_K, 0, 0, bpf.ACCEPT),
    )
    bpf.attach_filter(sock, program)


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTA.size + len(payload)
    return _RTA.pack(length, kind) + payload + b"\0" * (-length % 4)


@dataclass(frozen=True)
class RouteOp:
    """Add (replace) or delete `ip/32 dev <ifindex> proto <proto> scope link`."""

    add: bool
    ip: IPv4Address


class RouteSocket:
    """One netlink socket owned by the event-loop thread (not thread-safe)."""

    def __init__(self) -> None:
        # Every add and delete carries our protocol; the kernel deletes only a route with it.
        self.proto = config.ROUTE_PROTO
        self._seq = 0
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, 0))

    @property
    def portid(self) -> int:
        """This socket's netlink port: the sender of the notifications its changes cause."""
        port: int = self._sock.getsockname()[0]
        return port

    def close(self) -> None:
        self._sock.close()

    def _messages(self, ops: list[RouteOp], ifindex: int) -> tuple[dict[int, RouteOp], bytes]:
        """One request per op, each with its own sequence number for its ACK."""
        rtmsg = _RTMSG.pack(
            socket.AF_INET, 32, 0, 0, RT_TABLE_MAIN, self.proto, RT_SCOPE_LINK, RTN_UNICAST, 0
        )
        tail = _attr(RTA_OIF, struct.pack("=I", ifindex))
        dst_header = _RTA.pack(_RTA.size + 4, RTA_DST)
        length = _NLMSG.size + len(rtmsg) + len(dst_header) + 4 + len(tail)
        add_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        by_seq: dict[int, RouteOp] = {}
        parts: list[bytes] = []
        for op in ops:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            by_seq[self._seq] = op
            kind, flags = (RTM_NEWROUTE, add_flags) if op.add else (RTM_DELROUTE, _DEL_FLAGS)
            parts += (_NLMSG.pack(length, kind, flags, self._seq, 0), rtmsg, dst_header)
            parts += (op.ip.packed, tail)
        return by_seq, b"".join(parts)

    def apply(self, ops: Iterable[RouteOp], ifindex: int) -> dict[RouteOp, str]:
        """Carry out ops in order; return the failed ones with their error.

        Deleting a route that is already gone (ESRCH) and adding one that exists (replace)
        both succeed: the result is what the caller asked for.
        """
        failed: dict[RouteOp, str] = {}
        pending = list(ops)
        for start in range(0, len(pending), _BATCH):
            by_seq, data = self._messages(pending[start : start + _BATCH], ifindex)
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise HostSetupError(f"netlink send: {exc.strerror or exc}") from None
            for seq, error in self._acks(len(by_seq)):
                acked = by_seq.get(seq)
                if acked is None or error == 0 or (error == errno.ESRCH and not acked.add):
                    continue
                failed[acked] = os.strerror(error)
        return failed

    def dump(self, ifindex: int, protocols: Iterable[int]) -> dict[int, set[IPv4Address]]:
        """The /32 routes of the main table through ifindex, by protocol, for the protocols
        asked. One dump instead of `ip -json`: with 60,000 leases that is the difference
        between a fraction of a second and several at start-up."""
        wanted = {proto: set[IPv4Address]() for proto in protocols}
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        request = _NLMSG.pack(
            _NLMSG.size + len(body), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0
        )
        self._sock.sendall(request + body)
        while True:
            data = self._sock.recv(1 << 20)
            for kind, seq, payload in _messages(data):
                if seq != self._seq:
                    continue
                if kind == NLMSG_DONE:
                    return wanted
                if kind == NLMSG_ERROR:
                    error = -_ERR.unpack_from(payload)[0]
                    raise HostSetupError(f"netlink route dump: {os.strerror(error)}")
                route = _route(payload)
                if (
                    route is not None
                    and route.oif == ifindex
                    and route.table == RT_TABLE_MAIN
                    and route.prefixlen == 32
                    and route.protocol in wanted
                ):
                    wanted[route.protocol].add(route.dst)

    def _acks(self, count: int) -> Iterator[tuple[int, int]]:
        seen = 0
        while seen < count:
            data = self._sock.recv(1 << 16)
            for kind, seq, payload in _messages(data):
                if kind == NLMSG_ERROR:
                    seen += 1
                    yield seq, -_ERR.unpack_from(payload)[0]


def _messages(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    view = memoryview(data)
    pos = 0
    while pos + _NLMSG.size <= len(view):
        length, kind, _flags, seq, _pid = _NLMSG.unpack_from(view, pos)
        if length < _NLMSG.size:
            break
        yield kind, seq, view[pos + _NLMSG.size : pos + length]
        pos += (length + 3) & ~3


@dataclass(frozen=True)
class Event:
    """One notification; route fields are set for route messages only."""

    kind: int
    protocol: int = 0
    table: int = 0
    dst: IPv4Address | None = None
    prefixlen: int = 0

    @property
    def ours(self) -> bool:
        """A /32 in the main table with our protocol: one of the lease routes."""
        return (
            self.kind in (RTM_NEWROUTE, RTM_DELROUTE)
            and self.protocol == config.ROUTE_PROTO
            and self.table == RT_TABLE_MAIN
            and self.prefixlen == 32
            and self.dst is not None
        )


@dataclass(frozen=True)
class _Route:
    dst: IPv4Address
    prefixlen: int
    protocol: int
    table: int
    oif: int


def _route(payload: memoryview) -> _Route | None:
    """The fields of an IPv4 route message we use; None for anything else."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, protocol, _scope, _type, _flags = _RTMSG.unpack_from(
        payload
    )
    if family != socket.AF_INET:
        return None
    dst, oif = None, 0
    pos = _RTMSG.size
    while pos + _RTA.size <= len(payload):
        length, attr = _RTA.unpack_from(payload, pos)
        if length < _RTA.size:
            break
        if attr == RTA_DST and length == _RTA.size + 4:
            dst = IPv4Address(bytes(payload[pos + _RTA.size : pos + length]))
        elif attr == RTA_OIF and length == _RTA.size + 4:
            oif = struct.unpack_from("=I", payload, pos + _RTA.size)[0]
        elif attr == RTA_TABLE and length == _RTA.size + 4:
            table = struct.unpack_from("=I", payload, pos + _RTA.size)[0]
        pos += (length + 3) & ~3
    if dst is None:
        return None
    return _Route(dst, dst_len, protocol, table, oif)


def _event(kind: int, payload: memoryview) -> Event:
    route = _route(payload) if kind in (RTM_NEWROUTE, RTM_DELROUTE) else None
    if route is None:
        return Event(kind)
    return Event(kind, route.protocol, route.table, route.dst, route.prefixlen)


class EventSocket:
    """Link, address and IPv4 route notifications; the daemon reconciles when any arrive.
    Those caused by the socket `quiet` (the daemon's RouteSocket: a route per grant) are
    dropped by the kernel."""

    def __init__(self, quiet: int | None = None) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if quiet is not None:
            quiet_sender(self._sock, quiet)
        self._sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[Event]:
        """Events received since the last call. An overrun (ENOBUFS) is reported as a link
        event: something was missed, so everything is re-checked."""
        events: list[Event] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    events.append(Event(RTM_NEWLINK))
                    continue
                raise
            events += [_event(kind, payload) for kind, _seq, payload in _messages(data)]

    def close(self) -> None:
        self._sock.close()


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None
