"""The host check's pure parts: which repair a change line is, and what drifted."""

from __future__ import annotations

from pathlib import Path

from cocoon_net.node import sysctl, watch


def test_repair_kind_names_each_part_of_host_setup() -> None:
    assert watch.repair_kind("firewall: create chain COCOON-FORWARD, add 2 rules") == "firewall"
    assert watch.repair_kind("write /etc/cni/net.d/30-cocoon-dhcp.conflist") == "conflist"
    assert watch.repair_kind("set net.ipv4.ip_forward=1 (was 0)") == "sysctl"
    assert watch.repair_kind("set cni0 mtu 1500 (was 1400)") == "bridge"
    assert watch.repair_kind("add address 10.0.0.1/24 to cni0") == "bridge"
    assert watch.repair_kind("set cni0 up") == "bridge"


def test_drift_lists_a_changed_conflist_and_nothing_when_ours(tmp_path: Path) -> None:
    conflist = tmp_path / "c.conflist"
    check = watch.HostCheck((), conflist, b"ours\n")
    assert watch.HostCheck((), conflist, b"ours\n").drift() == [f"{conflist} differs"]
    conflist.write_bytes(b"ours\n")
    assert check.drift() == []
    conflist.write_bytes(b"theirs\n")
    assert check.drift() == [f"{conflist} differs"]


def test_drift_reads_sysctls(tmp_path: Path) -> None:
    # A required setting that cannot be read (no such key here) counts as drifted.
    conflist = tmp_path / "c.conflist"
    conflist.write_bytes(b"x")
    missing = sysctl.Setting("net.ipv4.conf.no-such-link.rp_filter", "0", required=True)
    assert watch.HostCheck((missing,), conflist, b"x").drift() == [
        "set net.ipv4.conf.no-such-link.rp_filter=0 (was absent)"
    ]
