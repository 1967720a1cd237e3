"""The egress plan: which tables and lasting rules should exist, and which rule each
secondary address brings with its route."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cocoon_net.errors import HostSetupError
from cocoon_net.node import egress
from cocoon_net.node.egress import Eni
from cocoon_net.node.rtnl import Rule
from cocoon_net.state import PoolState

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


def test_an_eni_named_by_mac_is_found_by_its_interface_here() -> None:
    # Every host has lo, whose MAC is all zeros; a MAC on no interface here names no ENI.
    cloud = {
        "enis": [
            "not an entry",
            {"mac": "00-00-00-00-00-00", "ifname": "eth9", "ips": ["10.1.0.9", "10.1.0.7"]},
            {"mac": "02:00:00:00:00:99", "ifname": "eth1", "ips": ["10.1.0.8"]},
            {"ips": ["10.1.0.10"]},  # names no interface at all
            {"ifname": "eth3", "gateway": "10.1.0.254", "ips": ["10.1.0.40"],
             "prefixes": ["10.1.0.32/29", "10.1.0.32/29"]},
        ]
    }  # fmt: skip
    assert egress.enis_from_cloud(cloud, GW, "eth0") == [
        Eni(
            "eth3",
            IPv4Address("10.1.0.254"),
            (IPv4Network("10.1.0.32/29"), IPv4Network("10.1.0.40/32")),
        ),
        Eni("lo", GW, (IPv4Network("10.1.0.7/32"), IPv4Network("10.1.0.9/32"))),
    ]
    assert egress.enis_from_cloud({}, GW, None) == []


def test_enis_named_by_interface_need_no_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No MAC to look up: the links are not listed (no `ip` is found on this PATH).
    monkeypatch.setenv("PATH", str(tmp_path))
    cloud = {"enis": [{"ifname": "eth1", "ips": ["10.1.0.5"]}]}
    assert egress.enis_from_cloud(cloud, GW, "eth0") == [
        Eni("eth1", GW, (IPv4Network("10.1.0.5/32"),))
    ]
    assert egress.enis_from_cloud({}, GW, "eth0") == []


def test_plan_for_a_pool_reads_its_enis_subnet_and_vpc() -> None:
    pool = PoolState(
        platform="volcengine",
        node_name="n",
        subnet=str(SUBNET),
        gateway=str(GW),
        primary_nic="eth0",
        vpc_cidrs=["10.0.0.0/16", "172.16.0.0/12", "10.0.0.0/16"],
        cloud={
            "enis": [
                {"ifname": "eth0", "ips": ["10.1.0.4"]},
                {"ifname": "eth1", "ips": [str(A5)]},
            ]
        },
    )
    plan = egress.plan_for(pool)
    assert plan.vpc == (IPv4Network("10.0.0.0/16"), IPv4Network("172.16.0.0/12"))
    assert plan.tables == {egress.TABLE_BASE: Eni("eth1", GW, (IPv4Network(f"{A5}/32"),))}
    assert plan.rules == {Rule(egress.PRIO_SUBNET, egress.MAIN, dst=SUBNET)}
    assert list(plan.by_address) == [A5]
    # Without VPC CIDRs there is nothing to route by ENI.
    pool.vpc_cidrs = []
    assert egress.plan_for(pool) == egress.EMPTY


def test_as_many_enis_as_tables_and_no_more() -> None:
    enis = [Eni(f"eth{i + 1}", GW, (IPv4Network(f"10.1.{i}.0/28"),)) for i in range(65)]
    plan = egress.plan(enis[: egress.TABLE_SPAN], SUBNET, VPC)
    assert max(plan.tables) == egress.TABLE_BASE + egress.TABLE_SPAN - 1
    with pytest.raises(HostSetupError, match="65 ENIs: egress supports at most 64"):
        egress.plan(enis, SUBNET, VPC)


def test_a_rule_to_a_subnet_is_wanted_only_as_the_vm_subnets() -> None:
    plan = _plan()
    routed = {A5, A6}.__contains__
    assert plan.wants(Rule(egress.PRIO_SUBNET, egress.MAIN, dst=SUBNET), routed)
    other = IPv4Network("10.2.0.0/24")
    assert not plan.wants(Rule(egress.PRIO_SUBNET, egress.MAIN, dst=other), routed)
    stale = Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network("10.1.0.64/28"))
    assert not plan.wants(stale, routed)  # a prefix the ENI no longer has


R1 = Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network("10.1.0.5/32"))
R2 = Rule(egress.PRIO_ENI, egress.TABLE_BASE, src=IPv4Network("10.1.0.6/32"))
R3 = Rule(egress.PRIO_ENI, egress.TABLE_BASE + 1, src=IPv4Network("10.1.0.7/32"))
R4 = Rule(egress.PRIO_ENI, egress.TABLE_BASE + 1, src=IPv4Network("10.1.0.8/32"))


def test_rules_to_add_and_remove_make_ours_equal_the_wanted() -> None:
    assert egress.plan_rules(frozenset({R3, R1, R2}), {R2, R4}) == ([R1, R3], [R4])
    assert egress.plan_rules(frozenset({R1}), {R1}) == ([], [])
    assert egress.plan_rules(frozenset(), {R4, R2}) == ([], [R2, R4])


def test_rule_changes_leave_out_the_failed_and_failures_make_one_line() -> None:
    changes, failures = egress.rules_outcome([R1, R2], [R3], {})
    assert changes == [f"rule removed: {R3.spec()}", f"rule added: {R1.spec()}",
                       f"rule added: {R2.spec()}"]  # fmt: skip
    assert failures == []
    changes, failures = egress.rules_outcome([R1], [R3], {R1: "No such file or directory"})
    assert changes == [f"rule removed: {R3.spec()}"]
    assert failures == [f"rule {R1.spec()}: No such file or directory"]
    two = {R2: "Invalid argument", R1: "Invalid argument"}
    assert egress.rules_outcome([R1, R2], [], two) == (
        [],
        [f"rule {R1.spec()}: Invalid argument (and 1 more)"],
    )
    failed = {R2: "Invalid argument", R1: "Invalid argument", R4: "Operation not permitted"}
    changes, failures = egress.rules_outcome([R1, R2], [R3, R4], failed)
    assert changes == [f"rule removed: {R3.spec()}"]
    assert failures == [f"rule {R1.spec()}: Invalid argument (and 2 more)"]
