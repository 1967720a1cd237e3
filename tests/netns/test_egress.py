"""Every VM address leaves by the ENI that owns it, as the cloud's source check demands.

A secondary address's rule comes with its lease's route, before the ACK, and goes with it; a
delegated prefix's rule stays as long as the ENI does. A node without secondary ENIs runs no
egress command at all.

The sandbox's peer plays the VPC router: besides the node's primary link (`uplink`) it has
one link per secondary "ENI" of the node (ethK), holds the VM subnet's gateway on each (the
cloud's router answers for the gateway on every ENI), delivers each ENI-owned address to
that ENI's MAC, and drops any packet whose source address is not assigned to the link it
came in by: the VM subnet by the primary link, and on an ENI everything that ENI does not
own. pool.json's cloud record lists the ENIs as init writes it; real DHCP clients lease.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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


def our_rules(sandbox: Sandbox) -> set[tuple[str, str]]:
    """(selector, table) of every rule of ours (protocol 203) in the node."""
    rules = json.loads(sandbox.run(sandbox.node, ["ip", "-json", "rule", "show"]).stdout)
    out = set()
    for rule in rules:
        if rule.get("protocol") != "203":
            continue
        where = f"{rule['src']}/{rule.get('srclen', 32)}" if rule["src"] != "all" else ""
        where = where or f"to {rule['dst']}/{rule['dstlen']}"
        out.add((where, str(rule["table"])))
    return out


def configure_enis(
    sandbox: Sandbox, daemon: NodeDaemon, enis: int, prefix_len: int | None
) -> list[list[IPv4Network]]:
    """The VPC router, and pool.json's cloud record as init writes it for that layout."""
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
    return owned


