"""A minimal rtnetlink client for the daemon's hot path: /32 lease routes, the egress rule
that goes with a route, and link events.

The daemon adds a route before every ACK. `ip route replace` costs a process (about 2 ms);
one netlink message costs microseconds, and a batch of them is one sendmsg and, when all
succeed, one read: the kernel answers each failed request with its own error, so every failure
is attributed to its address, and only the batch's last request asks for an ACK. Bulk work outside
the hot path (host setup, teardown) uses iproute2 (routes.py).

Netlink route changes are carried out synchronously while the kernel processes sendmsg(), so
the ACKs are already queued when it returns and the blocking reads below never wait.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple

from cocoon_net import bpf, config
from cocoon_net.errors import HostSetupError

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 1, 2, 6, 15, 21
FR_ACT_TO_TBL = 1
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
# Cap the ACK of a failed request to its header: the default echoes the whole request.
NETLINK_CAP_ACK = 10
SOL_NETLINK = 270

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# family, dst_len, src_len, tos, table, protocol, scope, type, flags; a rule's header
# (fib_rule_hdr) has the same layout: family, dst_len, src_len, tos, table, -, -, action, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_BATCH = 256  # requests per sendmsg: their ACKs fit the socket's receive buffer
_DEL_FLAGS = NLM_F_REQUEST | NLM_F_ACK
_ADD_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE  # a route's; NLM_F_ACK on the last


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


class RouteOp(NamedTuple):
    """Add (replace) or delete `ip/32 dev <ifindex> proto <proto> scope link`.

    A named tuple, not a frozen dataclass: the server makes one per grant, and a tuple is
    built in one step instead of one object.__setattr__ per field."""

    add: bool
    ip: IPv4Address


@dataclass(frozen=True)
class Rule:
    """A policy rule of ours: `from SRC` or `to DST`, `lookup TABLE priority P protocol 203`."""

    priority: int
    table: int
    src: IPv4Network | None = None
    dst: IPv4Network | None = None

    def spec(self) -> str:
        where = f"from {self.src}" if self.src else f"to {self.dst}"
        table = "main" if self.table == RT_TABLE_MAIN else str(self.table)
        return f"{where} lookup {table} priority {self.priority} protocol {config.ROUTE_PROTO}"

    def message(self, add: bool, seq: int) -> bytes:
        """RTM_NEWRULE (refused with EEXIST when the same rule exists, so a repeat adds no
        twin) or RTM_DELRULE. Both name every field, our protocol among them: the kernel
        deletes only a rule that matches them all."""
        src_len = self.src.prefixlen if self.src else 0
        dst_len = self.dst.prefixlen if self.dst else 0
        header = _RTMSG.pack(socket.AF_INET, dst_len, src_len, 0, 0, 0, 0, FR_ACT_TO_TBL, 0)
        attrs = _attr(FRA_PRIORITY, struct.pack("=I", self.priority))
        attrs += _attr(FRA_PROTOCOL, bytes([config.ROUTE_PROTO]))
        if self.src:
            attrs += _attr(FRA_SRC, self.src.network_address.packed)
        if self.dst:
            attrs += _attr(FRA_DST, self.dst.network_address.packed)
        attrs += _attr(FRA_TABLE, struct.pack("=I", self.table))
        if add:
            kind, flags = RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        else:
            kind, flags = RTM_DELRULE, _DEL_FLAGS
        body = header + attrs
        return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


class RouteSocket:
    """One netlink socket owned by the event-loop thread (not thread-safe)."""

    def __init__(self) -> None:
        # Every add and delete carries our protocol; the kernel deletes only a route with it.
        self.proto = config.ROUTE_PROTO
        # The egress rule that comes and goes with an address's route (egress.py): sent in
        # the same batch, so the route and the rule are both in place before the ACK.
        self.rules: Mapping[IPv4Address, Rule] = {}
        self._seq = 0
        # A route request's fixed parts by interface: rtmsg and the RTA_DST header, RTA_OIF.
        self._route_body: dict[int, tuple[bytes, bytes]] = {}
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

    def _messages(
        self, ops: list[RouteOp], ifindex: int
    ) -> tuple[dict[int, tuple[RouteOp, int]], bytes]:
        """One request per op, and one more for an address with an egress rule, each with
        its own sequence number for its answer and the error that means "already as asked".

        Only the batch's last request asks for an ACK. The kernel answers every request that
        fails whatever its flags, in order, so once the last one is answered every error of
        the batch has arrived: one read in the common case where all succeed, instead of an
        ACK built, queued and read per route."""
        route = self._route_body.get(ifindex)
        if route is None:
            rtmsg = _RTMSG.pack(socket.AF_INET, 32, 0, 0, RT_TABLE_MAIN, self.proto,
                                RT_SCOPE_LINK, RTN_UNICAST, 0)  # fmt: skip
            tail = _attr(RTA_OIF, struct.pack("=I", ifindex))
            route = (rtmsg + _RTA.pack(_RTA.size + 4, RTA_DST), tail)
            self._route_body[ifindex] = route
        head, tail = route
        length = _NLMSG.size + len(head) + 4 + len(tail)
        by_seq: dict[int, tuple[RouteOp, int]] = {}
        parts: list[bytes] = []
        rules = self.rules
        seq = self._seq
        last_route = -1  # where the last request's header is, while that request is a route
        for op in ops:
            seq = (seq + 1) & 0xFFFFFFFF
            if op.add:
                by_seq[seq] = (op, 0)
                kind, flags = RTM_NEWROUTE, _ADD_FLAGS
            else:
                by_seq[seq] = (op, errno.ESRCH)
                kind, flags = RTM_DELROUTE, NLM_F_REQUEST
            last_route = len(parts)
            parts += (_NLMSG.pack(length, kind, flags, seq, 0), head, op.ip.packed, tail)
            rule = rules.get(op.ip) if rules else None
            if rule is not None:
                seq = (seq + 1) & 0xFFFFFFFF
                by_seq[seq] = (op, errno.EEXIST if op.add else errno.ENOENT)
                parts.append(rule.message(op.add, seq))  # a rule asks for its ACK itself
                last_route = -1
        self._seq = seq
        if last_route >= 0:
            parts[last_route] = _NLMSG.pack(length, kind, flags | NLM_F_ACK, seq, 0)
        return by_seq, b"".join(parts)

    def apply(self, ops: Iterable[RouteOp], ifindex: int) -> dict[RouteOp, str]:
        """Carry out ops in order; return the failed ones with their error.

        Deleting a route that is already gone (ESRCH) and adding one that exists (replace)
        both succeed: the result is what the caller asked for.
        """
        failed: dict[RouteOp, str] = {}
        pending = ops if isinstance(ops, list) else list(ops)
        for start in range(0, len(pending), _BATCH):
            by_seq, data = self._messages(pending[start : start + _BATCH], ifindex)
            for seq, error in self._exchange(data, self._seq):
                acked, harmless = by_seq.get(seq, (None, 0))
                if acked is None or error in (0, harmless):
                    continue
                failed[acked] = os.strerror(error)
        return failed

    def apply_rules(self, add: Iterable[Rule], remove: Iterable[Rule]) -> dict[Rule, str]:
        """Delete remove, then add add; return the failed ones with their error. A rule
        already gone or already present is what was asked for."""
        ops = [(rule, False) for rule in remove] + [(rule, True) for rule in add]
        failed: dict[Rule, str] = {}
        for start in range(0, len(ops), _BATCH):
            by_seq: dict[int, tuple[Rule, int]] = {}
            parts: list[bytes] = []
            for rule, adding in ops[start : start + _BATCH]:
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                by_seq[self._seq] = (rule, errno.EEXIST if adding else errno.ENOENT)
                parts.append(rule.message(adding, self._seq))
            for seq, error in self._exchange(b"".join(parts), self._seq):
                if seq in by_seq and error not in (0, by_seq[seq][1]):
                    failed[by_seq[seq][0]] = os.strerror(error)
        return failed

    def _exchange(self, data: bytes, last: int) -> Iterator[tuple[int, int]]:
        """Send requests; the (sequence, error) answers, up to the one to `last`."""
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise HostSetupError(f"netlink send: {exc.strerror or exc}") from None
        return self._acks(last)

    def dump(self, ifindex: int, protocols: Iterable[int]) -> dict[int, set[IPv4Address]]:
        """The /32 routes of the main table through ifindex, by protocol, for the protocols
        asked. One dump instead of `ip -json`: with 60,000 leases that is the difference
        between a fraction of a second and several at start-up."""
        wanted = {proto: set[IPv4Address]() for proto in protocols}
        for payload in self._dump(RTM_GETROUTE, "route"):
            route = _route(payload)
            if (
                route is not None
                and route.oif == ifindex
                and route.table == RT_TABLE_MAIN
                and route.prefixlen == 32
                and route.protocol in wanted
            ):
                wanted[route.protocol].add(route.dst)
        return wanted

    def dump_rules(self, priorities: Iterable[int]) -> set[Rule]:
        """The IPv4 rules of ours (our protocol) at priorities."""
        wanted = set(priorities)
        found = (_rule(payload) for payload in self._dump(RTM_GETRULE, "rule"))
        return {rule for rule in found if rule is not None and rule.priority in wanted}

    def _dump(self, kind: int, what: str) -> Iterator[memoryview]:
        """The payloads of an IPv4 dump request."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        request = _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP,
                              self._seq, 0)  # fmt: skip
        self._sock.sendall(request + body)
        while True:
            data = self._sock.recv(1 << 20)
            for reply, seq, payload in _messages(data):
                if seq != self._seq:
                    continue
                if reply == NLMSG_DONE:
                    return
                if reply == NLMSG_ERROR:
                    error = -_ERR.unpack_from(payload)[0]
                    raise HostSetupError(f"netlink {what} dump: {os.strerror(error)}")
                yield payload

    def _acks(self, last: int) -> Iterator[tuple[int, int]]:
        """Answers until the one to request `last`, which the kernel sends after those to
        every request before it (it handles a batch in order, within sendall)."""
        while True:
            data = self._sock.recv(1 << 16)
            for kind, seq, payload in _messages(data):
                if kind == NLMSG_ERROR:
                    yield seq, -_ERR.unpack_from(payload)[0]
                    if seq == last:
                        return


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
    """One notification; route fields are set for route messages only, rule for a rule of
    ours."""

    kind: int
    protocol: int = 0
    table: int = 0
    dst: IPv4Address | None = None
    prefixlen: int = 0
    rule: Rule | None = None

    @property
    def ours(self) -> bool:
        """A /32 in the main table with our protocol (one of the lease routes), or a rule of
        ours."""
        if self.rule is not None:
            return True
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


