"""Idle CPU of the daemon: a full /24 pool leased (253 leases, routes, guard), nobody asking.

    .venv/bin/python -m bench.idle_cpu [--seconds 60]

The leases are written to the store before the daemon starts (as if granted earlier), so
the daemon starts with 253 leases to route, guard, expire and reconcile. What is measured is
the daemon's own CPU time (user + system, and the `ip` and `iptables-save` it runs) over the
window, as a share of one core: its sweep, host check, periodic reconcile and netlink reads.
Needs root (network namespaces); touches only the namespaces and directory it creates.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.procstat import cpu_seconds
from cocoon_net import state
from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.model import Lease
from cocoon_net.dhcp.store import LeaseStore
from cocoon_net.sandbox import Sandbox
from cocoon_net.sandbox.node import SandboxNode


def write_leases(node: SandboxNode, count: int) -> int:
    pool = state.load(node.paths.pool_file)
    path = node.paths.lease_file_for(pool.lease_file)
    ips = pool.pool_ips[:count]
    expires = time.time() + 86400
    store = LeaseStore(path)
    store.open()

    async def grant() -> None:
        await store.commit(
            Record.grant(Lease(f"52:54:00:00:{n >> 8:02x}:{n & 255:02x}", ip, expires))
            for n, ip in enumerate(ips)
        )

    asyncio.run(grant())
    store.close()
    return len(ips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window")
    parser.add_argument("--leases", type=int, default=253)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Sandbox(1, tmpdir=Path(tmp)) as sandbox:
        node = SandboxNode(sandbox, Path(tmp) / "node", lease_time="1d", metrics_addr=":9464")
        node.adopt("idle")
        leased = write_leases(node, args.leases)
        node.start()
        try:
            assert node.proc is not None
            time.sleep(5)  # start-up work (route and guard install) is not idle time
            before, started = cpu_seconds(node.proc.pid), time.monotonic()
            time.sleep(args.seconds)
            used, took = cpu_seconds(node.proc.pid) - before, time.monotonic() - started
        finally:
            node.stop()
    print(
        f"idle daemon, {leased} leases: {used:.2f} s CPU in {took:.0f} s = "
        f"{100 * used / took:.2f} % of one core"
    )


if __name__ == "__main__":
    main()
