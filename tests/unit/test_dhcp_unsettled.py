"""DhcpServer.unsettled: the addresses whose lease changed in the table while the change is
not on disk yet, which the reconcile rounds leave alone. Under load (every group through the
journal writer), with a real lease store whose fdatasync is held at a gate."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

import pytest

from cocoon_net import config
from cocoon_net.daemon import Daemon, DaemonOptions
from cocoon_net.dhcp import server as server_module
from cocoon_net.node import rtnl
from tests.unit.test_dhcp_server import (
    POOL,
    RENEW,
    T0,
    Events,
    RecordingRoutes,
    RecordingSocket,
    Rig,
    acks,
    other_renew,
    rig,
)


@pytest.fixture
def loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setattr(server_module, "HERE_GROUP", 0)
    yield from rig(tmp_path, Events())


def hold_fdatasync(
    monkeypatch: pytest.MonkeyPatch, *, fail: bool = False
) -> tuple[threading.Semaphore, threading.Semaphore]:
    """Every fdatasync waits for its own release of `gate` (then fails, with `fail`);
    `entered` is released as each call begins."""
    entered, gate = threading.Semaphore(0), threading.Semaphore(0)
    real = os.fdatasync

    def held(fd: int) -> None:
        entered.release()
        assert gate.acquire(timeout=30)
        if fail:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    return entered, gate


async def waited(event: threading.Semaphore) -> None:
    assert await asyncio.get_running_loop().run_in_executor(None, event.acquire, True, 30)


def in_flight(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False, second: bool = True
) -> list[set[IPv4Address]]:
    """A grant handed to the writer and held in its fdatasync, then a second one decided
    meanwhile; what unsettled() says before, with one and then both waiting, once the first
    is done (with `second`: the second held in its own fdatasync), and at the end."""
    entered, gate = hold_fdatasync(monkeypatch, fail=fail)
    sock = cast("RecordingSocket", rig.server._packet_sock)
    seen = [rig.server.unsettled()]

    async def run() -> None:
        sock.incoming.append(RENEW)
        rig.server._on_frames()
        await waited(entered)
        seen.append(rig.server.unsettled())
        sock.incoming.append(other_renew(POOL[1]))
        rig.server._on_frames()  # waits in `pending` for the first group's fsync
        seen.append(rig.server.unsettled())
        gate.release()
        if second:
            await waited(entered)  # the second group's fsync began
            for _ in range(3000):  # and the first group's ACK leaves meanwhile
                if acks(rig.events):
                    break
                await asyncio.sleep(0.01)
            seen.append(rig.server.unsettled())
            gate.release()
        await rig.server.drain()
        seen.append(rig.server.unsettled())

    try:
        asyncio.run(run())
    finally:
        for _ in range(2):
            gate.release()
    return seen


def test_unsettled_are_the_addresses_decided_or_on_their_way_to_the_disk(
    loaded: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, both = {POOL[0]}, {POOL[0], POOL[1]}
    assert in_flight(loaded, monkeypatch) == [set(), first, both, {POOL[1]}, set()]
    assert [m.yiaddr for m in acks(loaded.events)] == POOL[:2]


def test_a_group_that_failed_on_its_way_to_the_disk_leaves_nothing_unsettled(
    loaded: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, both = {POOL[0]}, {POOL[0], POOL[1]}
    assert in_flight(loaded, monkeypatch, fail=True, second=False) == [set(), first, both, set()]
    assert acks(loaded.events) == []


def test_a_flush_that_broke_leaves_nothing_unsettled(
    loaded: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in the routes' path ends the flusher: whatever it held must not stay unsettled
    # forever, or the reconcile rounds would never put those addresses right.
    class Broken(RecordingRoutes):
        def apply(self, ops: object, ifindex: int) -> dict[rtnl.RouteOp, str]:
            raise RuntimeError("a bug")

    loaded.server.routes = Broken(loaded.events)
    first, both = {POOL[0]}, {POOL[0], POOL[1]}
    assert in_flight(loaded, monkeypatch, second=False) == [set(), first, both, set()]
    assert acks(loaded.events) == []


def test_a_change_the_daemon_persists_is_unsettled_until_it_is_durable(
    loaded: Rig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A VM released by request (or an expiry, a probe's hold) is the daemon's own commit.
    loaded.feed(RENEW)
    daemon = Daemon(DaemonOptions(config.Paths(tmp_path, tmp_path, tmp_path), True, "", 60))
    daemon.server, daemon.store, daemon.table = loaded.server, loaded.store, loaded.server.table
    entered, gate = hold_fdatasync(monkeypatch)
    seen = [daemon.unsettled()]
    routed = len(loaded.events.log)

    async def run() -> None:
        lease = loaded.server.table.lease_at(POOL[0], T0)
        assert lease is not None
        persisting = asyncio.create_task(
            daemon.persist(loaded.server.table.release(lease.mac, lease.ip, T0))
        )
        await waited(entered)
        seen.append(daemon.unsettled())
        assert loaded.events.log[routed:] == []  # the route waits for the disk
        gate.release()
        await persisting
        seen.append(daemon.unsettled())

    try:
        asyncio.run(run())
    finally:
        gate.release()
    assert seen == [set(), {POOL[0]}, set()]
    assert loaded.events.log[routed:] == [("route", [rtnl.RouteOp(False, POOL[0])])]
