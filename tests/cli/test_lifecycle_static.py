"""adopt/status/teardown of a static node, run as the real command inside a namespace.

Issue "Done when": adopt then status; adopt again changes nothing (no duplicate rules, files
untouched); adopt with a new subnet leaves no old address or rule; teardown leaves the
namespace's routes, rules and files as before adopt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cocoon_net import state
from tests.support.cli import (
    NodePaths,
    cocoon,
    kernel_snapshot,
    run_args,
    torn_down,
    tree_digest,
)
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

ADOPT = [
    "--platform", "static", "--node-name", "lab-1", "--subnet", "10.66.0.0/24",
    "--manage-iptables", "--vpc-cidr", "10.0.0.0/8", "--drop-cidr", "169.254.169.254/32",
]  # fmt: skip


def _node(make_netns: Callable[[str], Netns]) -> Netns:
    """A node namespace with a primary NIC and a default route, like a cloud VM, forwarding
    off and strict reverse-path filtering as a distribution leaves them."""
    ns = make_netns("node")
    ns.ip("link", "add", "ens4", "mtu", "1460", "type", "veth", "peer", "name", "ens4p")
    ns.ip("link", "set", "ens4", "up")
    ns.ip("link", "set", "ens4p", "up")
    ns.ip("addr", "add", "192.0.2.10/24", "dev", "ens4")
    ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "ens4")
    for key, value in _HOST_SYSCTLS.items():
        _write_sysctl(ns, key, value)
    return ns


_HOST_SYSCTLS = {
    "net.ipv4.ip_forward": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "1",
    "net.ipv4.conf.ens4.rp_filter": "1",
}
_FORWARD_LEFT = (
    "left net.ipv4.ip_forward=1: other software may route through this host now (it was 0 "
    "before cocoon-net); if nothing needs it: sysctl -w net.ipv4.ip_forward=0"
)


def _write_sysctl(ns: Netns, key: str, value: str) -> None:
    ns.run("sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")


def _ok(*argv: str) -> str:
    proc = cocoon(*argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_adopt_status_readopt_teardown(make_netns: Callable[[str], Netns], tmp_path: Path) -> None:
    ns = _node(make_netns)
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()  # like /etc/cni/net.d on a host: ours to write into, not to remove
    kernel_before = kernel_snapshot(ns)
    files_before = tree_digest(tmp_path)

    out = _ok(*run_args(paths, "adopt", *ADOPT, netns=ns.name))
    assert "cocoon-net adopt complete: 253 IPs registered on 10.66.0.0/24 (static" in out
    pool = state.load(paths.pool)
    assert pool.primary_nic in {"", "ens4"}
    assert pool.ips[0] == "10.66.0.2" and len(pool.ips) == 253
    assert pool.manage_iptables
    assert pool.vpc_cidrs == ["10.0.0.0/8"]
    assert "10.66.0.1/24" in ns.ip("addr", "show", "cni0")
    assert "mtu 1460" in ns.ip("link", "show", "cni0")  # the primary NIC's MTU
    assert "02:c0:0a:42:00:01" in ns.ip("link", "show", "cni0")
    rules = ns.iptables_save()
    assert "COCOON-FORWARD" in rules and "MASQUERADE" in rules
    assert "-d 10.0.0.0/8" in rules and "169.254.169.254/32" in rules
    conflist = (paths.cni / "30-cocoon-dhcp.conflist").read_text()
    assert json.loads(conflist)["plugins"][0]["bridge"] == "cni0"

    status = _ok(*run_args(paths, "status", netns=ns.name))
    assert "Platform:   static" in status and "IPs:        253" in status
    assert "Egress:     main table (no secondary ENI)" in status
    as_json = json.loads(_ok(*run_args(paths, "status", "--json", netns=ns.name)))
    assert as_json["pool"]["subnet"] == "10.66.0.0/24"
    assert as_json["egress"] == {"enis": [], "missingRules": []}

    # Again: nothing changes, not even a file's mtime-independent content.
    kernel_once = kernel_snapshot(ns)
    conflist_stat = (paths.cni / "30-cocoon-dhcp.conflist").stat()
    pool_before = state.load(paths.pool)
    out = _ok(*run_args(paths, "adopt", *ADOPT, netns=ns.name))
    assert out.splitlines()[:-1] == [], out  # no change lines, only the summary
    assert kernel_snapshot(ns) == kernel_once
    assert (paths.cni / "30-cocoon-dhcp.conflist").stat().st_mtime_ns == conflist_stat.st_mtime_ns
    again = state.load(paths.pool)
    again.updated_at = pool_before.updated_at
    assert again == pool_before

    # A new subnet: the old address and every rule naming the old subnet are gone.
    new = [a if a != "10.66.0.0/24" else "10.67.0.0/24" for a in ADOPT]
    _ok(*run_args(paths, "adopt", *new, netns=ns.name))
    addrs = ns.ip("addr", "show", "cni0")
    assert "10.67.0.1/24" in addrs and "10.66.0.1" not in addrs
    rules = ns.iptables_save()
    assert "10.66.0." not in rules and "10.67.0.0/24" in rules
    assert rules.count("MASQUERADE") == 1

    # Teardown: the namespace and the files are as before adopt.
    dry = _ok(*run_args(paths, "teardown", "--dry-run", netns=ns.name))
    assert "[dry-run]" in dry and "pool.json" in dry
    assert state.load(paths.pool).subnet == "10.67.0.0/24"  # dry-run removed nothing
    out = _ok(*run_args(paths, "teardown", netns=ns.name))
    assert "cocoon-net teardown complete (static)" in out
    assert f"  {_FORWARD_LEFT}" in out.splitlines()
    assert kernel_snapshot(ns) == torn_down(kernel_before)
    run_dir = {k for k in tree_digest(tmp_path) if k.startswith("run")}
    assert {k: v for k, v in tree_digest(tmp_path).items() if k not in run_dir} == files_before

    # And again: nothing left to do, still success.
    out = _ok(*run_args(paths, "teardown", netns=ns.name))
    assert "nothing to tear down" in out


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "record-without-ours"])
def test_teardown_restores_only_the_sysctls_that_still_hold_our_values(
    make_netns: Callable[[str], Netns], tmp_path: Path, recorded: bool
) -> None:
    ns = _node(make_netns)
    paths = NodePaths(tmp_path)
    _ok(*run_args(paths, "adopt", *ADOPT, netns=ns.name))
    host = json.loads(paths.pool.read_text())["host"]
    assert host["sysctlsBefore"] == {**_HOST_SYSCTLS, "net.ipv4.conf.cni0.rp_filter": "1"}
    assert host["sysctlsSet"] == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.cni0.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        "net.ipv4.conf.ens4.rp_filter": "0",
    }
    if not recorded:  # a pool.json written before the values we set were kept
        raw = json.loads(paths.pool.read_text())
        del raw["host"]["sysctlsSet"]
        paths.pool.write_text(json.dumps(raw))
    _write_sysctl(ns, "net.ipv4.conf.all.rp_filter", "2")  # someone else, after adopt

    report = [
        "set net.ipv4.conf.cni0.rp_filter=1 (was 0)",
        "set net.ipv4.conf.default.rp_filter=1 (was 0)",
        "set net.ipv4.conf.ens4.rp_filter=1 (was 0)",
        "left net.ipv4.conf.all.rp_filter=2: changed by someone else since cocoon-net set it to 0",
        _FORWARD_LEFT,
    ]
    dry = _ok(*run_args(paths, "teardown", "--dry-run", netns=ns.name))
    assert [line.strip() for line in dry.splitlines() if "net.ipv4" in line] == report
    out = _ok(*run_args(paths, "teardown", netns=ns.name))
    assert [line.strip() for line in out.splitlines() if "net.ipv4" in line] == report
    assert {key: ns.sysctl(key) for key in _HOST_SYSCTLS} == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": "2",
        "net.ipv4.conf.default.rp_filter": "1",
        "net.ipv4.conf.ens4.rp_filter": "1",
    }


def test_adopt_without_manage_iptables_leaves_firewall_alone(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = _node(make_netns)
    paths = NodePaths(tmp_path)
    rules_before = ns.iptables_save()
    args = [a for a in ADOPT if a != "--manage-iptables"]
    _ok(*run_args(paths, "adopt", *args, netns=ns.name))
    assert ns.iptables_save() == rules_before
    assert state.load(paths.pool).manage_iptables is False
    _ok(*run_args(paths, "teardown", netns=ns.name))
    assert ns.iptables_save() == rules_before


def test_go_pool_json_loads(tmp_path: Path) -> None:
    """A pool.json exactly as the Go tool writes it, no trailing newline."""
    text = json.dumps(
        {
            "platform": "volcengine",
            "nodeName": "cocoon-pool",
            "subnet": "172.20.100.0/24",
            "gateway": "172.20.100.1",
            "primaryNIC": "eth0",
            "secondaryNICs": ["eth1", "eth2"],
            "ips": ["172.20.100.5", "172.20.100.17"],
            "dnsServers": ["8.8.8.8", "1.1.1.1"],
            "dropInternalAccess": True,
            "dropCIDRs": ["10.1.2.3/8"],
            "updatedAt": "2026-04-05T06:00:00.123456789Z",
        },
        indent=2,
    )
    path = tmp_path / "pool.json"
    path.write_text(text)
    pool = state.load(path)
    assert pool.platform == "volcengine" and pool.secondary_nics == ["eth1", "eth2"]
    assert pool.ips == ["172.20.100.5", "172.20.100.17"]
    assert pool.manage_iptables is True  # the Go daemon always installed its rules
    assert pool.bridge == "cni0"
    out = cocoon("status", "--state-dir", str(tmp_path), "--no-cloud")
    assert out.returncode == 0, out.stderr
    assert "Node:       cocoon-pool" in out.stdout


def test_go_pool_json_with_null_ips_loads(tmp_path: Path) -> None:
    (tmp_path / "pool.json").write_text(
        '{"platform":"gke","nodeName":"n","subnet":"10.1.0.0/24","gateway":"","ips":null,'
        '"updatedAt":"0001-01-01T00:00:00Z"}'
    )
    pool = state.load(tmp_path / "pool.json")
    assert pool.ips == [] and pool.gateway == ""


def test_adopt_dry_run_shows_the_plan_and_changes_nothing(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = _node(make_netns)
    paths = NodePaths(tmp_path)
    kernel_before, files_before = kernel_snapshot(ns), tree_digest(tmp_path)
    out = _ok(*run_args(paths, "adopt", *ADOPT, "--dry-run", netns=ns.name))
    assert "[dry-run] would adopt node with config:" in out
    assert "(first=10.66.0.2, last=10.66.0.254)" in out
    assert "create bridge cni0" in out and "would NOT touch: cloud" in out
    assert kernel_snapshot(ns) == kernel_before
    assert tree_digest(tmp_path) == files_before
