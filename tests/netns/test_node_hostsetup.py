"""reconcile and teardown for real, inside a namespace shaped like a cloud VM host.

The namespace has a primary NIC (veth, MTU 1460 like GCE) with a default route, an operator's
own firewall rules and a FORWARD policy of DROP (as Docker and kube leave it), and non-default
rp_filter/ip_forward values, so restoring them is visible.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net import config
from cocoon_net.errors import HostSetupError
from cocoon_net.node import cni, hostsetup, routes, sysctl
from cocoon_net.node.hostsetup import HostSpec
from cocoon_net.state import HostRecord
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

CLONE_NEWNS = 0x00020000
SUBNET = IPv4Network("172.20.100.0/24")
GATEWAY = IPv4Address("172.20.100.1")


def make_host(ns: Netns, primary: str = "eth0", secondary: str = "eth1") -> Netns:
    for name in (primary, secondary):
        ns.ip("link", "add", name, "mtu", "1460", "type", "veth", "peer", "name", name[:12] + "p")
        ns.ip("link", "set", name, "up")
        ns.ip("link", "set", name[:12] + "p", "up")
    ns.ip("addr", "add", "10.9.0.2/24", "dev", primary)
    ns.ip("route", "add", "default", "via", "10.9.0.1", "dev", primary)
    ns.sh(
        "iptables -P FORWARD DROP && "
        "iptables -A FORWARD -i eth9 -m comment --comment operator -j ACCEPT && "
        "iptables -A INPUT -p tcp --dport 22 -j ACCEPT && "
        "iptables -t nat -A POSTROUTING -s 10.99.0.0/16 -o eth0 -j MASQUERADE"
    )
    for key, value in (
        ("net.ipv4.conf.all.rp_filter", "1"),
        ("net.ipv4.conf.default.rp_filter", "2"),
        (sysctl.conf_key(primary, "rp_filter"), "1"),
        (sysctl.conf_key(secondary, "rp_filter"), "2"),
    ):
        write_sysctl(ns, key, value)
    return ns


def write_sysctl(ns: Netns, key: str, value: str) -> None:
    ns.run("sh", "-c", f'echo {value} > "$1"', "-", str(sysctl.key_path(key)))


def read_sysctl(ns: Netns, key: str) -> str:
    return ns.run("cat", str(sysctl.key_path(key)), check=False).stdout.strip()


def spec_for(tmp_path: Path, **changes: Any) -> HostSpec:
    spec = HostSpec(
        bridge="cni0",
        subnet=SUBNET,
        gateway=GATEWAY,
        mtu=None,
        bridge_mac=None,
        primary_nic=None,
        secondary_nics=("eth1",),
        manage_firewall=True,
        drop_cidrs=(IPv4Network("169.254.169.254/32"),),
        drop_internal_access=False,
        vpc_cidrs=(IPv4Network("10.128.0.0/9"),),
        conflist=tmp_path / "net.d" / config.CONFLIST_NAME,
    )
    return dataclasses.replace(spec, **changes)


def snapshot(ns: Netns, spec: HostSpec) -> dict[str, Any]:
    """Everything reconcile may change, read from outside the namespace."""
    keys = [s.key for s in sysctl.desired(spec.bridge, "eth0", spec.secondary_nics)]
    return {
        "links": json.loads(ns.ip("-json", "link", "show")),
        "addrs": json.loads(ns.ip("-json", "addr", "show")),
        "routes": json.loads(ns.ip("-json", "route", "show", "table", "all")),
        "iptables": ns.iptables_save(),
        "sysctls": {key: read_sysctl(ns, key) for key in keys},
        "conflist": spec.conflist.read_bytes() if spec.conflist.exists() else None,
    }


@pytest.fixture
def host(make_netns: Callable[[str], Netns]) -> Netns:
    return make_host(make_netns("node"))


def test_first_run_sets_up_everything_second_run_changes_nothing(
    host: Netns, tmp_path: Path
) -> None:
    spec = spec_for(tmp_path)
    record, changes = host.call(hostsetup.reconcile, spec, HostRecord())
    assert "create bridge cni0 (mac 02:c0:ac:14:64:01, mtu 1460)" in changes
    assert record.bridge_created
    assert record.bridge_address == "172.20.100.1/24"
    wanted_keys = [s.key for s in sysctl.desired("cni0", "eth0", ("eth1",))]
    assert record.sysctls_before == {
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.default.rp_filter": "2",
        "net.ipv4.conf.cni0.rp_filter": "2",  # a new link starts from conf.default
        "net.ipv4.conf.eth0.rp_filter": "1",
        "net.ipv4.conf.eth1.rp_filter": "2",
        "net.ipv4.conf.eth1.arp_ignore": "0",
        "net.ipv4.conf.eth1.arp_announce": "0",
    }
    assert record.sysctls_set == {key: sysctl.value_we_set(key) for key in wanted_keys}
    assert record.sysctls_set["net.ipv4.conf.eth1.arp_ignore"] == "1"
    link = json.loads(host.ip("-json", "-details", "link", "show", "cni0"))[0]
    assert (link["linkinfo"]["info_kind"], link["address"], link["mtu"]) == (
        "bridge",
        "02:c0:ac:14:64:01",
        1460,  # the primary NIC's
    )
    assert "UP" in link["flags"]
    assert "inet 172.20.100.1/24" in host.ip("-4", "addr", "show", "cni0")
    assert all(read_sysctl(host, key) == "0" for key in record.sysctls_before if "rp_filter" in key)
    assert read_sysctl(host, "net.ipv4.ip_forward") == "1"
    assert spec.conflist.read_bytes() == cni.render_conflist("cni0")
    saved = host.run("iptables-save").stdout
    assert '-A FORWARD -m comment --comment "cocoon-net:jump" -j COCOON-FORWARD' in saved
    assert "-A COCOON-POSTROUTING -s 172.20.100.0/24 -d 10.128.0.0/9" in saved
    # the jump is rule 1, ahead of the operator's rules and the DROP policy
    assert host.run("iptables", "-S", "FORWARD").stdout.splitlines()[1].endswith("COCOON-FORWARD")

    first = snapshot(host, spec)
    again, second_changes = host.call(hostsetup.reconcile, spec, record)
    assert second_changes == []
    assert again == record
    assert snapshot(host, spec) == first


def test_teardown_restores_the_host_exactly_and_is_idempotent(host: Netns, tmp_path: Path) -> None:
    spec = spec_for(tmp_path, drop_internal_access=True)
    before = snapshot(host, spec)
    record, _ = host.call(hostsetup.reconcile, spec, HostRecord())
    record, _ = host.call(hostsetup.reconcile, spec, record)  # a daemon restart
    host.call(routes.apply_routes, routes.RouteDiff(add=(IPv4Address("172.20.100.7"),)), "cni0")
    assert snapshot(host, spec) != before

    planned = host.call(hostsetup.plan_teardown, record, "cni0", SUBNET, spec.conflist, True)
    done = host.call(hostsetup.teardown, record, "cni0", SUBNET, spec.conflist, True)
    assert done == planned
    assert "delete bridge cni0" in done
    # Everything as before, except forwarding: left on and said so (see the next test).
    assert snapshot(host, spec) == _forwarding_on(before)
    assert done[-2] == FORWARD_LEFT
    assert host.call(hostsetup.plan_teardown, record, "cni0", SUBNET, spec.conflist, True) == [
        FORWARD_LEFT
    ]
    assert host.call(hostsetup.teardown, record, "cni0", SUBNET, spec.conflist, True) == [
        FORWARD_LEFT
    ]
    assert snapshot(host, spec) == _forwarding_on(before)


FORWARD_LEFT = (
    "left net.ipv4.ip_forward=1: other software may route through this host now (it was 0 "
    "before cocoon-net); if nothing needs it: sysctl -w net.ipv4.ip_forward=0"
)


def _forwarding_on(snap: dict[str, Any]) -> dict[str, Any]:
    return {**snap, "sysctls": {**snap["sysctls"], "net.ipv4.ip_forward": "1"}}


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "record-without-ours"])
def test_teardown_leaves_a_sysctl_someone_else_changed_and_says_why(
    host: Netns, tmp_path: Path, recorded: bool
) -> None:
    spec = spec_for(tmp_path, manage_firewall=False)
    record, _ = host.call(hostsetup.reconcile, spec, HostRecord())
    if not recorded:  # pool.json written before the values we set were kept
        record = dataclasses.replace(record, sysctls_set={})
    write_sysctl(host, "net.ipv4.conf.all.rp_filter", "2")  # someone else, after us

    planned = host.call(hostsetup.plan_teardown, record, "cni0", SUBNET, spec.conflist, False)
    done = host.call(hostsetup.teardown, record, "cni0", SUBNET, spec.conflist, False)
    assert done == planned
    sysctl_lines = [line for line in done if "net.ipv4" in line]
    assert sysctl_lines == [
        "set net.ipv4.conf.cni0.rp_filter=2 (was 0)",
        "set net.ipv4.conf.default.rp_filter=2 (was 0)",
        "set net.ipv4.conf.eth0.rp_filter=1 (was 0)",
        "set net.ipv4.conf.eth1.arp_announce=0 (was 2)",
        "set net.ipv4.conf.eth1.arp_ignore=0 (was 1)",
        "set net.ipv4.conf.eth1.rp_filter=2 (was 0)",
        "left net.ipv4.conf.all.rp_filter=2: changed by someone else since cocoon-net set it to 0",
        FORWARD_LEFT,
    ]
    assert read_sysctl(host, "net.ipv4.conf.all.rp_filter") == "2"
    assert read_sysctl(host, "net.ipv4.conf.default.rp_filter") == "2"
    assert read_sysctl(host, "net.ipv4.conf.eth0.rp_filter") == "1"
    assert read_sysctl(host, "net.ipv4.ip_forward") == "1"


def _reconcile_with_read_only(
    spec: HostSpec, key: str, stand_in: Path
) -> tuple[list[HostRecord], str]:
    """reconcile while key cannot be written (a read-only file bound over it, in a private
    mount namespace of this forked child); every record on_progress saw, and the error."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    target = str(sysctl.key_path(key))
    subprocess.run(["mount", "--bind", "-o", "ro", str(stand_in), target], check=True)
    seen: list[HostRecord] = []
    try:
        hostsetup.reconcile(spec, HostRecord(), on_progress=seen.append)
    except HostSetupError as exc:
        return seen, str(exc)
    return seen, ""


