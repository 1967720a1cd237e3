"""A node, a VPC peer and N VMs, each in a network namespace of its own.

    peer ns                      node ns                                 VM ns (one per VM)
    uplink 10.99.0.2/24 ---veth--- uplink 10.99.0.1/24
    route SUBNET via node          default via peer
                                   veth0 ... vethN-1  ---veth---  eth0 (fixed MAC, no address)
                                   (no bridge yet: the daemon or adopt creates cni0,
                                    attach_vms() enslaves the vethK ends to it)

The peer stands in for the cloud VPC, which routes the VM subnet to the node. Veth pairs are
created directly in their namespaces (`ip -n A link add ... peer ... netns B`), so nothing ever
appears in the host's namespace, and deleting the namespaces removes every link. Everything a
sandbox writes goes under one temp directory, removed on exit with the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

from cocoon_net import proc
from cocoon_net.errors import HostSetupError, UsageError

NAME_PREFIX = "cnt-"
MAX_VMS = 9999  # keeps "cnt-<6 hex>v<index>" within 15 characters, like every name we create
VM_IFNAME = "eth0"
UPLINK = "uplink"

# The kernel's ARP table limits (gc_thresh1/2/3) are one set for the whole machine and only the
# initial namespace sees them (testbed-facts #8: 1,024 entries is the ceiling a server that injects
# ARP entries hits). A kernel that shows them inside a namespace gives that namespace its own
# copy, and only then do we raise them: never the host's.
NEIGH_GC_THRESH = {"gc_thresh1": 1024, "gc_thresh2": 8192, "gc_thresh3": 16384}
NEIGH_SYSCTL_DIR = "/proc/sys/net/ipv4/neigh/default"

# Run in the peer: print the bound port, then the source address of the first datagram.
_UDP_SOURCE_PROBE = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(float(sys.argv[2]))
print(s.getsockname()[1], flush=True)
print(s.recvfrom(64)[1][0], flush=True)
"""
_UDP_SEND = """\
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"?", (sys.argv[1], int(sys.argv[2])))
"""


def vm_mac(index: int) -> str:
    """The fixed MAC of VM `index`: locally administered (0x02), unicast, distinct per index."""
    if not 0 <= index < 1 << 16:
        raise UsageError(f"VM index {index} out of range 0..65535")
    return f"02:cc:00:00:{index >> 8:02x}:{index & 0xFF:02x}"


@dataclass(frozen=True)
class Vm:
    """One VM: its namespace, its eth0 MAC, the node-side veth end and its private state dir."""

    index: int
    netns: str
    mac: str
    port: str
    statedir: Path
    ifname: str = VM_IFNAME