@pytest.mark.parametrize(
    ("enis", "prefix_len", "vms"),
    [(7, None, 7), (2, 28, 4)],
    ids=["volcengine-7-enis", "aws-prefixes"],
)
def test_each_address_leaves_by_its_eni(
    node: tuple[Sandbox, NodeDaemon], enis: int, prefix_len: int | None, vms: int
) -> None:
    sandbox, daemon = node
    owned = configure_enis(sandbox, daemon, enis, prefix_len)
    daemon.start()

    def table_of(ip: IPv4Address) -> str:
        return str(next(egress.TABLE_BASE + k for k, nets in enumerate(owned)
                        if any(ip in n for n in nets)))  # fmt: skip

    def expected(leased: set[IPv4Address]) -> set[tuple[str, str]]:
        """The VM subnet's rule, one per prefix, and one per leased secondary address."""
        out = {(f"to {sandbox.subnet}", "main")}
        if prefix_len is None:
            return out | {(f"{ip}/32", table_of(ip)) for ip in leased}
        return out | {(str(net), str(egress.TABLE_BASE + k))
                      for k, nets in enumerate(owned) for net in nets}  # fmt: skip

    assert our_rules(sandbox) == expected(set())
    clients = {}
    seen: dict[IPv4Address, IPv4Address] = {}
    for vm in sandbox.vms[:vms]:
        client = Udhcpc(sandbox, vm, hostname=vm.netns)
        ip = client.start()
        clients[ip] = client
        # Installed with the route, before the ACK: there the moment the VM is bound.
        assert expected(set(clients)) <= our_rules(sandbox), f"no rule for {ip} at its ACK"
        sandbox.run(vm.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])
        seen[ip] = sandbox.source_seen_by_peer(vm.netns)
    assert seen == {ip: ip for ip in seen}
    assert our_rules(sandbox) == expected(set(clients))
    # Outside the VPC, traffic is masqueraded by the primary NIC and leaves by it, as before:
    # out of an ENI, the primary NIC's address would fail the source check.
    for vm in sandbox.vms[:vms]:
        sandbox.run(vm.netns, ["ping", "-c", "1", "-W", "3", str(INTERNET)])
    by_eni = {k for ip in seen for k, nets in enumerate(owned) if any(ip in n for n in nets)}
    assert by_eni == set(range(enis)), "every ENI carries a VM"

    # A VM releases: its rule goes with its route (a prefix's rule stays with the ENI).
    gone = next(iter(clients))
    clients.pop(gone).release()
    wait_for(lambda: (gone not in daemon.routes()) or None, f"the route of {gone} to go")
    assert our_rules(sandbox) == expected(set(clients))
    # A VM dies and its manager ends the lease (`cocoon-net release --mac`): the same.
    dead = list(clients)[-1]
    client = clients.pop(dead)
    client.stop()
    assert daemon.release(client.vm.mac) == [str(dead)]
    assert our_rules(sandbox) == expected(set(clients))
    for ip, client in clients.items():
        sandbox.run(client.vm.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])
        assert sandbox.source_seen_by_peer(client.vm.netns) == ip

    # Someone removes a leased VM's rule and a table's route: both come back, said once.
    first_ip = next(iter(clients))
    table = table_of(first_ip)
    selector = next(str(n) for nets in owned for n in nets if first_ip in n)
    sandbox.run(sandbox.node, ["ip", "rule", "del", "from", selector, "priority",
                               str(egress.PRIO_ENI), "table", table])  # fmt: skip
    wait_for(lambda: our_rules(sandbox) == expected(set(clients)) or None,
             "the daemon to restore a deleted rule")  # fmt: skip
    said = [line for line in daemon.log().splitlines()
            if f"warning egress: rule added: from {selector} " in line]  # fmt: skip
    assert len(said) == 1, said
    vpc = str(sandbox.node_uplink.network)
    sandbox.run(sandbox.node, ["ip", "route", "del", vpc, "table", table])

    def table_back() -> bool | None:
        out = sandbox.run(sandbox.node, ["ip", "route", "show", "table", table]).stdout
        return vpc in out or None

    wait_for(table_back, "the egress reconcile to restore a table's route")
    sandbox.run(clients[first_ip].vm.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])

    # Taking over a node whose rules are missing (a daemon before per-address rules, or
    # rules lost while it was down): the leases it finds get theirs before it is ready.
    # `status` says what is missing (the leases from the lease file, no daemon running).
    daemon.stop()
    removed = sorted(our_rules(sandbox))
    for where, table in removed:
        which = ["to", where[3:]] if where.startswith("to ") else ["from", where]
        sandbox.run(sandbox.node, ["ip", "rule", "del", *which, "table", table])
    sandbox.run(sandbox.node, ["ip", "route", "del", vpc, "table", table_of(first_ip)])
    status = daemon.status()
    wanted = len(expected(set(clients)))
    assert f"{enis} ENIs, 0 of {wanted} rules present" in status, status
    assert f"table {table_of(first_ip)} MISSING" in status
    said = [line.split("missing rule: ")[1] for line in status.splitlines()
            if "missing rule: " in line]  # fmt: skip
    missing = {(w[1] if w[0] == "from" else f"to {w[1]}") for w in map(str.split, said)}
    assert missing == {where for where, _table in removed}
    daemon.start()
    assert our_rules(sandbox) == expected(set(clients))
    status = daemon.status()
    assert f"{enis} ENIs, {wanted} of {wanted} rules present" in status, status
    assert "MISSING" not in status and "missing rule" not in status
    doc = json.loads(daemon.cocoon("status", "--json", "--state-dir",
                                   str(daemon.paths.state_dir), "--run-dir",
                                   str(daemon.paths.run_dir)))  # fmt: skip
    found = doc["egress"]["enis"]
    assert [e["ifname"] for e in found] == [f"eth{k}" for k in range(1, enis + 1)]
    assert all(e["tableOK"] and e["gatewayMAC"] and not e["missingRules"] for e in found)
    assert sum(e["rulesPresent"] for e in found) == wanted - 1  # the VM subnet's is no ENI's
    assert doc["egress"]["missingRules"] == []

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


def test_without_enis_egress_runs_no_command(
    node: tuple[Sandbox, NodeDaemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A static node: leases come and go and reconciles run, and egress never runs `ip rule`,
    `ip neigh` or a table's `ip route` (every `ip` the daemon runs is logged by a wrapper)."""
    sandbox, daemon = node
    calls = tmp_path / "ip-calls"
    wrapper = tmp_path / "bin" / "ip"
    wrapper.parent.mkdir()
    real = shutil.which("ip")
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    daemon.start()
    client = Udhcpc(sandbox, sandbox.vms[0])
    ip = client.start()
    sandbox.run(sandbox.vms[0].netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])
    client.release()
    wait_for(lambda: (ip not in daemon.routes()) or None, f"the route of {ip} to go")
    # Each SIGHUP runs a full reconcile after its reload; the second reload is logged only
    # once the first reconcile (egress included) has finished.
    for count in (1, 2):
        daemon.send_signal(signal.SIGHUP)

        def reloaded(n: int = count) -> bool | None:
            return daemon.log().count("reloaded ") >= n or None

        wait_for(reloaded, "a reload")
    run = calls.read_text().splitlines()
    assert run, "the wrapper saw the daemon's other ip commands"
    egress_like = [line for line in run
                   if {"rule", "neigh"} & set(line.split()) or "table 253" in line]  # fmt: skip
    assert egress_like == []