def test_each_sysctl_is_recorded_as_it_is_written(host: Netns, tmp_path: Path) -> None:
    """A required setting that cannot be written aborts host setup; those written before it
    are already in the record, so teardown can put them back."""
    stand_in = tmp_path / "rp_filter"
    stand_in.write_text("1\n")
    spec = spec_for(tmp_path, manage_firewall=False)
    seen, error = host.call(
        _reconcile_with_read_only, spec, "net.ipv4.conf.default.rp_filter", stand_in
    )
    assert error == "set net.ipv4.conf.default.rp_filter=0: Read-only file system"
    written = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0"}
    assert seen[-1].sysctls_set == written
    before = {"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.rp_filter": "1"}
    assert seen[-1].sysctls_before == before
    assert {key: read_sysctl(host, key) for key in written} == written
    done = host.call(hostsetup.teardown, seen[-1], "cni0", SUBNET, spec.conflist, False)
    assert "set net.ipv4.conf.all.rp_filter=1 (was 0)" in done
    assert read_sysctl(host, "net.ipv4.conf.all.rp_filter") == "1"


def test_a_setting_that_already_had_our_value_is_neither_recorded_nor_restored(
    host: Netns, tmp_path: Path
) -> None:
    write_sysctl(host, "net.ipv4.ip_forward", "1")
    write_sysctl(host, "net.ipv4.conf.default.rp_filter", "0")
    spec = spec_for(tmp_path, manage_firewall=False)
    record, changes = host.call(hostsetup.reconcile, spec, HostRecord())
    assert not any("ip_forward" in c or "default.rp_filter" in c for c in changes)
    for key in ("net.ipv4.ip_forward", "net.ipv4.conf.default.rp_filter"):
        assert key not in record.sysctls_before and key not in record.sysctls_set
    write_sysctl(host, "net.ipv4.conf.default.rp_filter", "1")  # someone else's, later
    done = host.call(hostsetup.teardown, record, "cni0", SUBNET, spec.conflist, False)
    assert not any("ip_forward" in c or "default.rp_filter" in c for c in done)
    assert read_sysctl(host, "net.ipv4.ip_forward") == "1"
    assert read_sysctl(host, "net.ipv4.conf.default.rp_filter") == "1"