def _rule(payload: memoryview) -> Rule | None:
    """A rule of ours (our protocol, a table lookup) from a rule message; else None."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, src_len, _tos, table, _, _, action, _flags = _RTMSG.unpack_from(payload)
    if family != socket.AF_INET or action != FR_ACT_TO_TBL:
        return None
    attrs: dict[int, bytes] = {}
    pos = _RTMSG.size
    while pos + _RTA.size <= len(payload):
        length, attr = _RTA.unpack_from(payload, pos)
        if length < _RTA.size:
            break
        attrs[attr] = bytes(payload[pos + _RTA.size : pos + length])
        pos += (length + 3) & ~3
    if attrs.get(FRA_PROTOCOL, b"")[:1] != bytes([config.ROUTE_PROTO]):
        return None
    if len(attrs.get(FRA_TABLE, b"")) == 4:
        table = struct.unpack("=I", attrs[FRA_TABLE])[0]

    def net(attr: int, prefixlen: int) -> IPv4Network | None:
        value = attrs.get(attr)
        if value is None or len(value) != 4:
            return None
        return IPv4Network((IPv4Address(value), prefixlen))

    priority = struct.unpack("=I", attrs[FRA_PRIORITY])[0] if FRA_PRIORITY in attrs else 0
    return Rule(priority, table, src=net(FRA_SRC, src_len), dst=net(FRA_DST, dst_len))


def _event(kind: int, payload: memoryview) -> Event:
    if kind in (RTM_NEWRULE, RTM_DELRULE):
        return Event(kind, rule=_rule(payload))
    route = _route(payload) if kind in (RTM_NEWROUTE, RTM_DELROUTE) else None
    if route is None:
        return Event(kind)
    return Event(kind, route.protocol, route.table, route.dst, route.prefixlen)


class EventSocket:
    """Link, address, IPv4 route and rule notifications; the daemon reconciles when any
    arrive. Those caused by the socket `quiet` (the daemon's RouteSocket: a route and its
    egress rule per grant) are dropped by the kernel."""

    def __init__(self, quiet: int | None = None) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if quiet is not None:
            quiet_sender(self._sock, quiet)
        groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE
        self._sock.bind((0, groups))
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
