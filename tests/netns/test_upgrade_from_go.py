"""Upgrade in place: cocoon-net's daemon starts on a node exactly as the Go tool leaves it.

The node is built in namespaces: three VMs with real DHCP clients (dhclient, udhcpc, dhcpcd)
obtain leases (served first by our daemon, which is then stopped), and everything of ours is
rewritten into the Go tool's layout: a pool.json with only its keys, a leases.json in its
format and nothing else beside it, its iptables rules (a Volcengine node: ACCEPT between the
bridge and eth1..eth7 and within the bridge, MASQUERADE of the subnet, a tagged drop) under a
FORWARD policy of DROP, `proto boot` /32 routes for the VMs, and a bridge MAC taken from a
port, as a bridge created without one gets. Besides the leased VMs:

- a fourth VM holds a pool address with a boot route but no lease (a lease file the Go tool
  lost): it answers ARP, so its route is taken over too;
- a pool address nobody uses keeps a boot route (the Go tool never removed the routes of
  expired leases): nobody answers, so the route is left as it is and the address held;
- an operator's own route outside the pool, `10.9.9.9/32 dev cni0 proto boot`, and one outside
  the subnet that carries our protocol number.

The daemon then starts while the VPC peer pings every VM every 10 ms: no VM may miss more
than 1 s of replies, every renewal is ACKed with the same address, the routes are ours where
a VM proved them and untouched elsewhere, and the Go rules are gone with ours in place.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net import config, proc
from cocoon_net.sandbox import Dhclient, Dhcpcd, DhcpClient, Sandbox, Udhcpc
from cocoon_net.sandbox.topology import Vm
from tests.support.daemon import NodeDaemon, wait_for
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

SECONDARY_NICS = [f"eth{i}" for i in range(1, 8)]  # what the Go tool's init records
UPLINK = SECONDARY_NICS[0]  # the VPC reaches VMs through a secondary ENI
DROP_CIDR = "169.254.169.254/32"
OPERATOR_ROUTE = "10.9.9.9"
# Another tool that happens to use our protocol number, outside the pool's subnet.
STRAY_203 = IPv4Address("10.9.9.8")
PING_INTERVAL = 0.01
MAX_LOSS_S = 1.0
GO_POOL_KEYS = {
    "platform", "nodeName", "subnet", "gateway", "primaryNIC", "secondaryNICs", "ips",
    "eniIDs", "subnetID", "aliasRangeName", "dnsServers", "dropInternalAccess", "dropCIDRs",
    "updatedAt",
}  # fmt: skip


def go_rules(subnet: str) -> list[str]:
    """The Go tool's iptables calls for this node, in its order."""
    rules = []
    for nic in SECONDARY_NICS:
        rules.append(f"-A FORWARD -i {nic} -o cni0 -j ACCEPT")
        rules.append(f"-A FORWARD -i cni0 -o {nic} -j ACCEPT")
    rules += [
        "-A FORWARD -i cni0 -o cni0 -j ACCEPT",
        f"-t nat -A POSTROUTING -s {subnet} ! -o cni0 -j MASQUERADE",
        f"-I FORWARD 1 -i cni0 -d {DROP_CIDR} -m comment --comment cocoon-net-drop -j DROP",
    ]
    return rules


def rename_uplink(sandbox: Sandbox) -> None:
    """The node's side of the VPC link becomes eth1, as a Volcengine secondary ENI is named."""
    ns = sandbox.node
    for argv in (
        ["link", "set", "uplink", "down"],
        ["link", "set", "uplink", "name", UPLINK],
        ["link", "set", UPLINK, "up"],
        ["route", "add", "default", "via", str(sandbox.peer_ip)],
    ):
        proc.run(["ip", "-n", ns, *argv])