def test_teardown_of_an_adopted_bridge_keeps_it_and_its_other_addresses(
    host: Netns, tmp_path: Path
) -> None:
    host.ip("link", "add", "cni0", "type", "bridge")
    host.ip("addr", "add", "192.0.2.1/24", "dev", "cni0")
    spec = spec_for(tmp_path, manage_firewall=False)
    record, _ = host.call(hostsetup.reconcile, spec, HostRecord())
    assert not record.bridge_created
    saved = host.iptables_save()
    host.call(hostsetup.teardown, record, "cni0", SUBNET, spec.conflist, False)
    addrs = host.ip("-4", "addr", "show", "cni0")
    assert "192.0.2.1/24" in addrs
    assert "172.20.100.1" not in addrs
    assert host.iptables_save() == saved  # not ours to manage: untouched both ways


def test_subnet_change_moves_address_and_rules_without_leftovers(
    host: Netns, tmp_path: Path
) -> None:
    host.ip("link", "add", "cni0", "type", "bridge")
    host.ip("addr", "add", "192.0.2.1/24", "dev", "cni0")  # the operator's; must survive
    record, _ = host.call(hostsetup.reconcile, spec_for(tmp_path), HostRecord())
    moved = spec_for(
        tmp_path, subnet=IPv4Network("172.20.200.0/24"), gateway=IPv4Address("172.20.200.1")
    )
    record, changes = host.call(hostsetup.reconcile, moved, record)
    assert "remove old address 172.20.100.1/24 from cni0" in changes
    assert "set cni0 mac 02:c0:ac:14:c8:01 (was 02:c0:ac:14:64:01)" in changes
    addrs = host.ip("-4", "addr", "show", "cni0")
    assert "172.20.200.1/24" in addrs and "192.0.2.1/24" in addrs
    assert "172.20.100." not in addrs
    saved = host.run("iptables-save").stdout
    assert "172.20.100.0/24" not in saved
    rules = [line for line in saved.splitlines() if line.startswith("-A")]
    assert len(rules) == len(set(rules))
    assert sum("cocoon-net:jump" in line for line in rules) == 3
    assert record.bridge_address == "172.20.200.1/24"


