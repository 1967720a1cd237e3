"""The sandbox topology and the real DHCP client drivers, against dnsmasq as a stand-in server.

dnsmasq runs only here, in the node namespace of a sandbox, on a bridge the test creates; the
product code does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

import pytest

from cocoon_net.errors import HostSetupError, UsageError
from cocoon_net.sandbox import CLIENTS, Dhclient, Dhcpcd, DhcpClient, Sandbox, Udhcpc
from cocoon_net.sandbox.topology import NEIGH_GC_THRESH, ipv4_addresses, netns_pids
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

T = TypeVar("T")
R = TypeVar("R")

POOL_FIRST, POOL_LAST = IPv4Address("172.20.100.10"), IPv4Address("172.20.100.200")
HOST_FILES = ("/etc/resolv.conf", "/etc/hostname")
HOST_DIRS = ("/var/lib/dhcp", "/var/lib/dhcpcd", "/run/dhcpcd", "/etc/netns", "/etc/udhcpc")


def host_fingerprint() -> dict[str, object]:
    """What a misbehaving client would change on the host: files, state dirs, hostname."""
    out: dict[str, object] = {}
    for name in HOST_FILES:
        path = Path(name)
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    for name in HOST_DIRS:
        path = Path(name)
        out[name] = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
    out["hostname"] = sh_out("hostname")
    return out


def sh_out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def root_links_with_macs(macs: set[str]) -> list[str]:
    links = json.loads(sh_out("ip", "-j", "link"))
    return [link["ifname"] for link in links if link.get("address") in macs]


def in_parallel(fn: Callable[[T], R], items: list[T]) -> list[R]:
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def wait_for(probe: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Dnsmasq:
    leasefile: Path
    logfile: Path

    def leases(self) -> dict[str, tuple[IPv4Address, str]]:
        """mac -> (ip, hostname) from dnsmasq's lease file ("expiry mac ip hostname clientid")."""
        if not self.leasefile.exists():
            return {}
        rows = [line.split() for line in self.leasefile.read_text().splitlines() if line]
        return {row[1]: (IPv4Address(row[2]), row[3]) for row in rows}

    def count(self, message: str, mac: str) -> int:
        """How many times dnsmasq logged e.g. DHCPACK(cni0) for mac."""
        return sum(
            f"{message}(" in line and mac in line for line in self.logfile.read_text().splitlines()
        )


