"""`make demo`: a node, a VPC peer and three VMs in network namespaces, end to end.

adopt --platform static -> daemon -> dhclient, udhcpc and dhcpcd each get a lease -> each VM
reaches the VPC peer with its own address -> status -> a VM releases -> teardown. Everything
lives in namespaces and a temp directory made here, and is removed on the way out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cocoon_net.errors import CocoonError
from cocoon_net.sandbox.clients import Dhclient, Dhcpcd, DhcpClient, Udhcpc
from cocoon_net.sandbox.node import SandboxNode
from cocoon_net.sandbox.topology import Sandbox

CLIENT_ORDER: tuple[type[DhcpClient], ...] = (Udhcpc, Dhclient, Dhcpcd)


def say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(vms: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="cocoon-demo-") as tmp, Sandbox(vms) as sb:
        node = SandboxNode(sb, Path(tmp))
        say(f"== node {sb.node}, VPC peer {sb.peer} ({sb.peer_ip}), {vms} VMs on {sb.subnet}")
        say("== cocoon-net adopt --platform static")
        say(node.adopt().rstrip())
        say("== cocoon-net daemon")
        node.start()
        say("daemon ready")
        clients = [
            CLIENT_ORDER[i % len(CLIENT_ORDER)](sb, vm, hostname=f"vm{i}")
            for i, vm in enumerate(sb.vms)
        ]
        ok = True
        try:
            say("== VMs ask for addresses (real DHCP clients)")
            with ThreadPoolExecutor(len(clients)) as pool:
                ips = list(pool.map(lambda c: c.start(), clients))
            for client, ip in zip(clients, ips, strict=True):
                seen = sb.source_seen_by_peer(client.vm.netns)
                good = seen == ip
                ok &= good
                say(
                    f"{client.vm.netns} {type(client).__name__.lower():8} {client.vm.mac} -> {ip};"
                    f" the VPC peer sees {seen} {'(its own address)' if good else '(WRONG)'}"
                )
            say("== cocoon-net status")
            say(node.status().rstrip())
            first = clients[0]
            say(f"== {first.vm.netns} releases {ips[0]}")
            first.release()
            leases = node.status()
            gone = str(ips[0]) + " " not in leases
            ok &= gone
            say(f"lease and route of {ips[0]} {'gone' if gone else 'STILL THERE'}")
        finally:
            for client in clients:
                client.stop()
            node.stop()
            say("== cocoon-net teardown")
            say(node.teardown().rstrip())
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cocoon_net.sandbox", description=__doc__)
    parser.add_argument("--vms", type=int, default=3, help="number of VMs (default 3)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("cocoon-net demo: needs root to create network namespaces\n")
        return 1
    try:
        ok = run_demo(args.vms)
    except CocoonError as exc:
        sys.stderr.write(f"cocoon-net demo: {exc}\n")
        return 1
    say("== demo OK: every VM got a routed address and kept its own source address"
        if ok else "== demo FAILED (see above)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
