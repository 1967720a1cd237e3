"""Reconcile rounds while lease changes are on their way to the disk.

A REQUEST's lease is in the table at once, its route and guard element only after its journal
records are fdatasync'ed. A reconcile round in between must leave that address alone: adding
the route or the element would put them before the lease is durable, count a repair that was
none, and (for the guard) fall back to listing every element of the kernel's tables.

Real kernel in a fresh namespace (routes over netlink, the guard's nftables tables), a real
lease store whose fdatasync is held at a gate, the server fed frames through a recording
packet socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

import pytest

from cocoon_net import config
from cocoon_net.dhcp import server as server_module
from cocoon_net.dhcp.leases import LeaseTable
from cocoon_net.dhcp.model import MessageType
from cocoon_net.dhcp.server import DhcpServer
from cocoon_net.dhcp.store import LeaseStore
from cocoon_net.node import guard, guard_reconcile, route_reconcile, rtnl
from cocoon_net.node.nft import Nft
from cocoon_net.sandbox import Sandbox
from tests.support.daemon import NodeDaemon
from tests.support.netns import is_root, netns
from tests.unit.test_dhcp_server import (
    DISCOVER,
    GW,
    IP,
    POOL,
    SELECT,
    SERVER_MAC,
    SETTINGS,
    VM_MAC,
    Events,
    RecordingSocket,
    acks,
    request,
    vm,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

BRIDGE = "cni0"
RELEASE = vm(request(MessageType.RELEASE, ciaddr=IP, server_id=GW), src_ip=IP, dst=GW)


class _Gate:
    """fdatasync blocks at the gate while it is armed; `entered` once a held call began."""

    def __init__(self) -> None:
        self.armed = False
        self.entered, self.open = threading.Event(), threading.Event()
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            if self.armed:
                self.entered.set()
                self.open.wait(30)
            real(fd)

        # In the test's own child process, which exits after.
        pytest.MonkeyPatch().setattr(os, "fdatasync", fdatasync)

    def hold(self) -> None:
        self.armed, self.entered, self.open = True, threading.Event(), threading.Event()

    def release(self) -> None:
        self.armed = False
        self.open.set()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _round_in_flight(directory: str) -> list[tuple[str, object]]:
    """Run in a fresh namespace with BRIDGE: a grant, then a release, each with a reconcile
    round (routes, then the guard) while its fdatasync is held; what was seen at each step."""
    server_module.HERE_GROUP = 0  # every group goes through the journal writer, as under load
    gate = _Gate()
    logs = _Lines()
    for name in ("cocoon_net.guard", "cocoon_net.routes"):
        logging.getLogger(name).addHandler(logs)
        logging.getLogger(name).setLevel(logging.DEBUG)
    events = Events()
    store = LeaseStore(Path(directory) / "leases.json")
    store.open()
    table = LeaseTable(POOL)
    route_sock = rtnl.RouteSocket()
    routes = route_reconcile.Reconciler(route_sock, BRIDGE, SETTINGS.subnet)
    paths = config.Paths(Path(directory), Path(directory), Path(directory))
    guards = guard_reconcile.Reconciler(paths, BRIDGE, table, 5.0)
    handle = guard.Guard(guard.GuardPolicy(BRIDGE, GW))
    handle.install({}, guard.bridge_ports(BRIDGE))
    guards.handle = handle  # as start() leaves it, without recording it in a pool.json
    server = DhcpServer(
        bridge=BRIDGE, settings=SETTINGS, table=table, store=store, routes=route_sock, guard=handle
    )
    sock = RecordingSocket(events)
    server._packet_sock = cast("object", sock)  # type: ignore[assignment]
    server._udp_sock = cast("object", RecordingSocket(events))  # type: ignore[assignment]
    index = rtnl.ifindex(BRIDGE)
    assert index is not None
    server.state.ifindex, server.state.mac = index, SERVER_MAC
    seen: list[tuple[str, object]] = []

    def kernel(step: str) -> None:
        found = guard.read_kernel(Nft())
        assert found is not None
        routed = sorted(map(str, routes.ours()))
        seen.append((step, (routed, {str(ip): mac for ip, mac in found.elements.items()})))

    async def reconcile_round(step: str) -> None:
        before = len(logs.lines)
        fixed = routes.reconcile(
            table, time.time(), server.sync_routes, unsettled=server.unsettled()
        )
        repaired = await guards.reconcile(server.unsettled)
        seen.append((step, (fixed, repaired, logs.lines[before:])))

    async def in_flight(frame: bytes, step: str) -> None:
        gate.hold()
        sock.incoming.append(frame)
        server._on_frames()
        assert await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 30)
        seen.append((f"{step}: unsettled", sorted(map(str, server.unsettled()))))
        await reconcile_round(f"{step}: round")
        kernel(f"{step}: kernel")
        gate.release()
        await server.drain()
        seen.append((f"{step}: done, unsettled", sorted(map(str, server.unsettled()))))
        kernel(f"{step}: done, kernel")

    async def run() -> None:
        await reconcile_round("first round")
        sock.incoming.append(DISCOVER)
        server._on_frames()
        await in_flight(SELECT, "grant")
        seen.append(("acks", [str(m.yiaddr) for m in acks(events)]))
        await in_flight(RELEASE, "release")
        await reconcile_round("last round")

    try:
        asyncio.run(run())
    finally:
        gate.release()
        store.close(compact=False)
        handle.close()
        route_sock.close()
    return seen


def test_a_reconcile_round_leaves_addresses_whose_lease_is_not_durable_yet(
    tmp_path: Path,
) -> None:
    ip = str(IP)
    with netns("unsettled") as ns:
        ns.ip("link", "add", BRIDGE, "type", "bridge")
        ns.ip("link", "set", BRIDGE, "up")
        ns.ip("addr", "add", f"{GW}/24", "dev", BRIDGE)
        seen = dict(ns.call(_round_in_flight, str(tmp_path)))
    untouched = "as the guard left it; not listed"
    first = cast("tuple[int, bool, list[str]]", seen["first round"])
    assert first[:2] == (0, False) and len(first[2]) == 1 and untouched in first[2][0]
    for step in ("grant", "release"):
        assert seen[f"{step}: unsettled"] == [ip]
        fixed, repaired, lines = cast("tuple[int, bool, list[str]]", seen[f"{step}: round"])
        # Nothing changed, nothing counted, and the guard's tables not listed.
        assert (fixed, repaired) == (0, False)
        assert len(lines) == 1 and untouched in lines[0], lines
        assert seen[f"{step}: done, unsettled"] == []
    # In flight, the kernel stays as it was before the request...
    assert seen["grant: kernel"] == ([], {})
    assert seen["release: kernel"] == ([ip], {ip: VM_MAC})
    # ...and follows once the journal has it, by the request's own path.
    assert seen["grant: done, kernel"] == ([ip], {ip: VM_MAC})
    assert seen["acks"] == [ip]
    assert seen["release: done, kernel"] == ([], {})
    last = cast("tuple[int, bool, list[str]]", seen["last round"])
    assert last[:2] == (0, False)


# ---------------------------------------------------------------- the daemon under load

REPO = Path(__file__).resolve().parents[2]
LOAD_RATE, LOAD_CLIENTS = 1500, 12000  # eight seconds of DORA exchanges, each from its own MAC


def test_reconcile_rounds_during_a_boot_storm_repair_nothing(tmp_path: Path) -> None:
    """A link that is not ours comes and goes on the node while thousands of VMs ask for
    leases: each change brings a full reconcile round, which must find nothing to repair
    (the grants in flight are left to their own commit) and leave the guard unlisted."""
    with Sandbox(1, subnet="172.21.0.0/18", tmpdir=tmp_path) as sandbox:
        node = NodeDaemon(sandbox, tmp_path / "node", lease_time="3600")
        try:
            node.adopt("demo", "--pool-size", str(LOAD_CLIENTS + 100))
            node.start()
            load = subprocess.Popen(
                ["ip", "netns", "exec", sandbox.vms[0].netns, sys.executable, "-m",
                 "bench.loadgen", "--ifname", sandbox.vms[0].ifname,
                 "--rate", str(LOAD_RATE), "--clients", str(LOAD_CLIENTS)],
                cwd=REPO, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert load.stdout is not None
            assert load.stdout.readline().strip() == "go"
            rounds = 0
            while load.poll() is None and rounds < 60:
                # Added and deleted inside one settle time: one round each time.
                sandbox.run(sandbox.node, ["ip", "link", "add", "foreign0", "type", "bridge"])
                sandbox.run(sandbox.node, ["ip", "link", "del", "foreign0"])
                rounds += 1
                time.sleep(0.4)
            out, _ = load.communicate(timeout=120)
            result = json.loads(out.splitlines()[-1])
            log = node.log()
            repairs = node.metric("cocoon_net_repairs_total", what="route")
            node.routes_equal_leases()
        finally:
            node.close()
    assert result["completed"] > LOAD_CLIENTS // 2, (result, log[-3000:])  # it was a load
    assert "VM guard: ruleset at generation" in log  # the rounds ran, the guard unlisted
    assert "routes reconciled" not in log
    assert "restored" not in log and "while listed" not in log
    assert repairs == 0