def bridge_with_dnsmasq(sb: Sandbox) -> Dnsmasq:
    """cni0 with the gateway, VMs attached, forwarding on, and dnsmasq serving the pool."""
    sb.run(sb.node, ["ip", "link", "add", "cni0", "type", "bridge"])
    sb.run(sb.node, ["ip", "addr", "add", f"{sb.gateway}/{sb.subnet.prefixlen}", "dev", "cni0"])
    sb.run(sb.node, ["ip", "link", "set", "cni0", "up"])
    sb.attach_vms("cni0")
    sb.run(sb.node, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
    server = Dnsmasq(sb.workdir / "dnsmasq.leases", sb.workdir / "dnsmasq.log")
    with server.logfile.open("wb") as log:
        sb.popen(
            sb.node,
            [
                "dnsmasq", "--keep-in-foreground", "--log-facility=-", "--log-dhcp",
                "--no-ping", "--port=0", "--conf-file=/dev/null", "--user=root",
                f"--dhcp-range={POOL_FIRST},{POOL_LAST},255.255.255.0,1h",
                f"--dhcp-leasefile={server.leasefile}", f"--pid-file={sb.workdir}/dnsmasq.pid",
                "--interface=cni0", "--bind-interfaces", "--dhcp-authoritative",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for(lambda: "DHCP, IP range" in server.logfile.read_text(), "dnsmasq to start")
    return server


@pytest.fixture
def host_untouched() -> Iterator[None]:
    before = host_fingerprint()
    yield
    assert host_fingerprint() == before


@pytest.fixture
def needs_tools() -> None:
    missing = [t for t in ("dnsmasq", "dhclient", "busybox", "dhcpcd") if not shutil.which(t)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def test_topology_links_routes_and_port_isolation(tmp_path: Path) -> None:
    with Sandbox(2, tmpdir=tmp_path) as sb:
        names = sb.namespaces
        assert all(n.startswith("cnt-") and len(n) <= 15 for n in names)
        assert len(set(names)) == len(names) == 4
        assert len({vm.mac for vm in sb.vms}) == 2
        assert all(int(vm.mac.split(":")[0], 16) & 0b11 == 0b10 for vm in sb.vms)
        assert root_links_with_macs({vm.mac for vm in sb.vms}) == []

        node_routes = json.loads(sb.run(sb.node, ["ip", "-j", "route"]).stdout)
        assert {"dst": "default", "gateway": str(sb.peer_ip)}.items() <= node_routes[0].items()
        peer_routes = json.loads(sb.run(sb.peer, ["ip", "-j", "route"]).stdout)
        assert any(
            r["dst"] == str(sb.subnet) and r.get("gateway") == str(sb.node_uplink.ip)
            for r in peer_routes
        )
        sb.run(sb.peer, ["ping", "-c1", "-W2", str(sb.node_uplink.ip)])

        for vm in sb.vms:
            link = json.loads(sb.run(vm.netns, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]
            assert link["address"] == vm.mac
            assert ipv4_addresses(vm.netns, "eth0") == []
            port = json.loads(sb.run(sb.node, ["ip", "-j", "link", "show", vm.port]).stdout)[0]
            assert "master" not in port
        with pytest.raises(HostSetupError):  # no address, no route: nothing reaches the peer
            sb.source_seen_by_peer(sb.vms[0].netns, timeout=1)

        # No ARP-table limits of its own on this kernel means None, never the host's values.
        has_own = sb.run(
            sb.node, ["test", "-d", "/proc/sys/net/ipv4/neigh/default"], ok_codes=(0, 1)
        )
        expected = NEIGH_GC_THRESH["gc_thresh3"] if has_own.returncode == 0 else None
        assert sb.neigh_gc_thresh3 == expected

        with pytest.raises(HostSetupError):
            sb.attach_vms("cni0")  # the bridge does not exist yet
        sb.run(sb.node, ["ip", "link", "add", "cni0", "type", "bridge"])
        sb.run(sb.node, ["ip", "addr", "add", f"{sb.gateway}/24", "dev", "cni0"])
        sb.run(sb.node, ["ip", "link", "set", "cni0", "up"])
        sb.attach_vms("cni0")
        for i, vm in enumerate(sb.vms):
            port = json.loads(sb.run(sb.node, ["ip", "-d", "-j", "link", "show", vm.port]).stdout)
            assert port[0]["master"] == "cni0"
            assert port[0]["linkinfo"]["info_slave_data"]["isolated"] is True
            sb.run(vm.netns, ["ip", "addr", "add", f"172.20.100.{50 + i}/24", "dev", "eth0"])
        # Isolated ports reach the bridge (the gateway) but not each other.
        for vm in sb.vms:
            sb.run(vm.netns, ["ping", "-c1", "-W2", str(sb.gateway)])
        lateral = sb.run(sb.vms[0].netns, ["ping", "-c1", "-W1", "172.20.100.51"], ok_codes=(0, 1))
        assert lateral.returncode == 1

    assert not set(names) & set(sh_out("ip", "netns", "list").split())


def test_cleanup_after_exception_kills_processes_and_removes_everything(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), Sandbox(2, tmpdir=tmp_path) as sb:
        names, workdir, macs = sb.namespaces, sb.workdir, {vm.mac for vm in sb.vms}
        sb.popen(sb.vms[0].netns, ["sleep", "300"])
        # A daemon that detached from us must die too.
        sb.run(sb.vms[1].netns, ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &"])
        wait_for(lambda: bool(netns_pids(sb.vms[1].netns)), "the detached sleep")
        pids = netns_pids(sb.vms[0].netns) + netns_pids(sb.vms[1].netns)
        raise RuntimeError("boom")

    assert not set(names) & set(sh_out("ip", "netns", "list").split())
    assert not any(Path("/run/netns", n).exists() for n in names)
    assert not workdir.exists()
    assert root_links_with_macs(macs) == []
    assert pids
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "sleep" not in Path(f"/proc/{pid}/cmdline").read_text()
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vms": 0},
        {"subnet": "172.20.100.0/33"},
        {"gateway": "10.1.1.1"},
        {"gateway": "172.20.100.255"},
        {"uplink": "172.20.100.0/28"},
        {"uplink": "10.99.0.0/31"},
    ],
)
def test_bad_parameters_are_refused_before_anything_is_created(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Sandbox(**kwargs)  # type: ignore[arg-type]


def test_clients_lease_renew_release_and_stop_against_dnsmasq(
    tmp_path: Path, needs_tools: None, host_untouched: None
) -> None:
    with Sandbox(3, tmpdir=tmp_path) as sb:
        server = bridge_with_dnsmasq(sb)
        kinds: list[type[DhcpClient]] = [Dhclient, Udhcpc, Dhcpcd]
        clients = [
            kind(sb, vm, hostname=f"vm-{kind.program}")
            for kind, vm in zip(kinds, sb.vms, strict=True)
        ]
        assert sorted(CLIENTS) == sorted(k.program for k in kinds)

        ips = in_parallel(lambda c: c.start(), clients)
        assert len(set(ips)) == 3
        assert all(POOL_FIRST <= ip <= POOL_LAST for ip in ips)
        assert [c.ip() for c in clients] == ips
        with pytest.raises(UsageError):
            clients[0].start()
        assert server.leases() == {
            c.vm.mac: (ip, f"vm-{c.program}") for c, ip in zip(clients, ips, strict=True)
        }

        # VM -> VPC peer through the node, and VPC -> VM at the VM's own address.
        for c, ip in zip(clients, ips, strict=True):
            sb.run(c.vm.netns, ["ping", "-c1", "-W2", str(sb.peer_ip)])
            sb.run(sb.peer, ["ping", "-c1", "-W2", str(ip)])
            assert sb.source_seen_by_peer(c.vm.netns) == ip
        # ...and the probe tells a masquerading node apart.
        masq = ["-s", str(sb.subnet), "-o", "uplink", "-j", "MASQUERADE"]
        sb.run(sb.node, ["iptables", "-t", "nat", "-A", "POSTROUTING", *masq])
        assert sb.source_seen_by_peer(sb.vms[0].netns) == sb.node_uplink.ip
        sb.run(sb.node, ["iptables", "-t", "nat", "-D", "POSTROUTING", *masq])

        acks = {c.vm.mac: server.count("DHCPACK", c.vm.mac) for c in clients}
        assert in_parallel(lambda c: c.renew(), clients) == ips
        assert [c.ip() for c in clients] == ips
        for c in clients:
            assert server.count("DHCPACK", c.vm.mac) > acks[c.vm.mac], c.program

        in_parallel(lambda c: c.release(), clients)
        assert [c.ip() for c in clients] == [None, None, None]
        assert not any(c.running for c in clients)
        assert server.leases() == {}
        assert all(server.count("DHCPRELEASE", c.vm.mac) == 1 for c in clients)

        # stop() is a VM that dies: no RELEASE, the server keeps the lease.
        again = in_parallel(lambda c: c.start(), clients)
        in_parallel(lambda c: c.stop(), clients)
        assert not any(c.running for c in clients)
        assert {mac: ip for mac, (ip, _) in server.leases().items()} == {
            c.vm.mac: ip for c, ip in zip(clients, again, strict=True)
        }
        assert all(server.count("DHCPRELEASE", c.vm.mac) == 1 for c in clients)


def test_client_refuses_unsafe_hostname_and_gives_up_without_a_server(tmp_path: Path) -> None:
    with Sandbox(1, tmpdir=tmp_path) as sb:
        with pytest.raises(UsageError):
            Udhcpc(sb, sb.vms[0], hostname='x"; exec /bin/sh')
        client = Udhcpc(sb, sb.vms[0], timeout=1)
        with pytest.raises(UsageError):
            client.renew()
        # No server: the driver gives up at its timeout, names the client and stops it.
        with pytest.raises(HostSetupError, match=r"udhcpc in cnt-\w+: timed out .* a lease"):
            client.start()
        assert not client.running
        assert client.ip() is None