def into_go_layout(
    sandbox: Sandbox, node: NodeDaemon, leases: dict[str, IPv4Address], extra: list[IPv4Address]
) -> None:
    """Rewrite the stopped node into what the Go tool leaves (see the module docstring)."""
    ours = json.loads(node.paths.pool_file.read_text())
    go_pool = {
        "platform": "volcengine",
        "nodeName": ours["nodeName"],
        "subnet": ours["subnet"],
        "gateway": ours["gateway"],
        "primaryNIC": "eth0",
        "secondaryNICs": SECONDARY_NICS,
        "ips": ours["ips"],
        "dnsServers": ["8.8.8.8", "1.1.1.1"],
        "dropCIDRs": [DROP_CIDR],
        "updatedAt": "2026-04-05T06:00:00.123456789Z",
    }
    node.paths.pool_file.write_text(json.dumps(go_pool, indent=2))  # no trailing newline
    lease_file = node.paths.state_dir / config.LEASE_FILE
    for companion in lease_file.parent.glob(config.LEASE_FILE + "*"):
        companion.unlink()
    expiry = (datetime.now(UTC) + timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%SZ")
    go_leases = [{"mac": mac, "ip": str(ip), "expiry": expiry} for mac, ip in leases.items()]
    lease_file.write_text(json.dumps(go_leases, indent=2))

    script = [
        "set -e",
        "iptables -D FORWARD -m comment --comment cocoon-net:jump -j COCOON-FORWARD",
        "iptables -D INPUT -m comment --comment cocoon-net:jump -j COCOON-INPUT",
        "iptables -t nat -D POSTROUTING -m comment --comment cocoon-net:jump -j COCOON-POSTROUTING",
        "iptables -F COCOON-FORWARD; iptables -X COCOON-FORWARD",
        "iptables -F COCOON-INPUT; iptables -X COCOON-INPUT",
        "iptables -t nat -F COCOON-POSTROUTING; iptables -t nat -X COCOON-POSTROUTING",
        "iptables -P FORWARD DROP",  # as Docker or kube leave it: only ACCEPTed traffic passes
        "nft delete table bridge cocoon-net; nft delete table inet cocoon-net",  # our VM guard
        *(f"iptables {rule}" for rule in go_rules(ours["subnet"])),
    ]
    # The Go tool's routes: proto boot, scope global (replace keeps each in place).
    for ip in [*leases.values(), *extra]:
        script.append(f"ip route replace {ip}/32 dev cni0 proto boot scope global")
    script.append(f"ip route add {OPERATOR_ROUTE}/32 dev cni0 proto boot")
    # A bridge created without a MAC takes its lowest port's.
    macs = [
        json.loads(proc.run(["ip", "-n", sandbox.node, "-j", "link", "show", vm.port]).stdout)[0][
            "address"
        ]
        for vm in sandbox.vms
    ]
    script.append(f"ip link set cni0 address {min(macs)}")
    sandbox.run(sandbox.node, ["sh", "-c", "\n".join(script)])
    assert not node.routes(), "proto-203 routes left in the Go layout"


def configure_static(sandbox: Sandbox, vm: Vm, ip: IPv4Address) -> None:
    """A VM that holds its address without a lease the daemon knows of."""
    prefix = sandbox.subnet.prefixlen
    proc.run(["ip", "-n", vm.netns, "addr", "add", f"{ip}/{prefix}", "dev", vm.ifname])
    proc.run(["ip", "-n", vm.netns, "route", "add", "default", "via", str(sandbox.gateway)])


class Pinger:
    """`ping -D -i 0.01` from the VPC peer to one VM, and how long replies stopped for."""

    def __init__(self, sandbox: Sandbox, target: IPv4Address, log: Path) -> None:
        self.target = target
        self.log = log
        self.mark = 0
        with log.open("wb") as out:
            self.proc = sandbox.popen(
                sandbox.peer,
                ["ping", "-n", "-D", "-i", str(PING_INTERVAL), "-W", "1", str(target)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def flowing(self) -> bool | None:
        """True once 20 replies arrived since the last time it said so."""
        count = len(self.replies())
        if count < self.mark + 20:
            return None
        self.mark = count
        return True

    def replies(self) -> list[tuple[int, float]]:
        """(icmp_seq, time received) of every reply so far."""
        found = re.findall(r"^\[([\d.]+)\] .*icmp_seq=(\d+) ttl=", self.log.read_text(), re.M)
        return [(int(seq), float(stamp)) for stamp, seq in found]

    def stop(self) -> list[tuple[int, float]]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        return self.replies()


def longest_loss_s(replies: list[tuple[int, float]]) -> float:
    """The longest time between the replies around missing ones: traffic lost for that long.
    Replies that merely arrive late (a busy CPU) are no loss: no sequence number is missing."""
    ordered = sorted(set(replies))
    return max(
        (t2 - t1 for (s1, t1), (s2, t2) in itertools.pairwise(ordered) if s2 > s1 + 1),
        default=0.0,
    )


def boot_routes(sandbox: Sandbox) -> set[IPv4Address]:
    """The proto-boot routes on the bridge (the default route is boot too, on the uplink)."""
    argv = ["ip", "-n", sandbox.node, "-4", "-j", "route", "show", "dev", "cni0", "proto", "boot"]
    return {IPv4Address(r["dst"]) for r in proc.run_json(argv)}


@pytest.fixture
def go_node(tmp_path: Path) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    with Sandbox(4, tmpdir=tmp_path) as sandbox:
        rename_uplink(sandbox)
        node = NodeDaemon(sandbox, tmp_path / "node", lease_time="1h")
        try:
            yield sandbox, node
        finally:
            node.close()


def test_daemon_takes_over_a_go_node_without_dropping_vm_traffic(
    go_node: tuple[Sandbox, NodeDaemon], tmp_path: Path
) -> None:
    sandbox, node = go_node
    node.adopt()
    node.start()
    vms = sandbox.vms
    clients: list[DhcpClient] = [Dhclient(sandbox, vms[0]), Udhcpc(sandbox, vms[1]),
                                 Dhcpcd(sandbox, vms[2])]  # fmt: skip
    leased = {client.vm.mac: client.start() for client in clients}
    node.stop()
    pool = [IPv4Address(ip) for ip in json.loads(node.paths.pool_file.read_text())["ips"]]
    free = [ip for ip in pool if ip not in leased.values()]
    unleased_vm, stale = free[0], free[1]
    configure_static(sandbox, vms[3], unleased_vm)
    into_go_layout(sandbox, node, leased, [unleased_vm, stale])
    sandbox.run(sandbox.node, ["ip", "route", "add", f"{STRAY_203}/32", "dev", "cni0", "proto",
                               str(config.ROUTE_PROTO)])  # fmt: skip
    conflist = node.paths.conflist
    conflist_stat = conflist.stat()

    targets = [*leased.values(), unleased_vm]
    pingers = [Pinger(sandbox, ip, tmp_path / f"ping-{ip}.log") for ip in targets]
    try:
        for pinger in pingers:  # traffic flows through the Go tool's rules and routes
            wait_for(pinger.flowing, f"pings to {pinger.target}")
        seen = {client.program: len(client.events()) for client in clients}
        node.start()
        for client in clients:
            assert client.renew() == leased[client.vm.mac], client.program
        for pinger in pingers:  # traffic after the renewals counts too
            wait_for(pinger.flowing, f"pings to {pinger.target} after the renewals")
    finally:
        replies = {p.target: p.stop() for p in pingers}

    # Each client only ever confirmed its address: no NAK, no deconfigure, no new address.
    for client in clients:
        events = client.events()[seen[client.program] :]
        assert {reason for reason, _ in events} <= client.bound_events | {"PREINIT"}, events
        assert {addr for _, addr in events if addr} == {str(leased[client.vm.mac])}, events

    for target, got in replies.items():
        assert longest_loss_s(got) <= MAX_LOSS_S, f"{target} lost {longest_loss_s(got):.2f} s"
    assert {mac: row.ip for mac, row in node.leases().items()} == leased
    for client in clients:
        assert client.ip() == leased[client.vm.mac]

    # Routes: ours for every VM, the held one and the operator's left as they were.
    assert node.routes() == {*leased.values(), unleased_vm, STRAY_203}
    assert boot_routes(sandbox) == {stale, IPv4Address(OPERATOR_ROUTE)}
    # Both addresses without a lease stay held, not free for a new VM.
    counts = node.pool_counts()
    assert counts["free"] == counts["size"] - len(leased) - 2, counts

    # Firewall: not one Go rule left; ours in place, the drop moved into our chain.
    saved = proc.run(["ip", "netns", "exec", sandbox.node, "iptables-save"]).stdout
    for rule in go_rules(str(sandbox.subnet)):
        spec = rule.removeprefix("-t nat ").split(" ", 2)[2]
        chain = "POSTROUTING" if "POSTROUTING" in rule else "FORWARD"
        if "cocoon-net-drop" in rule:
            spec = f"-d {DROP_CIDR} -i cni0 -m comment --comment cocoon-net-drop -j DROP"
        assert f"-A {chain} {spec}\n" not in saved, f"Go rule left: {rule}"
    for chain in ("FORWARD", "INPUT", "POSTROUTING"):
        assert f'-A {chain} -m comment --comment "cocoon-net:jump" -j COCOON-{chain}' in saved
    assert f"-A COCOON-FORWARD -d {DROP_CIDR} -i cni0 -m comment" in saved

    # The conflist already held the Go tool's bytes: not rewritten.
    assert conflist.stat().st_mtime_ns == conflist_stat.st_mtime_ns
    assert not node.errors(), node.errors()