def ipv4_addresses(netns: str, ifname: str) -> list[IPv4Interface]:
    """The global IPv4 addresses on ifname inside netns, as the kernel reports them."""
    links = proc.run_json(["ip", "-n", netns, "-4", "-j", "addr", "show", "dev", ifname])
    return [
        IPv4Interface(f"{info['local']}/{info['prefixlen']}")
        for link in links
        for info in link.get("addr_info", [])
        if info.get("scope") == "global"
    ]


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is netns."""
    out = proc.run(["ip", "netns", "pids", netns], ok_codes=(0, 1)).stdout
    return [int(pid) for pid in out.split()]


class Sandbox:
    """Build the topology on enter, remove all of it on exit, even after a failure.

    Names are `cnt-<6 hex><role>`: role `n` (node), `p` (peer), `v<index>` (VMs).
    """

    def __init__(
        self,
        vms: int = 3,
        *,
        subnet: str = "172.20.100.0/24",
        gateway: str | None = None,
        uplink: str = "10.99.0.0/24",
        tmpdir: Path | None = None,
    ) -> None:
        try:
            self.subnet = IPv4Network(subnet)
            uplink_net = IPv4Network(uplink)
            self.gateway = IPv4Address(gateway) if gateway else next(self.subnet.hosts())
        except (ValueError, StopIteration) as exc:
            raise UsageError(f"sandbox addresses: {exc}") from None
        if self.gateway not in self.subnet or self.gateway in (
            self.subnet.network_address,
            self.subnet.broadcast_address,
        ):
            raise UsageError(f"sandbox gateway {self.gateway} is not a host of {self.subnet}")
        if self.subnet.overlaps(uplink_net) or uplink_net.num_addresses < 4:
            raise UsageError(
                f"sandbox uplink {uplink_net} must be a /30 or larger apart from {subnet}"
            )
        if not 0 < vms <= MAX_VMS:
            raise UsageError(f"sandbox VM count {vms} out of range 1..{MAX_VMS}")
        token = secrets.token_hex(3)
        self.node = f"{NAME_PREFIX}{token}n"
        self.peer = f"{NAME_PREFIX}{token}p"
        self.node_uplink = IPv4Interface(f"{uplink_net[1]}/{uplink_net.prefixlen}")
        self.peer_uplink = IPv4Interface(f"{uplink_net[2]}/{uplink_net.prefixlen}")
        self._vm_count = vms
        self._tmpdir = tmpdir
        self.workdir = Path()
        self.vms: tuple[Vm, ...] = ()
        self.neigh_gc_thresh3: int | None = None
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    @property
    def namespaces(self) -> list[str]:
        return [self.node, self.peer, *(vm.netns for vm in self.vms)]

    @property
    def peer_ip(self) -> IPv4Address:
        return self.peer_uplink.ip

    def __enter__(self) -> Sandbox:
        try:
            self._build()
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

    def _build(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.node}-", dir=self._tmpdir))
        token = self.node[len(NAME_PREFIX) : -1]
        self.vms = tuple(
            Vm(
                index=i,
                netns=f"{NAME_PREFIX}{token}v{i}",
                mac=vm_mac(i),
                port=f"veth{i}",
                statedir=self.workdir / f"vm{i}",
            )
            for i in range(self._vm_count)
        )
        for name in self.namespaces:
            proc.run(["ip", "netns", "add", name])
            self._created.append(name)
            proc.run(["ip", "-n", name, "link", "set", "lo", "up"])

        self._veth(self.node, UPLINK, self.peer, UPLINK)
        self._ip(self.node, "addr", "add", str(self.node_uplink), "dev", UPLINK)
        self._ip(self.peer, "addr", "add", str(self.peer_uplink), "dev", UPLINK)
        self._ip(self.node, "route", "add", "default", "via", str(self.peer_ip))
        self._ip(self.peer, "route", "add", str(self.subnet), "via", str(self.node_uplink.ip))

        for vm in self.vms:
            vm.statedir.mkdir(mode=0o755)
            self._veth(self.node, vm.port, vm.netns, vm.ifname, peer_mac=vm.mac)
        self.neigh_gc_thresh3 = self._raise_neigh_limits()

    def _ip(self, netns: str, *argv: str) -> None:
        proc.run(["ip", "-n", netns, *argv])

    def _veth(self, a: str, a_if: str, b: str, b_if: str, *, peer_mac: str | None = None) -> None:
        mac = ["address", peer_mac] if peer_mac else []
        self._ip(a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, *mac, "netns", b)
        self._ip(a, "link", "set", a_if, "up")
        self._ip(b, "link", "set", b_if, "up")

    def _raise_neigh_limits(self) -> int | None:
        """Raise the node's ARP table limits if it has its own and may change them; return
        the resulting gc_thresh3, or None where the kernel keeps one limit for the machine."""
        script = (
            f'[ -d {NEIGH_SYSCTL_DIR} ] || exit 3; for kv in "$@"; do '
            f'echo "${{kv#*=}}" > {NEIGH_SYSCTL_DIR}/"${{kv%%=*}}" || exit 3; done; '
            f"cat {NEIGH_SYSCTL_DIR}/gc_thresh3"
        )
        pairs = [f"{k}={v}" for k, v in NEIGH_GC_THRESH.items()]
        out = self.run(self.node, ["sh", "-c", script, "sh", *pairs], ok_codes=(0, 3))
        return int(out.stdout) if out.returncode == 0 else None

    def attach_vms(self, bridge: str = "cni0") -> None:
        """Enslave every VM's node-side veth to bridge with port isolation on, as the CNI
        conflist's `portIsolation: true` does: VMs reach the bridge (gateway), not each other."""
        for vm in self.vms:
            self._ip(self.node, "link", "set", "dev", vm.port, "master", bridge)
            self._ip(
                self.node, "link", "set", "dev", vm.port, "type", "bridge_slave", "isolated", "on"
            )

    def run(
        self, netns: str, argv: Sequence[str], *, ok_codes: Sequence[int] = (0,)
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside one of this sandbox's namespaces and wait for it."""
        self._check_ours(netns)
        return proc.run(["ip", "netns", "exec", netns, *argv], ok_codes=ok_codes)

    def popen(self, netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside one of this sandbox's namespaces; it is killed on exit at latest."""
        self._check_ours(netns)
        child: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], **kwargs
        )
        self._procs.append(child)
        return child

    def source_seen_by_peer(self, netns: str, *, timeout: float = 5.0) -> IPv4Address:
        """Send one UDP datagram from netns to the VPC peer; return the source address the peer
        sees: the VM's own address when the node routes, the node's when it masquerades."""
        with self.popen(
            self.peer,
            [sys.executable, "-c", _UDP_SOURCE_PROBE, str(self.peer_ip), str(timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as listener:
            assert listener.stdout is not None  # stdout=PIPE
            try:
                port = listener.stdout.readline().strip()
                if port:
                    self.run(netns, [sys.executable, "-c", _UDP_SEND, str(self.peer_ip), port])
                seen, _ = listener.communicate(timeout=timeout + 5)
            finally:
                listener.kill()  # a no-op once it has exited; leaving the block reaps it
        if listener.returncode != 0 or not seen.strip():
            raise HostSetupError(f"no datagram from {netns} reached the peer within {timeout:g} s")
        return IPv4Address(seen.strip())

    def _check_ours(self, netns: str) -> None:
        if netns not in self._created:
            raise UsageError(f"{netns!r} is not a namespace of this sandbox")

    def close(self) -> None:
        """Kill every process in the namespaces, delete them and the workdir; report failures."""
        errors: list[str] = []
        for child in self._procs:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        for name in self._created:
            try:
                self._kill_all(name)
            except HostSetupError as exc:
                errors.append(str(exc))
        for name in reversed(self._created):
            # Deleting a namespace destroys its links; a veth dies with either end.
            result = subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                errors.append(f"ip netns del {name}: {result.stderr.strip()}")
        self._created.clear()
        self._procs.clear()
        if self.workdir != Path():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise HostSetupError("sandbox cleanup incomplete: " + "; ".join(errors))

    @staticmethod
    def _kill_all(netns: str) -> None:
        """SIGKILL whatever runs in netns (clients fork and double-fork) until nothing does."""
        deadline = time.monotonic() + 5
        while pids := netns_pids(netns):
            if time.monotonic() > deadline:
                raise HostSetupError(f"processes {pids} in {netns} survive SIGKILL")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
