from __future__ import annotations

from pathlib import Path

from cocoon_net.node import sysctl
from cocoon_net.node.sysctl import Setting


def test_dotted_interface_names_map_to_one_path_component() -> None:
    key = sysctl.conf_key("eth0.100", "rp_filter")
    assert key == "net.ipv4.conf.eth0/100.rp_filter"
    assert sysctl.key_path(key) == Path("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
    assert sysctl.key_path("net.ipv4.ip_forward") == Path("/proc/sys/net/ipv4/ip_forward")


def test_desired_settings_required_then_best_effort_without_duplicates() -> None:
    settings = sysctl.desired("cni0", "eth0", ("eth1", "eth0", "eth1"))
    assert settings == (
        Setting("net.ipv4.ip_forward", "1", required=True),
        Setting("net.ipv4.conf.all.rp_filter", "0", required=True),
        Setting("net.ipv4.conf.default.rp_filter", "0", required=True),
        Setting("net.ipv4.conf.cni0.rp_filter", "0", required=True),
        Setting("net.ipv4.conf.eth0.rp_filter", "0", required=False),
        Setting("net.ipv4.conf.eth1.rp_filter", "0", required=False),
        # A secondary ENI, never the primary, answers ARP only for its own addresses.
        Setting("net.ipv4.conf.eth1.arp_ignore", "1", required=False),
        Setting("net.ipv4.conf.eth1.arp_announce", "2", required=False),
    )
    assert sysctl.value_we_set("net.ipv4.conf.eth1.arp_announce") == "2"


def test_without_a_primary_nic_only_the_secondaries_are_best_effort() -> None:
    settings = sysctl.desired("br.vm", None, ("eth1",))
    assert [s.key for s in settings if not s.required] == [
        "net.ipv4.conf.eth1.rp_filter",
        "net.ipv4.conf.eth1.arp_ignore",
        "net.ipv4.conf.eth1.arp_announce",
    ]
    assert "net.ipv4.conf.br/vm.rp_filter" in [s.key for s in settings]


BEFORE = {
    "net.ipv4.ip_forward": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "2",
    "net.ipv4.conf.eth0.rp_filter": "1",
}
OURS = {key: sysctl.value_we_set(key) for key in BEFORE}


def test_a_setting_that_still_holds_our_value_is_restored() -> None:
    current = {**OURS, "net.ipv4.ip_forward": "0"}  # forwarding aside, everything as we set it
    plan = sysctl.plan_restore(BEFORE, OURS, current)
    assert plan.lines() == [
        "set net.ipv4.conf.all.rp_filter=1 (was 0)",
        "set net.ipv4.conf.default.rp_filter=2 (was 0)",
        "set net.ipv4.conf.eth0.rp_filter=1 (was 0)",
    ]


def test_a_setting_changed_by_someone_else_is_left_and_reported() -> None:
    current = {**OURS, "net.ipv4.ip_forward": "0", "net.ipv4.conf.all.rp_filter": "2"}
    plan = sysctl.plan_restore(BEFORE, OURS, current)
    assert [c.setting.key for c in plan.restore] == [
        "net.ipv4.conf.default.rp_filter",
        "net.ipv4.conf.eth0.rp_filter",
    ]
    assert [left.describe() for left in plan.left] == [
        "left net.ipv4.conf.all.rp_filter=2: changed by someone else since cocoon-net set it to 0"
    ]


def test_ip_forward_still_on_is_left_with_the_command_to_turn_it_off() -> None:
    plan = sysctl.plan_restore(BEFORE, OURS, OURS)
    assert "net.ipv4.ip_forward" not in [c.setting.key for c in plan.restore]
    assert [left.describe() for left in plan.left] == [
        "left net.ipv4.ip_forward=1: other software may route through this host now (it was 0 "
        "before cocoon-net); if nothing needs it: sysctl -w net.ipv4.ip_forward=0"
    ]


def test_ip_forward_turned_off_by_someone_else_is_reported_as_theirs() -> None:
    before = {"net.ipv4.ip_forward": "2"}  # any value other than ours and the current one
    plan = sysctl.plan_restore(before, {"net.ipv4.ip_forward": "1"}, {"net.ipv4.ip_forward": "0"})
    assert plan.restore == ()
    assert [left.describe() for left in plan.left] == [
        "left net.ipv4.ip_forward=0: changed by someone else since cocoon-net set it to 1"
    ]


def test_the_value_recorded_as_ours_decides_not_the_constant() -> None:
    ours = {"net.ipv4.conf.all.rp_filter": "2"}  # a future value we might write
    before = {"net.ipv4.conf.all.rp_filter": "1"}
    assert sysctl.plan_restore(before, ours, {"net.ipv4.conf.all.rp_filter": "2"}).lines() == [
        "set net.ipv4.conf.all.rp_filter=1 (was 2)"
    ]
    plan = sysctl.plan_restore(before, ours, {"net.ipv4.conf.all.rp_filter": "0"})
    assert plan.restore == () and len(plan.left) == 1


def test_a_record_without_our_values_uses_what_host_setup_writes() -> None:
    current = {**OURS, "net.ipv4.conf.default.rp_filter": "1"}
    plan = sysctl.plan_restore(BEFORE, {}, current)
    assert plan == sysctl.plan_restore(BEFORE, OURS, current)
    assert OURS == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        "net.ipv4.conf.eth0.rp_filter": "0",
    }
    assert [c.setting.key for c in plan.restore] == [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.eth0.rp_filter",
    ]


def test_settings_already_back_or_of_a_gone_interface_need_nothing() -> None:
    current: dict[str, str | None] = {**BEFORE, "net.ipv4.conf.eth0.rp_filter": None}
    plan = sysctl.plan_restore(BEFORE, OURS, current)
    assert plan.restore == () and plan.left == ()
