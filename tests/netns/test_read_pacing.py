"""Read pacing on the real event loop: while requests keep coming, the server reads its socket
at most once per interval and answers what queued meanwhile together; after a quiet interval,
or when a read stops at a full batch, it reads again at once; a drain stops the timed reads.

Real kernel in a fresh namespace: the server's own packet socket on `cni0` with its reader on
the running loop, frames sent from the veth's other end, a real lease store and real routes.
The intervals are long (tenths of a second) so that which frames are read together depends
on the pacing, not on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from cocoon_net.dhcp import frames, packet
from cocoon_net.dhcp import server as server_module
from tests.netns.test_discover_gate import Node, Script, discover, mac, make_node, play
from tests.support.netns import Netns

pytestmark = pytest.mark.netns


async def answers(node: Node, count: int, within: float = 5.0) -> list[float]:
    """Wait for `count` more OFFERs while the loop runs; the monotonic time each was seen."""
    seen: list[float] = []
    deadline = time.monotonic() + within
    while len(seen) < count and time.monotonic() < deadline:
        while select.select([node.capture], [], [], 0)[0]:
            udp = frames.parse_frame(node.capture.recv(4096), port=68)
            if udp is not None and packet.decode(udp.payload).options[53] == b"\x02":
                seen.append(time.monotonic())
        await asyncio.sleep(0.002)
    return seen


async def spaced(node: Node, first: int, count: int) -> int:
    """DISCOVERs from `count` new clients 10 ms apart; how many were answered."""
    for i in range(first, first + count):
        node.tx.send(discover(mac(i)))
        await asyncio.sleep(0.01)
    return len(await answers(node, count))


async def burst_while_waiting(node: Node, out: dict[str, Any]) -> None:
    node.server.open()
    node.tx.send(discover(mac(0)))
    await answers(node, 1)
    # Read at once; the next read waits 0.5 s. Ten clients come 10 ms apart meanwhile.
    out["answered"] = await spaced(node, 1, 10)
    out["reads"] = list(node.counters.reads)


async def after_a_quiet_interval(node: Node, out: dict[str, Any]) -> None:
    node.server.open()
    node.tx.send(discover(mac(0)))
    await answers(node, 1)
    await asyncio.sleep(1.3)  # past the 1 s interval: the timed read found nothing
    sent = time.monotonic()
    node.tx.send(discover(mac(1)))
    seen = await answers(node, 1)
    out["waited"] = seen[0] - sent if seen else None
    out["reads"] = list(node.counters.reads)


async def a_queue_longer_than_a_batch(node: Node, out: dict[str, Any]) -> None:
    server_module.RECEIVE_BUFFER = 4 << 20  # room for them all, far from closing the gate
    node.server.open()
    node.tx.send(discover(mac(0)))
    await answers(node, 1)
    for i in range(1, 151):  # queued while the next read waits 1 s
        node.tx.send(discover(mac(i)))
    seen = await answers(node, 150, within=8.0)
    out["answered"] = len(seen)
    out["spread"] = seen[-1] - seen[0] if seen else None
    out["reads"] = list(node.counters.reads)


async def drained_while_waiting(node: Node, out: dict[str, Any]) -> None:
    node.server.open()
    node.tx.send(discover(mac(0)))
    await answers(node, 1)
    await node.server.drain()  # a graceful stop, while a timed read is due in 0.3 s
    node.tx.send(discover(mac(1)))
    out["after_drain"] = len(await answers(node, 1, within=0.9))


async def reopened_while_waiting(node: Node, out: dict[str, Any]) -> None:
    node.server.open()
    node.tx.send(discover(mac(0)))
    await answers(node, 1)
    node.server.open()  # the bridge was recreated while a timed read was due
    node.tx.send(discover(mac(1)))
    await answers(node, 1)
    out["answered"] = await spaced(node, 2, 5)
    out["reads"] = list(node.counters.reads)


def run(directory: str, read_interval: float, script: Script) -> dict[str, object]:
    # Frames wait here longer than a DISCOVER may before it is shed (the real interval is at
    # most 50 ms): this child process lets them.
    server_module.STALE_DISCOVER_SECONDS = 5.0
    return play(directory, script, read_interval)


def test_requests_that_come_while_a_read_waits_are_read_and_answered_together(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(run, str(tmp_path), 0.5, burst_while_waiting)
    assert out["answered"] == 10
    assert out["reads"] == [1, 10]


def test_a_request_after_a_quiet_interval_is_read_at_once(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(run, str(tmp_path), 1.0, after_a_quiet_interval)
    assert out["reads"] == [1, 1]
    # Not held for an interval: answered in well under the 1 s one.
    assert out["waited"] is not None and out["waited"] < 0.5


def test_a_read_that_stops_at_a_full_batch_is_followed_by_the_next_at_once(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(run, str(tmp_path), 1.0, a_queue_longer_than_a_batch)
    assert out["answered"] == 150
    assert out["reads"] == [1, 64, 64, 22]
    # One interval's wait in all, not one per batch (three batches would span 2 s).
    assert out["spread"] < 0.5


def test_a_drain_stops_the_timed_reads(make_netns: Callable[[str], Netns], tmp_path: Path) -> None:
    out = make_node(make_netns).call(run, str(tmp_path), 0.3, drained_while_waiting)
    assert out["after_drain"] == 0


def test_a_socket_opened_anew_reads_at_once_and_then_paces(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(run, str(tmp_path), 0.5, reopened_while_waiting)
    assert out["answered"] == 5
    assert out["reads"] == [1, 1, 5]


class FailingOnce:
    """The server's packet socket, whose next read fails once with EIO once armed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.armed = sock, False

    def _fail(self) -> None:
        if self.armed:
            self.armed = False
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def recv(self, size: int) -> bytes:
        self._fail()
        return self.sock.recv(size)

    def recvmsg(self, size: int, ancillary: int) -> tuple[bytes, list[Any], int, Any]:
        self._fail()
        return self.sock.recvmsg(size, ancillary)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


async def a_timed_read_fails(node: Node, out: dict[str, Any]) -> None:
    node.server.open()
    sock = node.server._packet_sock
    assert sock is not None
    failing = FailingOnce(sock)
    node.server._packet_sock = cast("socket.socket", failing)
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    node.tx.send(discover(mac(0)))
    await answers(node, 1)
    failing.armed = True  # the timed read of what comes next fails
    node.tx.send(discover(mac(1)))
    out["answered"] = len(await answers(node, 1, within=3.0))
    out["failed"] = not failing.armed


def test_a_timed_read_that_fails_leaves_the_socket_read_on(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    out = make_node(make_netns).call(run, str(tmp_path), 0.3, a_timed_read_fails)
    assert out["failed"]
    assert out["answered"] == 1
