"""The egress plan: which rules and tables should exist, and which present ones are ours."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from cocoon_net.node import egress
from cocoon_net.node.egress import Eni, Rule

SUBNET = IPv4Network("10.1.0.0/24")
GW = IPv4Address("10.1.0.1")
VPC = [IPv4Network("10.0.0.0/16")]


def test_plan_one_table_per_eni_and_one_rule_per_owned_range() -> None:
    a = Eni("eth2", GW, (IPv4Network("10.1.0.16/28"),))
    b = Eni("eth1", GW, (IPv4Network("10.1.0.5/32"), IPv4Network("10.1.0.6/32")))
    plan = egress.plan([a, b], SUBNET, VPC)
    assert plan.vpc == (IPv4Network("10.0.0.0/16"),)
    assert plan.tables == {egress.TABLE_BASE: b, egress.TABLE_BASE + 1: a}
    assert plan.rules == {
        Rule(egress.PRIO_SUBNET, egress.MAIN, dst=SUBNET),
        Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network("10.1.0.5/32")),
        Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network("10.1.0.6/32")),
        Rule(egress.PRIO_ENI, egress.TABLE_BASE + 1, src=IPv4Network("10.1.0.16/28")),
    }


def test_no_enis_no_rules_and_stale_ones_go() -> None:
    plan = egress.plan([], SUBNET, VPC)
    old = Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network("10.1.0.5/32"))
    diff = egress.diff_rules(plan, [old], [egress.TABLE_BASE])
    assert diff.add == () and diff.remove == (old,) and diff.stale_tables == (egress.TABLE_BASE,)


def test_without_vpc_cidrs_all_traffic_is_masqueraded_by_the_primary_nic() -> None:
    eni = Eni("eth1", GW, (IPv4Network("10.1.0.5/32"),))
    assert egress.plan([eni], SUBNET, []) == egress.Plan(frozenset(), {})


def test_only_rules_with_our_protocol_and_priority_are_ours() -> None:
    ours = {"priority": 20001, "src": "10.1.0.16", "srclen": 28, "table": "25344",
            "protocol": "203"}  # fmt: skip
    assert egress.parse_rule(ours) == Rule(egress.PRIO_ENI, 25344, src=IPv4Network("10.1.0.16/28"))
    assert egress.parse_rule({**ours, "protocol": "static"}) is None
    assert egress.parse_rule({**ours, "priority": 100}) is None
    subnet = {"priority": 20000, "src": "all", "dst": "10.1.0.0", "dstlen": 24, "table": "main",
              "protocol": "203"}  # fmt: skip
    assert egress.parse_rule(subnet) == Rule(egress.PRIO_SUBNET, egress.MAIN, dst=SUBNET)


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
