"""Direct-path DHCP load: many clients on the bridge, each talking from its own MAC.

    python -m bench.loadgen --ifname eth0 --rate 500 --clients 1500 [--cpu 0]
    python -m bench.loadgen --ifname eth0 --probe --timeout 10

Runs inside the load namespace, whose one interface is a port of the node's bridge. Every
client sends what dhclient, udhcpc and dhcpcd send (testbed-facts #8): a DISCOVER, then on the
OFFER a REQUEST for the offered address naming the server (RFC 2131 §4.4.1, SELECTING), as
Ethernet broadcast from the client's own MAC, giaddr 0, broadcast flag off. A server must then
answer by unicast to the client's MAC (RFC 2131 §4.1), which one promiscuous packet socket
sees for every client at once. perfdhcp cannot do this: it always acts as a relay (#1).

Each client makes one attempt, with no retransmission, so a lost or late message is a drop.
DISCOVERs start at the target rate; a REQUEST leaves as soon as its OFFER is read. Latencies use
the kernel's receive timestamp (SO_TIMESTAMPNS), so time this process spends behind on its own
queue is not charged to the server. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address

from cocoon_net.bpf import attach_filter
from cocoon_net.dhcp.frames import (
    BROADCAST_MAC,
    CLIENT_PORT,
    ETH_HEADER_SIZE,
    ETH_P_IP,
    IPPROTO_UDP,
    SERVER_PORT,
    build_frame,
)
from cocoon_net.dhcp.model import ZERO_IP, DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.packet import MAGIC_COOKIE, MalformedPacket, encode

BROADCAST_IP = IPv4Address("255.255.255.255")
# linux/if_packet.h and asm-generic/socket.h; the socket module exports neither.
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
PACKET_STATISTICS = 6
_TIMESPEC = struct.Struct("@qq")
_PSEUDO = struct.Struct("!IIxBH")  # RFC 768 pseudo-header: src, dst, zero, protocol, UDP length
LATE_SECONDS = 0.001
READ_BATCH = 8  # replies read between looks at the clock while DISCOVERs are still to go
# Above this share of late DISCOVERs the step was sent in bursts, not at the target rate.
LATE_PCT_BEHIND = 10.0
# A reply later than this is one the client has given up on: its exchange is not completed.
CLIENT_PATIENCE_NS = 1_000_000_000
# Offsets in a frame this generator builds (IPv4 header without options) and in a DHCP message.
_UDP_AT = ETH_HEADER_SIZE + 20
_UDP_CSUM_AT = _UDP_AT + 6
_OPTIONS_AT = 240
_PAD, _END, _MESSAGE_TYPE, _SERVER_ID = (
    int(o) for o in (Opt.PAD, Opt.END, Opt.MESSAGE_TYPE, Opt.SERVER_ID)
)
_OFFER, _ACK, _NAK = (int(m) for m in (MessageType.OFFER, MessageType.ACK, MessageType.NAK))
# What dhclient asks for (subnet mask, broadcast, router, DNS, domain, hostname, MTU, NTP).
PARAM_REQUEST_LIST = bytes([1, 28, 3, 6, 15, 12, 26, 42])

# Accept IPv4 UDP to port 68 that is not a fragment; frames we send go to port 67. Same
# instruction set as frames.BPF_DHCP_SERVER (jump offsets count from the next instruction).
_BPF_DHCP_CLIENT: tuple[tuple[int, int, int, int], ...] = (
    (0x28, 0, 0, 12),  # 0 ldh ethertype
    (0x15, 0, 8, ETH_P_IP),  # 1
    (0x30, 0, 0, 23),  # 2 ldb IPv4 protocol
    (0x15, 0, 6, IPPROTO_UDP),  # 3
    (0x28, 0, 0, 20),  # 4 ldh flags/fragment offset
    (0x45, 4, 0, 0x3FFF),  # 5 jset MF | offset: drop
    (0xB1, 0, 0, ETH_HEADER_SIZE),  # 6 ldxb 4*(ip[0]&0xf)
    (0x48, 0, 0, ETH_HEADER_SIZE + 2),  # 7 ldh [x+16]: UDP destination port
    (0x15, 0, 1, CLIENT_PORT),  # 8
    (0x06, 0, 0, 0x40000),  # 9 accept
    (0x06, 0, 0, 0),  # 10 drop
)


@dataclass(frozen=True)
class Latency:
    """Summary of one exchange's latencies, in milliseconds."""

    count: int
    avg_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Latency:
        if not samples_ns:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples_ns)
        n = len(ordered)

        def pick(q: float) -> float:
            # Nearest-rank percentile: the smallest sample with at least q of them at or below.
            return ordered[max(0, math.ceil(q * n) - 1)] / 1e6

        return cls(n, sum(ordered) / n / 1e6, pick(0.50), pick(0.99), ordered[-1] / 1e6)


