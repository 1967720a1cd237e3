"""The DISCOVER gate under overload: once the server's receive queue runs half full, new
DISCOVERs are dropped by the kernel while the REQUESTs of exchanges under way still come in
and are answered; once the queue is found empty, DISCOVERs are taken again.

Real kernel in a fresh namespace: the server's own packet socket and filter on `cni0`, frames
sent from the veth's other end, a real lease store and real routes. The test plays the event
loop's part (each `_on_frames` call is one wake-up), so that it can act between two of them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.dhcp import frames, packet
from cocoon_net.dhcp import server as server_module
from cocoon_net.dhcp.leases import LeaseTable
from cocoon_net.dhcp.model import MessageType
from cocoon_net.dhcp.server import STALE_DISCOVER_SECONDS, DhcpServer
from cocoon_net.dhcp.settings import DhcpSettings
from cocoon_net.dhcp.store import LeaseStore
from cocoon_net.node import rtnl
from tests.support.netns import Netns
from tests.unit.test_dhcp_server import SERVER_MAC, RecordingCounters, frame, request

pytestmark = pytest.mark.netns

A = IPv4Address
GW = A("172.20.0.1")
SETTINGS = DhcpSettings(server_id=GW, subnet=IPv4Network("172.20.0.0/16"), router=GW)
POOL = [A(int(A("172.20.1.0")) + i) for i in range(2000)]
LATE = "02:00:00:02:00:01"
BROADCAST = A("255.255.255.255")


def mac(i: int) -> str:
    return f"02:00:00:01:{i >> 8:02x}:{i & 0xFF:02x}"


def discover(who: str) -> bytes:
    return frame(
        request(MessageType.DISCOVER, mac=who), src_mac=who, src_ip=A(0), dst_ip=A(-1 & 0xFFFFFFFF)
    )


def queued(sock: socket.socket) -> tuple[int, int]:
    """(bytes queued, the most it may hold): SO_MEMINFO."""
    data = sock.getsockopt(socket.SOL_SOCKET, 55, 8)
    return struct.unpack("@II", data)


def replies(capture: socket.socket) -> list[tuple[str, str, A]]:
    """(type, client MAC, yiaddr) of every reply the server sent so far."""
    out = []
    while select.select([capture], [], [], 0.2)[0]:
        udp = frames.parse_frame(capture.recv(4096), port=68)
        if udp is None:
            continue
        msg = packet.decode(udp.payload)
        kind = MessageType(msg.options[53][0]).name
        out.append((kind, msg.chaddr.hex(":"), msg.yiaddr))
    return out


class Node:
    """The server on cni0 with a real store and routes; `tx` sends as VMs, `capture` sees the
    replies. The caller plays the event loop: nothing reads the server's socket but its
    `_on_frames` calls (with no read pacing: no timer reads either), unless `read_interval`
    is given."""

    def __init__(self, directory: str, read_interval: float = 0) -> None:
        server_module.RECEIVE_BUFFER = 256 << 10  # a few hundred frames fill it
        self.counters = RecordingCounters()
        self.store = LeaseStore(Path(directory) / "leases.json")
        self.store.open()
        self.server = DhcpServer(
            bridge="cni0",
            settings=SETTINGS,
            table=LeaseTable(POOL),
            store=self.store,
            routes=rtnl.RouteSocket(),
            counters=self.counters,
            read_interval=read_interval,
        )
        self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.tx.bind(("tx0", 0))
        self.capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self.capture.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        self.capture.bind(("tx0", 0x0800))

    def open(self) -> socket.socket:
        self.server.open()
        sock = self.server._packet_sock
        assert sock is not None
        asyncio.get_running_loop().remove_reader(sock.fileno())
        # The kernel turns receive timestamps on a moment after a socket first asks for them
        # (deferred work): a frame queued before is stamped when read, as if fresh.
        time.sleep(0.1)
        return sock

    def flood(self, sock: socket.socket) -> int:
        """DISCOVERs from new clients until the queue is three quarters full; how many."""
        sent = 0
        while queued(sock)[0] * 4 < queued(sock)[1] * 3:
            self.tx.send(discover(mac(sent)))
            sent += 1
        return sent

    def late(self, count: int) -> None:
        """DISCOVERs from `count` new clients, left in the queue past the shedding age."""
        for i in range(count):
            self.tx.send(discover(mac(i)))
        time.sleep(STALE_DISCOVER_SECONDS * 1.2)

    def gate(self) -> list[tuple[object, ...]]:
        return [seen for seen in self.counters.seen if seen[0] == "gate"]

    async def until_open(self) -> int:
        """Wake the server as its event loop would, while its socket has frames to read;
        how many times. Returns with the queue read to its end."""
        wake_ups = 0
        while (sock := self.server._packet_sock) is not None and wake_ups < 1000:
            if not select.select([sock], [], [], 0)[0]:
                break
            self.server._on_frames()
            wake_ups += 1
            await asyncio.sleep(0)  # the flusher, when a group went to the journal writer
        return wake_ups

    def close(self) -> None:
        self.server.close_sockets()
        self.store.close()


Script = Callable[[Node, dict[str, object]], Coroutine[Any, Any, None]]


def play(directory: str, script: Script, read_interval: float = 0) -> dict[str, object]:
    """Run `script` on a fresh Node in this namespace; what it noted."""
    node = Node(directory, read_interval)
    out: dict[str, object] = {}
    try:
        asyncio.run(script(node, out))
    finally:
        node.close()
    return out


async def half_full(node: Node, out: dict[str, object]) -> None:
    sock = node.open()
    out["flood"] = node.flood(sock)
    node.server._on_frames()  # one wake-up: a full batch, and the queue still half full
    out["closed_after_one_read"] = node.server.state.gate_closed_at is not None
    before = replies(node.capture)
    offered = next(yiaddr for _, who, yiaddr in before if who == mac(0))
    # While closed: a new client's DISCOVER, and the REQUEST completing the first exchange.
    node.tx.send(discover(LATE))
    selecting = request(MessageType.REQUEST, mac=mac(0), requested_ip=offered, server_id=GW)
    node.tx.send(frame(selecting, src_mac=mac(0), src_ip=A(0), dst_ip=BROADCAST))
    await node.until_open()
    await node.server.drain()
    out["while_closed"] = before + replies(node.capture)
    out["offered"] = offered
    node.tx.send(discover(LATE))  # the gate is open again
    time.sleep(0.05)
    node.server._on_frames()
    out["after"] = replies(node.capture)
    out["gate"] = node.gate()


async def late_batch(node: Node, out: dict[str, object]) -> None:
    sock = node.open()
    node.late(100)  # more than one wake-up reads, far from half the queue
    out["share"] = queued(sock)[0] / queued(sock)[1]
    node.server._on_frames()
    out["closed_after_one_read"] = node.server.state.gate_closed_at is not None
    out["wake_ups"] = await node.until_open()
    out["stale"] = node.counters.seen.count(("drop", "stale_discover"))
    out["gate"] = node.gate()
    out["replies"] = replies(node.capture)


async def late_and_read_to_the_end(node: Node, out: dict[str, object]) -> None:
    """A full batch of late DISCOVERs that is all the queue holds: nothing left to read."""
    node.open()
    node.late(64)
    node.server._on_frames()
    out["closed"] = node.server.state.gate_closed_at is not None
    node.tx.send(discover(LATE))  # nothing else would wake the server
    time.sleep(0.05)
    node.server._on_frames()
    out["replies"] = replies(node.capture)


async def read_to_a_batch_boundary(node: Node, out: dict[str, object]) -> None:
    """The gate closes; what is left in the queue is then a whole number of batches, so the
    last wake-up reads it to its end without ever finding it empty."""
    sock = node.open()
    sent = node.flood(sock)
    node.server._on_frames()
    out["closed"] = node.server.state.gate_closed_at is not None
    # RELEASEs from nobody pass the closed gate and are ignored: the queue's padding.
    for i in range(-(sent - 64) % 64):
        release = request(MessageType.RELEASE, mac=LATE, ciaddr=POOL[-1 - i])
        node.tx.send(frame(release, src_mac=LATE, src_ip=POOL[-1 - i], dst_ip=GW))
    out["wake_ups"] = await node.until_open()
    out["open"] = node.server.state.gate_closed_at is None
    out["left"] = queued(sock)[0]
    node.tx.send(discover(LATE))
    time.sleep(0.05)
    await node.until_open()
    out["late"] = [(kind, who) for kind, who, _ in replies(node.capture) if who == LATE]


async def down_to_a_quarter(node: Node, out: dict[str, object]) -> None:
    """The gate closes at half a queue; what is queued when it opens again."""
    sock = node.open()
    sent = node.flood(sock)
    node.server._on_frames()
    out["closed"] = node.server.state.gate_closed_at is not None
    while node.server.state.gate_closed_at is not None and queued(sock)[0]:
        node.server._on_frames()
        await asyncio.sleep(0)
    out["left"], out["limit"] = queued(sock)
    node.tx.send(discover(LATE))  # let in behind what is left
    await node.until_open()
    await node.server.drain()
    offers = {who for kind, who, _ in replies(node.capture) if kind == "OFFER"}
    out["all_offered"] = offers == {mac(i) for i in range(sent)} | {LATE}


async def cannot_open(node: Node, out: dict[str, object]) -> None:
    """The kernel refuses the filter that lets DISCOVERs in again."""
    real = frames.set_filter

    def set_filter(sock: socket.socket, *, discovers: bool) -> None:
        if discovers:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        real(sock, discovers=discovers)

    frames.set_filter = set_filter  # in this child process only
    node.flood(node.open())
    node.server._on_frames()
    out["closed"] = node.server.state.gate_closed_at is not None
    await node.until_open()
    out["bound"] = node.server.bound


def make_node(make_netns: Callable[[str], Netns]) -> Netns:
    ns = make_netns("gate")
    ns.ip("link", "add", "tx0", "type", "veth", "peer", "name", "cni0")
    ns.ip("link", "set", "cni0", "address", SERVER_MAC.hex(":"))
    ns.ip("addr", "add", f"{GW}/16", "dev", "cni0")
    for link in ("tx0", "cni0"):
        ns.ip("link", "set", link, "up")
    return ns


def test_past_half_a_queue_new_discovers_are_shed_by_the_kernel_and_requests_served(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(play, str(tmp_path), half_full)
    assert out["closed_after_one_read"]
    # Every DISCOVER queued before the gate closed was answered, the one sent after was not,
    # and the REQUEST sent after it was: its exchange completes.
    offers = {who for kind, who, _ in out["while_closed"] if kind == "OFFER"}
    assert offers == {mac(i) for i in range(out["flood"])}
    assert ("ACK", mac(0), out["offered"]) in out["while_closed"]
    # Found empty, the queue takes DISCOVERs again.
    assert [(kind, who) for kind, who, _ in out["after"]] == [("OFFER", LATE)]
    assert out["gate"] == [("gate", "closed"), ("gate", "opened")]


def test_a_full_batch_of_late_discovers_closes_the_gate_however_short_the_queue(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(play, str(tmp_path), late_batch)
    assert out["share"] < 0.5
    assert out["closed_after_one_read"]
    assert out["stale"] == 100 and out["replies"] == []
    assert out["wake_ups"] == 1  # the rest of the queue, then found empty
    assert out["gate"] == [("gate", "closed"), ("gate", "opened")]


def test_a_gate_never_closes_on_an_empty_queue(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    """Only a frame still queued wakes the server to read on and open the gate again: closed
    on an empty queue, no DISCOVER would ever be let in to wake it."""
    out = make_node(make_netns).call(play, str(tmp_path), late_and_read_to_the_end)
    assert not out["closed"]
    assert [(kind, who) for kind, who, _ in out["replies"]] == [("OFFER", LATE)]


def test_a_wake_up_that_reads_the_queue_to_its_end_opens_the_gate(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(play, str(tmp_path), read_to_a_batch_boundary)
    assert out["closed"] and out["left"] == 0
    assert out["open"]
    assert out["late"] == [("OFFER", LATE)]


def test_the_gate_opens_with_a_quarter_of_the_queue_still_to_read(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    """Opened before the queue runs dry, the server has work while new clients queue."""
    out = make_node(make_netns).call(play, str(tmp_path), down_to_a_quarter)
    assert out["closed"]
    assert 0 < out["left"] < out["limit"] / 4
    assert out["all_offered"]


def test_a_gate_that_cannot_open_gives_up_its_socket_for_a_new_one(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    """Never a socket left shut to new clients: without it the daemon's next host check
    opens a new one."""
    out = make_node(make_netns).call(play, str(tmp_path), cannot_open)
    assert out["closed"]
    assert out["bound"] is False
