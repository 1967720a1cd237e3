"""Lease store throughput: N clients each committing one grant at a time, as ACKs would.

    .venv/bin/python bench/store_bench.py [--dir DIR] [--clients 64] [--commits 5000]

Prints commits/s, fsyncs (batches), mean batch size and fsync latency percentiles. Put --dir
on the disk the daemon's state directory lives on; tmpfs makes fsync free.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.model import Lease
from cocoon_net.dhcp.store import LeaseStore


async def storm(store: LeaseStore, clients: int, commits: int) -> None:
    async def client(first: int) -> None:
        for n in range(first, commits, clients):
            mac = f"52:54:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"
            lease = Lease(mac, IPv4Address(0x0A000000 + n), time.time() + 86400)
            await store.commit([Record.grant(lease)])

    await asyncio.gather(*(client(i) for i in range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--commits", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        fsyncs: list[float] = []
        store = LeaseStore(Path(tmp) / "leases.json", observe_fsync=fsyncs.append)
        store.open()
        started = time.perf_counter()
        asyncio.run(storm(store, args.clients, args.commits))
        took = time.perf_counter() - started
        stats = store.stats()
        store.close()
    q = statistics.quantiles(fsyncs, n=100) if len(fsyncs) > 1 else fsyncs * 99
    print(
        f"{args.commits} commits from {args.clients} clients in {took:.2f}s: "
        f"{args.commits / took:.0f}/s, {stats.batches} fsyncs, "
        f"{stats.records / max(stats.batches, 1):.1f} records/fsync, "
        f"{stats.compactions} compactions; fsync p50 {q[49] * 1e3:.2f} ms, "
        f"p99 {q[98] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
