"""The firewall chains with real packets: a VM namespace behind the bridge, a router outside.

    vm (172.20.100.5) --veth-- [cni0] node (eth0 10.9.0.2) --veth-- outside (10.9.0.1)
                                                                    10.128.0.9  "VPC peer"
                                                                    10.200.0.9  "internal"

The node's FORWARD policy is DROP, as Docker and kube leave it, and a catch-all MASQUERADE
follows our jump in POSTROUTING. `outside` routes the VM subnet
back to the node, the way a VPC routes a VPC-native range, and refuses the source address that
a wrong NAT decision would produce, so each ping only succeeds if our rules did the right thing.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cocoon_net.node import hostsetup, routes
from cocoon_net.node.hostsetup import HostSpec
from cocoon_net.state import HostRecord
from tests.support.netns import Netns, link_pair

pytestmark = pytest.mark.netns


def ping(ns: Netns, dst: str) -> bool:
    return ns.run("ping", "-c", "1", "-W", "1", dst, check=False).returncode == 0


def test_vm_traffic_passes_drop_policy_with_the_right_source(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    node, vm, outside = make_netns("node"), make_netns("vm"), make_netns("out")
    link_pair(node, "eth0", outside, "ext0")
    node.ip("addr", "add", "10.9.0.2/24", "dev", "eth0")
    node.ip("route", "add", "default", "via", "10.9.0.1")
    node.run("iptables", "-P", "FORWARD", "DROP")
    # A catch-all MASQUERADE like ip-masq-agent's: VPC traffic must still keep its source.
    node.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
    outside.ip("addr", "add", "10.9.0.1/24", "dev", "ext0")
    for addr in ("10.128.0.9/32", "10.200.0.9/32"):
        outside.ip("addr", "add", addr, "dev", "ext0")
    outside.ip("route", "add", "172.20.100.0/24", "via", "10.9.0.2")
    # VPC peers must see the VM's own address; everything else the node's (masqueraded).
    outside.run("iptables", "-A", "INPUT", "-d", "10.128.0.9", "-s", "10.9.0.2", "-j", "DROP")
    outside.run("iptables", "-A", "INPUT", "-d", "10.9.0.1", "-s", "172.20.100.0/24", "-j", "DROP")

    spec = HostSpec(
        bridge="cni0",
        subnet=IPv4Network("172.20.100.0/24"),
        gateway=IPv4Address("172.20.100.1"),
        mtu=None,
        bridge_mac=None,
        primary_nic=None,
        secondary_nics=(),
        manage_firewall=True,
        drop_cidrs=(IPv4Network("10.200.0.0/16"),),
        drop_internal_access=False,
        vpc_cidrs=(IPv4Network("10.128.0.0/9"),),
        conflist=tmp_path / "30-cocoon-dhcp.conflist",
    )
    record, _ = node.call(hostsetup.reconcile, spec, HostRecord())
    link_pair(node, "tap0", vm, "eth0")
    node.ip("link", "set", "tap0", "master", "cni0")
    vm.ip("addr", "add", "172.20.100.5/24", "dev", "eth0")
    vm.ip("route", "add", "default", "via", "172.20.100.1")
    node.call(routes.apply_routes, routes.RouteDiff(add=(IPv4Address("172.20.100.5"),)), "cni0")

    assert ping(vm, "172.20.100.1")
    assert ping(vm, "10.128.0.9")  # VPC-native: unmasqueraded
    assert ping(vm, "10.9.0.1")  # elsewhere: masqueraded
    assert not ping(vm, "10.200.0.9")  # a drop CIDR
    # the bridge MAC the VM learnt is the fixed one
    assert "02:c0:ac:14:64:01" in vm.ip("neigh", "show", "172.20.100.1")

    node.call(hostsetup.teardown, record, "cni0", spec.subnet, spec.conflist, True)
    assert not ping(vm, "10.9.0.1")  # gone with the bridge
