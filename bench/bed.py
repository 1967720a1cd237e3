"""The bench's namespaces: a node with cni0 and one load namespace plugged into the bridge.

    load ns                      node ns (cocoon-net adopt: cni0 with the gateway address)
    eth0 (no address) ---veth--- veth0, a port of cni0

Built on the project's sandbox (the same topology the netns tests use), so every name is a
`cnt-` namespace, veths never appear in the host's namespace, and everything is deleted on exit,
after an error or Ctrl-C too. `adopt --platform static` registers the pool; teardown undoes it
before the namespaces go.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType

from bench.servers import Site
from cocoon_net import config
from cocoon_net.sandbox import Sandbox

BRIDGE = "cni0"
HOST_GC_THRESH3 = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")


@dataclass(frozen=True)
class Cpus:
    """Which CPU the load generator and the server get; None where there is only one."""

    loadgen: int | None
    server: int | None

    @classmethod
    def split(cls) -> Cpus:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None)
        return cls(cpus[0], cpus[1])


def cocoon_net(netns: str, command: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command of this checkout's CLI in `netns`; fail with its one-line error."""
    result = subprocess.run(
        [sys.executable, "-m", "cocoon_net", "--netns", netns, command, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cocoon-net {command}: {result.stderr.strip()}")
    return result


class Bed:
    """Node and load namespaces with the pool adopted; a context manager that cleans up."""

    def __init__(self, subnet: IPv4Network, pool_size: int, workdir: Path) -> None:
        self.subnet = subnet
        self.gateway = next(subnet.hosts())
        self.pool = config.first_hosts(subnet, self.gateway, pool_size)
        self.workdir = workdir
        self.paths = config.Paths(
            state_dir=workdir / "state", run_dir=workdir / "run", cni_conf_dir=workdir / "cni"
        )
        self.cpus = Cpus.split()
        # The relay address (perfdhcp's -l) sits inside the subnet and outside the pool (#1).
        self.relay_ip = subnet[-2]
        self._sandbox = Sandbox(vms=1, subnet=str(subnet), tmpdir=workdir)
        self._adopted = False

    @property
    def node(self) -> str:
        return self._sandbox.node

    @property
    def namespaces(self) -> list[str]:
        return self._sandbox.namespaces

    @property
    def loadgen_ns(self) -> str:
        return self._sandbox.vms[0].netns

    @property
    def loadgen_if(self) -> str:
        return self._sandbox.vms[0].ifname

    @property
    def neigh_limit(self) -> str:
        """The node's ARP table ceiling, and whose it is (#8)."""
        if self._sandbox.neigh_gc_thresh3 is not None:
            return f"{self._sandbox.neigh_gc_thresh3} (raised in the node namespace)"
        try:
            host = HOST_GC_THRESH3.read_text().strip()
        except OSError:
            host = "unknown"
        return f"{host} (host-wide; this kernel keeps it out of namespaces)"

    def site(self, *, relay: bool) -> Site:
        return Site(
            node=self.node,
            bridge=BRIDGE,
            subnet=self.subnet,
            gateway=self.gateway,
            pool_first=self.pool[0],
            pool_last=self.pool[-1],
            paths=self.paths,
            cpu=self.cpus.server,
            relay=self.relay_ip if relay else None,
        )

    def __enter__(self) -> Bed:
        self._sandbox.__enter__()
        try:
            cocoon_net(
                self.node,
                "adopt",
                "--platform",
                "static",
                "--node-name",
                "bench",
                "--subnet",
                str(self.subnet),
                "--pool-size",
                str(len(self.pool)),
                "--manage-iptables",
                "--state-dir",
                str(self.paths.state_dir),
                "--run-dir",
                str(self.paths.run_dir),
                "--cni-conf-dir",
                str(self.paths.cni_conf_dir),
            )
            self._adopted = True
            self._sandbox.attach_vms(BRIDGE)
            self.ip_node("link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._adopted:
                self._adopted = False
                cocoon_net(
                    self.node,
                    "teardown",
                    "--state-dir",
                    str(self.paths.state_dir),
                    "--run-dir",
                    str(self.paths.run_dir),
                )
        finally:
            self._sandbox.close()

    def node_exec(self, *argv: str) -> str:
        """Run a command in the node namespace; return what it printed."""
        return self._sandbox.run(self.node, list(argv)).stdout

    def ip_node(self, *argv: str) -> str:
        return self.node_exec("ip", *argv)

    def flush_neighbours(self) -> None:
        """Empty the node's ARP table on the bridge, so that every step starts with the room
        dnsmasq's per-client ARP injection needs (#8): its limit is then per step, not per run."""
        self.ip_node("neigh", "flush", "dev", BRIDGE)

    def forget_clients(self) -> None:
        """Between servers: no neighbour entries or /32 routes left from the previous one."""
        self.flush_neighbours()
        self.ip_node("route", "flush", "proto", str(config.ROUTE_PROTO), "dev", BRIDGE)

    def socket_drops(self, pid: int) -> int:
        """Datagrams the kernel dropped on pid's packet and UDP sockets in the node because
        their receive queue was full (`ss` skmem d<N>): load the server did not read in time."""
        out = self.node_exec("ss", "-0", "-u", "-a", "-m", "-p", "-n", "-H")
        # ss wraps a socket's skmem onto the next, indented line; rejoin them.
        entries = re.split(r"\n(?=\S)", out)
        owner = f"pid={pid},"
        return sum(
            int(m.group(1))
            for entry in entries
            if owner in entry
            for m in re.finditer(r"skmem:\([^)]*?,d(\d+)\)", entry)
        )

    def route_count(self) -> int:
        out = self.ip_node("route", "show", "proto", str(config.ROUTE_PROTO), "dev", BRIDGE)
        return len(out.splitlines())

    def in_loadgen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start a process in the load namespace; it is killed on close at the latest."""
        return self._sandbox.popen(self.loadgen_ns, list(argv), text=True, **kwargs)

    def add_relay_address(self) -> IPv4Address:
        """Give the load namespace the relay address, for perfdhcp (#1)."""
        self._sandbox.run(
            self.loadgen_ns,
            [
                "ip",
                "addr",
                "add",
                f"{self.relay_ip}/{self.subnet.prefixlen}",
                "dev",
                self.loadgen_if,
            ],
        )
        return self.relay_ip
