"""The egress plan: which tables and lasting rules should exist, and which rule each
secondary address brings with its route."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from cocoon_net.node import egress
from cocoon_net.node.egress import Eni
from cocoon_net.node.rtnl import Rule

SUBNET = IPv4Network("10.1.0.0/24")
GW = IPv4Address("10.1.0.1")
VPC = [IPv4Network("10.0.0.0/16")]
A5, A6 = IPv4Address("10.1.0.5"), IPv4Address("10.1.0.6")


def _plan() -> egress.Plan:
    a = Eni("eth2", GW, (IPv4Network("10.1.0.16/28"),))
    b = Eni("eth1", GW, (IPv4Network(f"{A5}/32"), IPv4Network(f"{A6}/32")))
    return egress.plan([a, b], SUBNET, VPC)


def test_one_table_per_eni_prefix_rules_kept_address_rules_with_routes() -> None:
    plan = _plan()
    assert plan.vpc == (IPv4Network("10.0.0.0/16"),)
    assert [eni.ifname for eni in plan.tables.values()] == ["eth1", "eth2"]
    assert list(plan.tables) == [egress.TABLE_BASE, egress.TABLE_BASE + 1]
    # A prefix's rule and the VM subnet's stay as long as the ENI does.
    assert plan.rules == {
        Rule(egress.PRIO_SUBNET, egress.MAIN, dst=SUBNET),
        Rule(egress.PRIO_ENI, egress.TABLE_BASE + 1, src=IPv4Network("10.1.0.16/28")),
    }
    # A secondary address's rule exists while the address holds its route.
    assert plan.by_address == {
        A5: Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network(f"{A5}/32")),
        A6: Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network(f"{A6}/32")),
    }
    assert plan.wanted([]) == plan.rules
    outside = IPv4Address("10.1.0.200")  # a pool address no ENI owns: no rule
    assert plan.wanted([A6, outside, IPv4Address("10.1.0.17")]) == plan.rules | {
        plan.by_address[A6]
    }


def test_without_vpc_cidrs_all_traffic_is_masqueraded_by_the_primary_nic() -> None:
    eni = Eni("eth1", GW, (IPv4Network("10.1.0.5/32"),))
    assert egress.plan([eni], SUBNET, []) == egress.EMPTY
    assert egress.plan([], SUBNET, VPC) == egress.EMPTY


def test_a_deleted_rule_is_wanted_back_only_while_its_address_is_routed() -> None:
    plan = _plan()
    rule5 = plan.by_address[A5]
    assert plan.wants(rule5, lambda ip: ip == A5)
    assert not plan.wants(rule5, lambda ip: False)  # its lease ended: ours went with it
    moved = Rule(egress.PRIO_ENI, egress.TABLE_BASE + 1, src=rule5.src)
    assert not plan.wants(moved, lambda ip: True)  # the address is on another ENI now
    prefix = Rule(egress.PRIO_ENI, egress.TABLE_BASE + 1, src=IPv4Network("10.1.0.16/28"))
    assert plan.wants(prefix, lambda ip: False)


def test_cloud_record_primary_and_empty_enis_left_out() -> None:
    cloud = {
        "enis": [
            {"ifname": "eth0", "ips": ["10.1.0.9"]},
            {"ifname": "eth1", "ips": []},
            {"ifname": "eth2", "gateway": "10.1.0.1", "prefixes": ["10.1.0.32/28"]},
        ]
    }
    assert egress.enis_from_cloud(cloud, GW, "eth0") == [
        Eni("eth2", GW, (IPv4Network("10.1.0.32/28"),))
    ]