@dataclass(frozen=True)
class StepResult:
    """What one step of load produced, as the load namespace saw it."""

    target_rate: float
    clients: int
    discovers: int
    offers: int
    requests: int
    acks: int
    naks: int
    duplicates: int  # a second OFFER or ACK for the same exchange (Kea on two addresses, #9)
    malformed: int
    send_seconds: float  # first DISCOVER to last DISCOVER
    busy_seconds: float  # first DISCOVER to last ACK
    achieved_rate: float  # ACKs per busy second
    # Exchanges whose OFFER and ACK each came within a client's patience of its message.
    completed: int
    # Completed exchanges per second of offered load (first DISCOVER to one slot past the
    # last): what the clients got, late replies and backlog not counted.
    goodput: float
    discover_rate: float  # DISCOVERs actually sent per second
    drops_pct: float  # clients without an ACK
    offer_latency: Latency  # DISCOVER -> OFFER
    ack_latency: Latency  # REQUEST -> ACK
    loadgen_cpu_seconds: float
    loadgen_socket_drops: int  # replies lost in our own receive queue: then we are the bottleneck
    # DISCOVERs sent over 1 ms after their slot: the generator fell behind and sent in bursts,
    # so the step measured bursts, not the target rate.
    late_pct: float


class PacketPort:
    """One promiscuous AF_PACKET socket on the load interface: sends any frame, reads replies."""

    def __init__(self, ifname: str) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            attach_filter(sock, _BPF_DHCP_CLIENT)
            sock.bind((ifname, ETH_P_IP))
            ifindex = socket.if_nametoindex(ifname)
            # struct packet_mreq: replies go to the clients' MACs, not to this interface's.
            mreq = struct.pack("@iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._ancbuf = socket.CMSG_SPACE(_TIMESPEC.size)

    def send(self, frame: bytes) -> int:
        """Send a frame; return the wall-clock send time in ns (the clock SO_TIMESTAMPNS uses)."""
        stamp = time.time_ns()
        self.sock.send(frame)
        return stamp

    def receive(self) -> tuple[bytes, int] | None:
        """One queued frame and its kernel receive time in ns, or None when the queue is empty."""
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(2048, self._ancbuf)
        except BlockingIOError:
            return None
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(value)
                return data, sec * 1_000_000_000 + nsec
        return data, time.time_ns()

    def drops(self) -> int:
        """Replies the kernel dropped because this socket's queue was full (struct
        tpacket_stats; reading it resets the counters)."""
        _packets, dropped = struct.unpack(
            "@II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        )
        return int(dropped)

    def wait(self, seconds: float) -> None:
        select.select([self.sock], [], [], max(0.0, seconds))

    def close(self) -> None:
        self.sock.close()


def client_macs(count: int) -> list[bytes]:
    """Distinct random locally administered unicast MACs (testbed-facts #7: sequential MACs
    make dnsmasq offer one address twice and NAK the second REQUEST)."""
    macs: set[bytes] = set()
    while len(macs) < count:
        first = (secrets.randbits(8) & 0xFC) | 0x02  # unicast, locally administered
        macs.add(bytes([first]) + secrets.token_bytes(5))
    return list(macs)


def _frame(mac: bytes, msg: DhcpMessage) -> bytes:
    return build_frame(
        mac, BROADCAST_MAC, ZERO_IP, BROADCAST_IP, CLIENT_PORT, SERVER_PORT, encode(msg)
    )


def discover_frame(mac: bytes, xid: int, *, client_id: bool = True) -> bytes:
    """A DISCOVER; without option 61 every server identifies the client by chaddr alone."""
    options: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes([MessageType.DISCOVER])}
    if client_id:
        options[Opt.CLIENT_ID] = b"\x01" + mac
    options[Opt.PARAM_REQUEST_LIST] = PARAM_REQUEST_LIST
    return _frame(mac, DhcpMessage(op=Op.BOOTREQUEST, xid=xid, chaddr=mac, options=options))


def request_frame(mac: bytes, xid: int, offered: IPv4Address, server_id: bytes) -> bytes:
    msg = DhcpMessage(
        op=Op.BOOTREQUEST,
        xid=xid,
        chaddr=mac,
        options={
            Opt.MESSAGE_TYPE: bytes([MessageType.REQUEST]),
            Opt.CLIENT_ID: b"\x01" + mac,
            Opt.REQUESTED_IP: offered.packed,
            Opt.SERVER_ID: server_id,
            Opt.PARAM_REQUEST_LIST: PARAM_REQUEST_LIST,
        },
    )
    return _frame(mac, msg)


def _option_value_at(frame: bytes, code: int) -> int:
    """Where option `code`'s value starts in a frame built here, found by walking the options
    (a search for its bytes could match inside chaddr: a MAC ending in the code and length)."""
    i = _UDP_AT + 8 + _OPTIONS_AT
    while i < len(frame) and frame[i] != Opt.END:
        if frame[i] == Opt.PAD:
            i += 1
            continue
        if frame[i] == code:
            return i + 2
        i += 2 + frame[i + 1]
    raise ValueError(f"option {code} not in the frame")


class RequestTemplate:
    """One client's REQUEST, built before the clock starts with the offered address and the
    server identifier left blank: on an OFFER only those 8 octets and the UDP checksum change,
    so answering costs a copy and a few integer operations instead of an encode and a frame
    build.

    The checksum is patched, not recomputed: the ones'-complement sum of a string is the
    string read as one integer modulo 0xFFFF (2**16 is 1 modulo 0xFFFF), so four octets at
    some offset add their value times 256**(octets after them), which modulo 0xFFFF is 1 or
    256 by the parity of that count.
    """

    def __init__(self, mac: bytes, xid: int) -> None:
        frame = request_frame(mac, xid, ZERO_IP, bytes(4))
        self.frame = frame
        self.requested_at = _option_value_at(frame, Opt.REQUESTED_IP)
        self.server_id_at = _option_value_at(frame, Opt.SERVER_ID)
        segment = bytearray(frame[_UDP_AT:])
        segment[6:8] = b"\0\0"
        pseudo = _PSEUDO.pack(int(ZERO_IP), int(BROADCAST_IP), IPPROTO_UDP, len(segment))
        summed = pseudo + segment + b"\0" * (len(segment) & 1)
        self._sum = int.from_bytes(summed, "big") % 0xFFFF

        def weight(at: int) -> int:
            after = len(summed) - (len(pseudo) + at - _UDP_AT) - 4
            return 256 if after & 1 else 1

        self._requested_weight = weight(self.requested_at)
        self._server_id_weight = weight(self.server_id_at)

    def fill(self, offered: bytes, server_id: bytes) -> bytes:
        total = (
            self._sum
            + int.from_bytes(offered, "big") * self._requested_weight
            + int.from_bytes(server_id, "big") * self._server_id_weight
        ) % 0xFFFF
        out = bytearray(self.frame)
        out[self.requested_at : self.requested_at + 4] = offered
        out[self.server_id_at : self.server_id_at + 4] = server_id
        # A total of 0 here is the sum 0xFFFF of a non-zero segment: checksum 0, sent as 0xFFFF.
        out[_UDP_CSUM_AT : _UDP_CSUM_AT + 2] = ((~total & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
        return bytes(out)


@dataclass(frozen=True)
class Reply:
    """The few fields of a server's reply the clients act on."""

    kind: int  # option 53
    xid: int
    chaddr: bytes  # the first 6 octets
    yiaddr: bytes
    server_id: bytes | None


def _reply(data: bytes) -> Reply | None:
    """The DHCP reply a frame carries, or None for a request; raises MalformedPacket for a
    broken one. The kernel filter already passed only unfragmented IPv4 UDP to port 68, so
    only the DHCP fields a client needs are read, at their fixed offsets (RFC 2131 §2)."""
    if len(data) < ETH_HEADER_SIZE + 20:
        raise MalformedPacket("too_short", "frame without an IPv4 header")
    start = ETH_HEADER_SIZE + (data[ETH_HEADER_SIZE] & 0x0F) * 4 + 8
    if len(data) < start + _OPTIONS_AT + 1 or data[start + 236 : start + 240] != MAGIC_COOKIE:
        raise MalformedPacket("too_short", "no DHCP header and cookie")
    if data[start] != Op.BOOTREPLY:
        return None
    kind = 0
    server_id = None
    i, end = start + _OPTIONS_AT, len(data)
    while i < end:
        code = data[i]
        if code == _END:
            break
        if code == _PAD:
            i += 1
            continue
        if i + 1 >= end or i + 2 + data[i + 1] > end:
            raise MalformedPacket("truncated_option", f"option {code} runs past the frame")
        size = data[i + 1]
        if code == _MESSAGE_TYPE and size == 1:
            kind = data[i + 2]
        elif code == _SERVER_ID:
            server_id = data[i + 2 : i + 2 + size]
        i += 2 + size
    return Reply(
        kind,
        int.from_bytes(data[start + 4 : start + 8], "big"),
        data[start + 28 : start + 34],
        data[start + 16 : start + 20],
        server_id,
    )


def run_step(
    port: PacketPort,
    rate: float,
    clients: int,
    grace: float,
    on_start: Callable[[], None] = lambda: None,
) -> StepResult:
    """Drive `clients` DORA exchanges at `rate` DISCOVERs per second; wait `grace` seconds
    after the last DISCOVER for the last replies. `on_start` runs just before the first one."""
    macs = client_macs(clients)
    xid_base = secrets.randbits(32)
    xids = [(xid_base + i) & 0xFFFFFFFF for i in range(clients)]
    index = {xid: i for i, xid in enumerate(xids)}
    # Built before the clock starts; a REQUEST only needs the offer's two addresses patched in.
    discovers = [discover_frame(mac, xid) for mac, xid in zip(macs, xids, strict=True)]
    requests = [RequestTemplate(mac, xid) for mac, xid in zip(macs, xids, strict=True)]
    sent_discover = [0] * clients
    sent_request = [0] * clients
    offer_ns: list[int] = []
    ack_ns: list[int] = []
    acked_at = [0] * clients
    completed = 0
    counts = {"offers": 0, "requests": 0, "acks": 0, "naks": 0, "duplicates": 0, "malformed": 0}
    send = port.send

    def handle(data: bytes, stamp: int) -> None:
        nonlocal completed
        try:
            msg = _reply(data)
        except MalformedPacket:
            counts["malformed"] += 1
            return
        if msg is None:
            return
        i = index.get(msg.xid)
        if i is None or msg.chaddr != macs[i]:
            return  # another step's straggler, or not ours
        kind = msg.kind
        if kind == _OFFER:
            if sent_request[i]:
                counts["duplicates"] += 1
                return
            if msg.server_id is None or len(msg.server_id) != 4:
                counts["malformed"] += 1
                return
            counts["offers"] += 1
            offer_ns.append(stamp - sent_discover[i])
            sent_request[i] = send(requests[i].fill(msg.yiaddr, msg.server_id))
            counts["requests"] += 1
        elif kind == _ACK and sent_request[i]:
            if acked_at[i]:
                counts["duplicates"] += 1
                return
            counts["acks"] += 1
            acked_at[i] = stamp
            ack_ns.append(stamp - sent_request[i])
            if (
                stamp - sent_request[i] <= CLIENT_PATIENCE_NS
                and sent_request[i] - sent_discover[i] <= CLIENT_PATIENCE_NS
            ):
                completed += 1
        elif kind == _NAK:
            counts["naks"] += 1

    port.drops()  # reset the counters
    on_start()
    cpu_start = time.process_time()
    start = time.monotonic()
    sent = late = 0
    last_send = start
    while True:
        now = time.monotonic()
        due = min(clients, int((now - start) * rate) + 1)
        while sent < due:
            sent_discover[sent] = send(discovers[sent])
            if now - (start + sent / rate) > LATE_SECONDS:
                late += 1
            sent += 1
            last_send = now
        # Replies are read until the next DISCOVER is due, not until the queue is empty: at
        # 20,000/s a slot is 50 us, and draining a deep queue in one go sends the next ones late.
        read = 0
        while (item := port.receive()) is not None:
            handle(*item)
            read += 1
            if not read % READ_BATCH and sent < clients and time.monotonic() >= start + sent / rate:
                break
        now = time.monotonic()
        if sent == clients:
            if counts["acks"] + counts["naks"] >= clients or now >= last_send + grace:
                break
            port.wait(min(0.05, last_send + grace - now))
        else:
            port.wait(start + sent / rate - now)
    cpu = time.process_time() - cpu_start

    first_ns = sent_discover[0] if clients else 0
    offered = (sent_discover[sent - 1] - first_ns) / 1e9 + 1 / rate if sent else 0.0
    last_ack = max(acked_at, default=0)
    busy = (last_ack - first_ns) / 1e9 if counts["acks"] else 0.0
    return StepResult(
        target_rate=rate,
        clients=clients,
        discovers=sent,
        offers=counts["offers"],
        requests=counts["requests"],
        acks=counts["acks"],
        naks=counts["naks"],
        duplicates=counts["duplicates"],
        malformed=counts["malformed"],
        send_seconds=last_send - start,
        busy_seconds=busy,
        # N completions span N - 1 intervals.
        achieved_rate=(counts["acks"] - 1) / busy if busy > 0 else 0.0,
        completed=completed,
        goodput=completed / offered if offered else 0.0,
        discover_rate=sent / offered if offered else 0.0,
        drops_pct=100.0 * (clients - counts["acks"]) / clients if clients else 0.0,
        offer_latency=Latency.of(offer_ns),
        ack_latency=Latency.of(ack_ns),
        loadgen_cpu_seconds=cpu,
        loadgen_socket_drops=port.drops(),
        late_pct=100.0 * late / clients if clients else 0.0,
    )


def probe(port: PacketPort, mac: bytes, timeout: float, interval: float = 0.01) -> int | None:
    """DISCOVER from `mac` every `interval` until an OFFER comes back; return the wall time
    (ns) the first OFFER arrived, or None after `timeout` seconds. Prints "armed" first, so the
    caller can start the server only once the probe is already asking. The client is one the
    server has a lease for: a VM coming back after the restart, on a pool that may be full."""
    print("armed", flush=True)
    deadline = time.monotonic() + timeout
    pending: dict[int, bytes] = {}
    while time.monotonic() < deadline:
        xid = secrets.randbits(32)
        pending[xid] = mac
        port.send(discover_frame(mac, xid, client_id=False))
        wake = time.monotonic() + interval
        while (now := time.monotonic()) < wake:
            port.wait(wake - now)
            while (item := port.receive()) is not None:
                data, stamp = item
                try:
                    msg = _reply(data)
                except MalformedPacket:
                    continue
                if msg is not None and msg.kind == _OFFER and pending.get(msg.xid) == msg.chaddr:
                    return stamp
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ifname", required=True, help="the load namespace's bridge port")
    parser.add_argument("--rate", type=float, default=100.0, help="DISCOVERs per second")
    parser.add_argument("--clients", type=int, default=100, help="distinct clients (MACs)")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds to wait for stragglers")
    parser.add_argument("--cpu", type=int, default=-1, help="pin to this CPU (-1: do not pin)")
    parser.add_argument("--probe", action="store_true", help="wait for the first OFFER instead")
    parser.add_argument("--mac", default="", help="the probing client's MAC")
    parser.add_argument("--timeout", type=float, default=10.0, help="probe timeout in seconds")
    args = parser.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    port = PacketPort(args.ifname)
    try:
        if args.probe:
            stamp = probe(port, bytes.fromhex(args.mac.replace(":", "")), args.timeout)
            out: dict[str, object] = {"first_offer_ns": stamp}
        else:
            # "go" and "done" bracket the load, so the caller measures the server over it.
            result = run_step(
                port, args.rate, args.clients, args.grace, lambda: print("go", flush=True)
            )
            print("done", flush=True)
            out = asdict(result)
    finally:
        port.close()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
