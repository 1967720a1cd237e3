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
    )


def test_without_a_primary_nic_only_the_secondaries_are_best_effort() -> None:
    settings = sysctl.desired("br.vm", None, ("eth1",))
    assert [s.key for s in settings if not s.required] == ["net.ipv4.conf.eth1.rp_filter"]
    assert "net.ipv4.conf.br/vm.rp_filter" in [s.key for s in settings]