def test_dry_run_changes_nothing(host: Netns, tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    before = snapshot(host, spec)
    record, changes = host.call(hostsetup.reconcile, spec, HostRecord(), dry_run=True)
    assert record == HostRecord()
    assert changes[0] == "create bridge cni0 (mac 02:c0:ac:14:64:01, mtu 1460)"
    assert any(line.startswith("firewall: create chain") for line in changes)
    assert changes[-1] == f"write {spec.conflist}"
    assert snapshot(host, spec) == before

    # and after a real run, a dry run with the same spec finds nothing to do
    record, _ = host.call(hostsetup.reconcile, spec, HostRecord())
    assert host.call(hostsetup.reconcile, spec, record, dry_run=True) == (record, [])


def test_existing_non_bridge_link_is_refused_and_nothing_changes(
    host: Netns, tmp_path: Path
) -> None:
    host.ip("link", "add", "cni0", "type", "veth", "peer", "name", "cni0p")
    spec = spec_for(tmp_path)
    before = snapshot(host, spec)
    with pytest.raises(HostSetupError, match="cni0 exists but is a veth link, not a bridge"):
        host.call(hostsetup.reconcile, spec, HostRecord())
    assert snapshot(host, spec) == before


def test_dotted_interface_names(make_netns: Callable[[str], Netns], tmp_path: Path) -> None:
    ns = make_host(make_netns("dot"), primary="up.1", secondary="sec.2")
    spec = spec_for(tmp_path, bridge="vm.br", secondary_nics=("sec.2",), manage_firewall=False)
    record, _ = ns.call(hostsetup.reconcile, spec, HostRecord())
    assert record.sysctls_before["net.ipv4.conf.up/1.rp_filter"] == "1"
    assert record.sysctls_before["net.ipv4.conf.sec/2.rp_filter"] == "2"
    assert ns.run("cat", "/proc/sys/net/ipv4/conf/up.1/rp_filter").stdout.strip() == "0"
    assert ns.run("cat", "/proc/sys/net/ipv4/conf/sec.2/rp_filter").stdout.strip() == "0"
    assert ns.run("cat", "/proc/sys/net/ipv4/conf/vm.br/rp_filter").stdout.strip() == "0"
    ns.call(hostsetup.teardown, record, "vm.br", spec.subnet, spec.conflist, False)
    assert ns.run("cat", "/proc/sys/net/ipv4/conf/up.1/rp_filter").stdout.strip() == "1"
    assert ns.run("cat", "/proc/sys/net/ipv4/conf/sec.2/rp_filter").stdout.strip() == "2"


def test_missing_secondary_nic_is_a_warning_not_an_error(host: Netns, tmp_path: Path) -> None:
    spec = spec_for(tmp_path, secondary_nics=("eth7",), mtu=9000, bridge_mac="02:AA:00:00:00:01")
    record, changes = host.call(hostsetup.reconcile, spec, HostRecord())
    assert "create bridge cni0 (mac 02:aa:00:00:00:01, mtu 9000)" in changes
    assert not any("eth7" in key for key in record.sysctls_before)


def test_sysctl_values_before_keep_the_first_recording(host: Netns, tmp_path: Path) -> None:
    spec = spec_for(tmp_path, manage_firewall=False)
    record, _ = host.call(hostsetup.reconcile, spec, HostRecord())
    write_sysctl(host, "net.ipv4.ip_forward", "0")  # something reset it meanwhile
    record2, changes = host.call(hostsetup.reconcile, spec, record)
    assert changes == ["set net.ipv4.ip_forward=1 (was 0)"]
    assert record2.sysctls_before == record.sysctls_before


def test_go_tool_drop_rules_in_forward_are_replaced(host: Netns, tmp_path: Path) -> None:
    host.run(
        "iptables", "-I", "FORWARD", "1", "-i", "cni0", "-d", "10.0.0.0/8",
        "-m", "comment", "--comment", "cocoon-net-drop", "-j", "DROP",
    )  # fmt: skip
    spec = spec_for(tmp_path, drop_cidrs=(IPv4Network("10.0.0.0/8"),))
    host.call(hostsetup.reconcile, spec, HostRecord())
    forward = host.run("iptables", "-S", "FORWARD").stdout
    assert "cocoon-net-drop" not in forward
    assert (
        "-A COCOON-FORWARD -d 10.0.0.0/8 -i cni0 -m comment --comment cocoon-net-drop -j DROP"
        in (host.run("iptables", "-S", "COCOON-FORWARD").stdout)
    )


def test_go_tool_rules_are_replaced_by_ours_and_look_alikes_stay(
    host: Netns, tmp_path: Path
) -> None:
    # What the Go tool's iptables calls leave for a node with secondary NIC eth1, its subnet
    # written with host bits as pool.json may hold it, plus rules that only look like them.
    go = [
        "-I FORWARD 1 -i cni0 -d 169.254.169.254/32 -m comment --comment cocoon-net-drop -j DROP",
        "-A FORWARD -i eth1 -o cni0 -j ACCEPT",
        "-A FORWARD -i cni0 -o eth1 -j ACCEPT",
        "-A FORWARD -i cni0 -o cni0 -j ACCEPT",
        "-t nat -A POSTROUTING -s 172.20.100.5/24 ! -o cni0 -j MASQUERADE",
    ]
    look_alikes = [
        "-A FORWARD -i eth2 -o cni0 -j ACCEPT",
        "-A FORWARD -i cni0 -o cni0 -p tcp -j ACCEPT",
        "-t nat -A POSTROUTING -s 172.20.200.0/24 ! -o cni0 -j MASQUERADE",
    ]
    for rule in go + look_alikes:
        host.run("iptables", *rule.split())

    _, changes = host.call(hostsetup.reconcile, spec_for(tmp_path), HostRecord())

    forward = host.run("iptables", "-S", "FORWARD").stdout.splitlines()
    post = host.run("iptables", "-t", "nat", "-S", "POSTROUTING").stdout.splitlines()
    assert forward == [
        "-P FORWARD DROP",
        '-A FORWARD -m comment --comment "cocoon-net:jump" -j COCOON-FORWARD',
        "-A FORWARD -i eth9 -m comment --comment operator -j ACCEPT",
        "-A FORWARD -i eth2 -o cni0 -j ACCEPT",
        "-A FORWARD -i cni0 -o cni0 -p tcp -j ACCEPT",
    ]
    assert post == [
        "-P POSTROUTING ACCEPT",
        '-A POSTROUTING -m comment --comment "cocoon-net:jump" -j COCOON-POSTROUTING',
        "-A POSTROUTING -s 10.99.0.0/16 -o eth0 -j MASQUERADE",
        "-A POSTROUTING -s 172.20.200.0/24 ! -o cni0 -j MASQUERADE",
    ]
    assert "-A COCOON-FORWARD -s 172.20.100.0/24 -i cni0" in host.iptables_save()
    assert any("remove 5 rules" in line for line in changes), changes
