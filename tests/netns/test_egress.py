"""Every VM address leaves by the ENI that owns it, as the cloud's source check demands.

The sandbox's peer plays the VPC router: besides the node's primary link (`uplink`) it has
one link per secondary "ENI" of the node (ethK), holds the VM subnet's gateway on each (the
cloud's router answers for the gateway on every ENI), delivers each ENI-owned address to
that ENI's MAC, and drops any packet whose source address is not assigned to the link it
came in by: the VM subnet by the primary link, and on an ENI everything that ENI does not
own. pool.json's cloud record lists the ENIs as init writes it; real DHCP clients lease.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cocoon_net import proc, state
from cocoon_net.node import egress
from cocoon_net.sandbox import Sandbox, Udhcpc
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]


INTERNET = IPv4Address("198.51.100.7")  # outside the VPC CIDRs: reached masqueraded


def mac_of(sandbox: Sandbox, netns: str, ifname: str) -> str:
    out = sandbox.run(netns, ["ip", "-json", "link", "show", ifname]).stdout
    return str(json.loads(out)[0]["address"])


def build_vpc(sandbox: Sandbox, owned: list[list[IPv4Network]]) -> list[str]:
    """ENI links eth1.. between node and peer, the peer routing and source-checking them."""
    rules = [f"iifname uplink ip saddr {sandbox.subnet} drop"]
    names = []
    for k, nets in enumerate(owned, start=1):
        eni, router = f"eth{k}", f"r{k}"
        sandbox.run(sandbox.node, ["ip", "link", "add", eni, "type", "veth", "peer", "name",
                                   router, "netns", sandbox.peer])  # fmt: skip
        sandbox.run(sandbox.node, ["ip", "link", "set", eni, "up"])
        sandbox.run(sandbox.peer, ["ip", "link", "set", router, "up"])
        sandbox.run(sandbox.peer, ["ip", "addr", "add", f"{sandbox.gateway}/32", "dev", router])
        mac = mac_of(sandbox, sandbox.node, eni)
        lines = [f"route replace {net} dev {router}" for net in nets]
        lines += [f"neigh replace {ip} lladdr {mac} dev {router} nud permanent"
                  for net in nets for ip in net]  # fmt: skip
        proc.run(["ip", "-n", sandbox.peer, "-batch", "-"], stdin="\n".join(lines) + "\n")
        allowed = ", ".join(map(str, nets))
        rules.append(f"iifname {router} ip saddr != {{ {allowed} }} drop")
        names.append(eni)
    sandbox.run(sandbox.peer, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter"])
    sandbox.run(sandbox.peer, ["ip", "addr", "add", f"{INTERNET}/32", "dev", "lo"])
    ruleset = "table inet vpc { chain source_check { type filter hook prerouting priority -150;\n"
    ruleset += "\n".join(rules) + "\n}\n}\n"
    proc.run(["ip", "netns", "exec", sandbox.peer, "nft", "-f", "-"], stdin=ruleset)
    return names


def layout(pool: list[IPv4Address], enis: int, prefix_len: int | None) -> list[list[IPv4Network]]:
    """The pool's addresses spread over enis: round-robin secondary IPs (Volcengine), or
    aligned prefixes of the pool handed out in turn (AWS prefix delegation)."""
    if prefix_len is None:
        return [[IPv4Network(f"{ip}/32") for ip in pool[k::enis]] for k in range(enis)]
    nets = sorted({IPv4Network(f"{ip}/{prefix_len}", strict=False) for ip in pool}, key=str)
    return [nets[k::enis] for k in range(enis)]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    with node_with_daemon(7, tmp_path, start=False) as pair:
        yield pair


@pytest.mark.parametrize(
    ("enis", "prefix_len", "vms"),
    [(7, None, 7), (2, 28, 4)],
    ids=["volcengine-7-enis", "aws-prefixes"],
)
def test_each_address_leaves_by_its_eni(
    node: tuple[Sandbox, NodeDaemon], enis: int, prefix_len: int | None, vms: int
) -> None:
    sandbox, daemon = node
    pool = state.load(daemon.paths.pool_file)
    ips = [ip for ip in pool.pool_ips if ip != pool.gateway_ip]
    owned = layout(ips, enis, prefix_len)
    names = build_vpc(sandbox, owned)
    records = []
    for name, nets in zip(names, owned, strict=True):
        record: dict[str, object] = {"mac": mac_of(sandbox, sandbox.node, name)}
        if prefix_len is None:  # Volcengine's record: found by MAC, secondary IPs
            record["ips"] = [str(n.network_address) for n in nets]
        else:  # AWS's: its interface and subnet gateway named, prefixes
            record.update(ifname=name, gateway=str(sandbox.gateway),
                          prefixes=[str(n) for n in nets])  # fmt: skip
        records.append(record)
    if prefix_len is not None:
        # Two addresses of each ENI's first prefix make the pool, so the VMs span every ENI.
        firsts = [nets[0] for nets in owned]
        pool.ips = [str(n[-2 - k]) for n in firsts for k in range(2)]
    pool.cloud = {"enis": records}
    pool.secondary_nics = names
    state.save(daemon.paths.pool_file, pool)
    daemon.start()

    seen: dict[IPv4Address, IPv4Address] = {}
    for vm in sandbox.vms[:vms]:
        ip = Udhcpc(sandbox, vm, hostname=vm.netns).start()
        sandbox.run(vm.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])
        seen[ip] = sandbox.source_seen_by_peer(vm.netns)
    assert seen == {ip: ip for ip in seen}
    # Outside the VPC, traffic is masqueraded by the primary NIC and leaves by it, as before:
    # out of an ENI, the primary NIC's address would fail the source check.
    for vm in sandbox.vms[:vms]:
        sandbox.run(vm.netns, ["ping", "-c", "1", "-W", "3", str(INTERNET)])
    by_eni = {k for ip in seen for k, nets in enumerate(owned) if any(ip in n for n in nets)}
    assert by_eni == set(range(enis)), "every ENI carries a VM"
    rules = json.loads(sandbox.run(sandbox.node, ["ip", "-json", "rule", "show"]).stdout)
    ours = [r for r in rules if r.get("protocol") == "203"]
    # One per owned address or prefix, plus the VM subnet's own rule (to the main table).
    assert len(ours) == sum(len(n) for n in owned) + 1

    # Someone removes a rule and a table's route: the reconcile the route's removal triggers
    # puts both back, and the VM's traffic leaves by its ENI again.
    first_ip = next(iter(seen))
    table = next(
        egress.TABLE_BASE + k for k, nets in enumerate(owned) if any(first_ip in n for n in nets)
    )
    rule = next(r for r in ours if r.get("table") == str(table))
    src = f"{rule['src']}/{rule.get('srclen', 32)}"
    sandbox.run(sandbox.node, ["ip", "rule", "del", "from", src, "priority", str(egress.PRIO_ENI)])
    vpc = str(sandbox.node_uplink.network)
    sandbox.run(sandbox.node, ["ip", "route", "del", vpc, "table", str(table)])

    def restored() -> bool | None:
        now = json.loads(sandbox.run(sandbox.node, ["ip", "-json", "rule", "show"]).stdout)
        return len([r for r in now if r.get("protocol") == "203"]) == len(ours) or None

    wait_for(restored, "the egress reconcile to restore a deleted rule")
    vm0 = sandbox.vms[0]
    sandbox.run(vm0.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])

    # Teardown removes every rule and table route of ours, and nothing else's.
    sandbox.run(sandbox.node, ["ip", "rule", "add", "from", "192.0.2.1", "lookup", "100",
                               "priority", "20001"])  # fmt: skip
    daemon.stop()
    daemon.teardown()
    rules = json.loads(sandbox.run(sandbox.node, ["ip", "-json", "rule", "show"]).stdout)
    assert [r["src"] for r in rules if r["priority"] == egress.PRIO_ENI] == ["192.0.2.1"]
    assert not [r for r in rules if r.get("protocol") == "203"]
    left = sandbox.run(sandbox.node, ["ip", "route", "show", "table", "all", "proto", "203"])
    assert left.stdout.strip() == ""
