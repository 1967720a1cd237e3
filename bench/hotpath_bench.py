"""CPU per DORA of the server's own path, in one process: where the daemon's time goes when
the kernel, the other VMs and the load generator are taken away.

    .venv/bin/python -m bench.hotpath_bench [--clients N] [--dir DIR] [--idle SECONDS ...]

Each client's DISCOVER and REQUEST go through `DhcpServer._on_frames` as frames on a
datagram socket pair, with a real lease table (a /16 of 65,000 addresses) and a real lease
store in DIR (its journal fdatasync'ed per REQUEST, as in the daemon). Routes and the guard
are left out: their cost is the kernel's, and the ladder measures it. What is timed is the
process's CPU time spent in the server's calls only, never in building the client's frames.

`--idle` sleeps that long between clients, as a server at 1,000 DORA/s does between
packets: the same instructions then run with cold caches. The difference between `--idle 0`
and `--idle 0.0005` is the share of the ladder's CPU per DORA at 1,000/s that comes from
waking up, not from the work.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from bench.loadgen import client_macs, discover_frame, request_frame
from cocoon_net.dhcp.leases import LeaseTable
from cocoon_net.dhcp.model import MessageType
from cocoon_net.dhcp.packet import decode
from cocoon_net.dhcp.server import DhcpServer
from cocoon_net.dhcp.settings import DhcpSettings
from cocoon_net.dhcp.store import LeaseStore
from cocoon_net.node import rtnl

NETWORK = IPv4Network("172.20.0.0/16")
GATEWAY = IPv4Address("172.20.0.1")
POOL_SIZE = 65_000
SERVER_MAC = bytes.fromhex("0200000000fe")
PAYLOAD = 14 + 20 + 8  # a reply frame's Ethernet, IPv4 and UDP headers
YIADDR = slice(PAYLOAD + 16, PAYLOAD + 20)


class NoRoutes(rtnl.RouteSocket):
    """Routes are the kernel's work, measured by the ladder: here they cost nothing."""

    def __init__(self) -> None:  # no netlink socket
        pass

    def apply(self, ops: Iterable[rtnl.RouteOp], ifindex: int) -> dict[rtnl.RouteOp, str]:
        return {}


async def run(clients: int, directory: Path, idle: float) -> tuple[float, float]:
    """CPU seconds per DISCOVER and per REQUEST (with its commit), each averaged."""
    pool = [NETWORK.network_address + 2 + i for i in range(POOL_SIZE)]
    settings = DhcpSettings(server_id=GATEWAY, subnet=NETWORK, router=GATEWAY)
    store = LeaseStore(directory / "leases.json")
    store.open()
    server = DhcpServer(
        bridge="cni0", settings=settings, table=LeaseTable(pool), store=store, routes=NoRoutes()
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    server._packet_sock = server._udp_sock = ours  # what open() binds on the bridge
    server.state.ifindex, server.state.mac = 1, SERVER_MAC
    macs = client_macs(clients)
    discovers = [discover_frame(mac, xid) for xid, mac in enumerate(macs)]
    cpu = time.process_time
    discover_cpu = request_cpu = 0.0
    try:
        for xid, mac in enumerate(macs):
            theirs.send(discovers[xid])
            started = cpu()
            server._on_frames()
            discover_cpu += cpu() - started
            offered = IPv4Address(theirs.recv(4096)[YIADDR])
            theirs.send(request_frame(mac, xid, offered, GATEWAY.packed))
            started = cpu()
            server._on_frames()
            await server.drain()
            request_cpu += cpu() - started
            ack = decode(theirs.recv(4096)[PAYLOAD:])
            if ack.message_type != MessageType.ACK or ack.yiaddr != offered:
                raise RuntimeError(f"client {xid}: {ack.message_type} for {ack.yiaddr}, not ACK")
            if idle:
                time.sleep(idle)
    finally:
        ours.close()
        theirs.close()
        store.close(compact=False)
    return discover_cpu / clients, request_cpu / clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3000, help="DORA exchanges per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median shown)")
    parser.add_argument("--dir", type=Path, default=None, help="where the lease store lives")
    parser.add_argument(
        "--idle", type=float, nargs="+", default=[0.0, 0.0005], help="seconds between clients"
    )
    args = parser.parse_args()
    print(f"{args.clients} clients per run, median of {args.runs}; CPU µs per exchange")
    for idle in args.idle:
        results = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                results.append(asyncio.run(run(args.clients, Path(tmp), idle)))
        discover = statistics.median(r[0] for r in results) * 1e6
        request = statistics.median(r[1] for r in results) * 1e6
        print(
            f"idle {idle * 1000:5.2f} ms between clients: DISCOVER {discover:6.1f}, "
            f"REQUEST (commit, fdatasync, reply) {request:6.1f}, DORA {discover + request:6.1f}"
        )


if __name__ == "__main__":
    main()
