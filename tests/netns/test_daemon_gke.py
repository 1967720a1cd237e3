"""The GCE guest agent's `local <alias range>` route stays removed while the daemon runs.

The agent adds it when the alias range is assigned and again whenever it resyncs; with it the
node answers for every VM address itself. The daemon removes it at start and
whenever a netlink event shows it back, with no cron job.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cocoon_net import state
from cocoon_net.sandbox import Sandbox
from cocoon_net.sandbox.node import SandboxNode
from tests.support.netns import is_root

pytestmark = pytest.mark.netns


def _local_routes(sb: Sandbox) -> str:
    return sb.run(sb.node, ["ip", "route", "show", "table", "local", "type", "local"]).stdout


def _wait_gone(sb: Sandbox, cidr: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"local {cidr} " not in _local_routes(sb):
            return True
        time.sleep(0.1)
    return False


def test_daemon_keeps_the_guest_agent_route_away(tmp_path: Path) -> None:
    if not is_root():
        pytest.skip("needs root")
    with Sandbox(1) as sb:
        node = SandboxNode(sb, tmp_path)
        node.adopt("gke-node")
        pool = state.load(node.paths.pool_file)
        pool.platform = "gke"  # as `init --platform gke` leaves it; no cloud call is made here
        state.save(node.paths.pool_file, pool)
        cidr = str(sb.subnet)
        add = ["ip", "route", "add", "local", cidr, "dev", "uplink", "table", "local"]
        sb.run(sb.node, add)
        try:
            node.start()
            assert _wait_gone(sb, cidr), "removed at start"
            sb.run(sb.node, add)  # the agent resyncs
            assert _wait_gone(sb, cidr), "removed again after the netlink event"
            assert "local 10.99.0.1 " in _local_routes(sb)  # the node's own stays
        finally:
            node.stop()
            pool.platform = "static"
            state.save(node.paths.pool_file, pool)
            node.teardown()
