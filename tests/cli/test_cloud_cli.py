"""init / status / teardown through the real command against the cloud emulators.

The command runs inside a node namespace (--netns); the emulator listens on that namespace's
loopback, reached only through the documented endpoint overrides, so no packet can go to a
real metadata server or cloud.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon_net import state
from tests.emulators.gce import GceEmulator, GceState
from tests.emulators.volcengine import VolcEmulator
from tests.support.cli import NodePaths, cocoon, kernel_snapshot, run_args, torn_down
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

CLOSED = "http://127.0.0.1:9"  # nothing listens there: a probe that must miss


def _node(make_netns: Callable[[str], Netns], mac: str) -> Netns:
    ns = make_netns("cloud")
    ns.ip("link", "add", "ens4", "address", mac, "type", "veth", "peer", "name", "ens4p")
    ns.ip("link", "set", "ens4", "up")
    ns.ip("link", "set", "ens4p", "up")
    ns.ip("addr", "add", "192.0.2.10/24", "dev", "ens4")
    ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "ens4")
    return ns


def _ok(*argv: str, env: dict[str, str]) -> str:
    proc = cocoon(*argv, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def gce_node(make_netns: Callable[[str], Netns]) -> Iterator[tuple[Netns, GceEmulator]]:
    ns = _node(make_netns, GceState().mac)
    gce = GceEmulator(netns=ns.name).start()
    try:
        yield ns, gce
    finally:
        gce.stop()


def test_gke_init_status_teardown(gce_node: tuple[Netns, GceEmulator], tmp_path: Path) -> None:
    ns, gce = gce_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    env = gce.environ(
        COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "instance_configs.cfg"),
        COCOON_NET_VOLCENGINE_METADATA_URL=CLOSED,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=CLOSED,
    )
    gce.set_secondary([{"rangeName": "operator", "ipCidrRange": "10.9.0.0/24"}])
    gce.set_aliases([{"ipCidrRange": "10.9.0.0/28", "subnetworkRangeName": "operator"}])
    cloud_before = gce.snapshot()
    kernel_before = kernel_snapshot(ns)
    # No --platform: detected from the (emulated) GCE metadata server.
    init = ["--node-name", "gke-node", "--subnet", "172.20.100.0/24", "--pool-size", "20"]
    out = _ok(*run_args(paths, "init", *init, netns=ns.name), env=env)
    assert "cocoon-net init complete: 20 IPs provisioned on 172.20.100.0/24 (gke)" in out
    pool = state.load(paths.pool)
    assert pool.platform == "gke" and pool.alias_range_name == "cocoon-pods"
    assert pool.primary_nic == "ens4"  # the link with nic0's metadata MAC
    assert pool.mtu == 1460  # from metadata, into the bridge and DHCP
    assert "mtu 1460" in ns.ip("link", "show", "cni0")
    ranges = gce.subnet["secondaryIpRanges"]
    assert {"rangeName": "cocoon-pods", "ipCidrRange": "172.20.100.0/24"} in ranges
    aliases = gce.nic0["aliasIpRanges"]
    assert {"ipCidrRange": "172.20.100.0/24", "subnetworkRangeName": "cocoon-pods"} in aliases
    assert {"ipCidrRange": "10.9.0.0/28", "subnetworkRangeName": "operator"} in aliases

    mutations = gce.state.mutations_applied
    _ok(*run_args(paths, "init", *init, "--platform", "gke", netns=ns.name), env=env)
    assert gce.state.mutations_applied == mutations  # init twice changes nothing

    status = _ok(*run_args(paths, "status", netns=ns.name), env=env)
    assert "cocoon-pods:172.20.100.0/24" in status

    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    after = gce.snapshot()
    # Our alias is gone, the operator's stays; the shared range is the operator's to keep.
    assert after["aliases"] == cloud_before["aliases"]
    assert kernel_snapshot(ns) == torn_down(kernel_before)
    assert not paths.pool.exists()


def test_gke_adopted_operator_alias_survives_teardown(
    gce_node: tuple[Netns, GceEmulator], tmp_path: Path
) -> None:
    ns, gce = gce_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    env = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "agent.cfg"))
    gce.set_secondary([{"rangeName": "operator-pods", "ipCidrRange": "10.64.0.0/16"}])
    gce.set_aliases([{"subnetworkRangeName": "operator-pods", "ipCidrRange": "10.64.1.0/24"}])
    cloud_before = gce.snapshot()
    adopt = ["--platform", "gke", "--node-name", "n3", "--subnet", "10.64.1.0/24"]
    out = _ok(*run_args(paths, "adopt", *adopt, netns=ns.name), env=env)
    assert "cloud preserved" in out
    raw = json.loads(paths.pool.read_text())
    assert "aliasRangeName" not in raw  # as the Go tool's adopt writes it
    assert raw["cloud"]["aliasRangeName"] == "operator-pods"
    assert raw["cloud"]["aliasOwned"] is False
    dry = _ok(*run_args(paths, "teardown", "--dry-run", netns=ns.name), env=env)
    assert "keep alias operator-pods:10.64.1.0/24 on nic0: adopted, not ours" in dry
    proc = cocoon(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "alias operator-pods:10.64.1.0/24 was adopted, not created by cocoon-net" in proc.stderr
    assert gce.snapshot() == cloud_before
    assert gce.state.mutations_applied == 0
    assert not paths.pool.exists()


@pytest.mark.parametrize("alias_range_name", ["cocoon-pods", ""])
def test_gke_teardown_of_a_go_tool_pool_json(
    gce_node: tuple[Netns, GceEmulator], tmp_path: Path, alias_range_name: str
) -> None:
    """The Go tool's init wrote aliasRangeName cocoon-pods and no cloud record: teardown
    removes exactly cocoon-pods:<subnet>. Its adopt wrote no name: teardown removes nothing."""
    ns, gce = gce_node
    paths = NodePaths(tmp_path)
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}])
    operator = {"ipCidrRange": "10.128.0.64/28"}
    go_alias = {"subnetworkRangeName": "cocoon-pods", "ipCidrRange": "172.20.100.0/24"}
    gce.set_aliases([operator, go_alias])
    cloud_before = gce.snapshot()
    paths.state.mkdir(parents=True)
    go_pool = {
        "platform": "gke",
        "nodeName": "go-node",
        "subnet": "172.20.100.0/24",
        "gateway": "172.20.100.1",
        "primaryNIC": "ens4",
        "ips": ["172.20.100.2", "172.20.100.3"],
        "aliasRangeName": alias_range_name,
        "updatedAt": "2026-01-02T03:04:05.123456789Z",
    }
    paths.pool.write_text(json.dumps({k: v for k, v in go_pool.items() if v}, indent=2))
    env = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "agent.cfg"))
    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    if alias_range_name:
        assert gce.nic0["aliasIpRanges"] == [operator]
    else:
        assert gce.snapshot() == cloud_before
    assert gce.subnet["secondaryIpRanges"] == [
        {"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}
    ]
    assert not paths.pool.exists()


def test_gke_subnet_outside_the_shared_range_fails_before_any_change(
    gce_node: tuple[Netns, GceEmulator], tmp_path: Path
) -> None:
    ns, gce = gce_node
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/20"}])
    paths = NodePaths(tmp_path)
    cloud_before, kernel_before = gce.snapshot(), kernel_snapshot(ns)
    env = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "agent.cfg"))
    init = ["--platform", "gke", "--node-name", "n2", "--subnet", "172.21.0.0/24"]
    proc = cocoon(*run_args(paths, "init", *init, netns=ns.name), env=env)
    assert proc.returncode == 2  # the --subnet value is wrong for this project
    assert "does not cover --subnet 172.21.0.0/24" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert gce.snapshot() == cloud_before
    assert kernel_snapshot(ns) == kernel_before


@pytest.fixture
def volc_node(make_netns: Callable[[str], Netns]) -> Iterator[tuple[Netns, VolcEmulator]]:
    emu = VolcEmulator()
    ns = _node(make_netns, emu.primary.mac)

    emu.hotplug_into(ns.name)
    emu.start(netns=ns.name)
    try:
        yield ns, emu
    finally:
        emu.stop()


def test_volcengine_init_status_teardown(
    volc_node: tuple[Netns, VolcEmulator], tmp_path: Path
) -> None:
    ns, emu = volc_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    cloud_before = emu.snapshot()
    kernel_before = kernel_snapshot(ns)
    init = ["--node-name", "volc-node", "--subnet", "172.20.100.0/24", "--pool-size", "50"]
    out = _ok(*run_args(paths, "init", *init, netns=ns.name), env=env)
    assert "50 IPs provisioned on 172.20.100.0/24 (volcengine)" in out
    pool = state.load(paths.pool)
    assert pool.platform == "volcengine"
    assert len(pool.ips) == 50 and len(pool.eni_ids) == 3 and pool.subnet_id
    assigned = sorted(ip for e in emu.enis.values() if e.id in pool.eni_ids for ip in e.secondary)
    assert pool.pool_ips == assigned  # exactly the addresses the cloud assigned
    assert pool.vpc_cidrs == [str(emu.vpc_cidr)]  # VMs reach the VPC unmasqueraded
    assert f"-d {emu.vpc_cidr} " in ns.iptables_save()

    status = json.loads(_ok(*run_args(paths, "status", "--json", netns=ns.name), env=env))
    assert status["pool"]["subnetID"] == pool.subnet_id

    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert emu.snapshot() == cloud_before
    assert kernel_snapshot(ns) == torn_down(kernel_before)


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [
        ({"device_id": "i-elsewhere"}, "is attached to i-elsewhere, not to this instance i-"),
        ({"attach": False}, "is attached to no instance, not to this instance i-"),
        ({"tags": {"cocoon-net:node": "node-b"}}, "is tagged cocoon-net:node=node-b"),
    ],
)
def test_volcengine_adopt_refuses_a_foreign_eni(
    volc_node: tuple[Netns, VolcEmulator], tmp_path: Path, foreign: dict[str, Any], reason: str
) -> None:
    ns, emu = volc_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    subnet = emu.add_subnet("vms", "172.20.100.0/24")
    emu.add_foreign_eni(name="operator-eni", subnet_id=subnet.id)  # adoptable on its own
    eni = emu.add_foreign_eni(name="someone-eni", subnet_id=subnet.id, **foreign)
    cloud_before, kernel_before = emu.snapshot(), kernel_snapshot(ns)
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    adopt = ["--platform", "volcengine", "--node-name", "node-a", "--subnet", "172.20.100.0/24"]
    proc = cocoon(*run_args(paths, "adopt", *adopt, netns=ns.name), env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"ENI {eni.id} (someone-eni) holds addresses in 172.20.100.0/24 but" in proc.stderr
    assert reason in proc.stderr
    assert not paths.pool.exists()
    assert emu.snapshot() == cloud_before
    assert kernel_snapshot(ns) == kernel_before


def test_volcengine_adopted_eni_survives_teardown(
    volc_node: tuple[Netns, VolcEmulator], tmp_path: Path
) -> None:
    ns, emu = volc_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    subnet = emu.add_subnet("vms", "172.20.100.0/24")
    operator = emu.add_foreign_eni(name="operator-eni", subnet_id=subnet.id)
    cloud_before = emu.snapshot()
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    adopt = ["--platform", "volcengine", "--node-name", "node-a", "--subnet", "172.20.100.0/24"]
    out = _ok(*run_args(paths, "adopt", *adopt, netns=ns.name), env=env)
    assert "adopt complete: 3 IPs registered" in out
    cloud = json.loads(paths.pool.read_text())["cloud"]
    assert cloud["adoptedEnis"] == [operator.id] and cloud["enis"] == []
    proc = cocoon(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"adopted ENIs {operator.id} are not ours: left in place" in proc.stderr
    assert emu.snapshot() == cloud_before
    assert not paths.pool.exists()


def test_volcengine_teardown_of_a_go_tool_node(
    volc_node: tuple[Netns, VolcEmulator], tmp_path: Path
) -> None:
    """pool.json as the Go tool's init wrote it (no cloud record, no eniIDs) and its seven
    untagged ENIs: status shows them, teardown tags and removes them and nothing else."""
    ns, emu = volc_node
    paths = NodePaths(tmp_path)
    subnet = emu.add_subnet("go-node-vms", "172.20.100.0/24")
    operator = emu.add_foreign_eni(name="go-node-eni-1", subnet_id=subnet.id, device_id="i-x")
    cloud_before = emu.snapshot()
    enis = emu.add_go_enis("go-node", subnet.id)
    ips = sorted((ip for eni in enis for ip in eni.secondary), key=int)
    paths.state.mkdir(parents=True)
    go_pool = {
        "platform": "volcengine",
        "nodeName": "go-node",
        "subnet": "172.20.100.0/24",
        "gateway": "172.20.100.1",
        "primaryNIC": "ens4",
        "secondaryNICs": [f"eth{i}" for i in range(1, 8)],
        "ips": [str(ip) for ip in ips],
        "updatedAt": "2026-01-02T03:04:05.123456789Z",
    }
    paths.pool.write_text(json.dumps(go_pool, indent=2))
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    status = _ok(*run_args(paths, "status", netns=ns.name), env=env)
    assert status.count("(made by the Go tool; init or teardown tags it as ours)") == 7
    assert operator.id not in status
    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert emu.snapshot() == cloud_before
    assert emu.calls.count("TagResources") == 1
    assert not paths.pool.exists()
