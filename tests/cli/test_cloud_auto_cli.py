"""`init --subnet auto`, failed inits and error lines, through the real command.

Same set-up as test_cloud_cli.py: the command runs in a node namespace, the emulator listens
on that namespace's loopback.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cocoon_net import state
from cocoon_net.errors import MAX_LINE
from tests.cli.test_cloud_cli import _ok, gce_node, volc_node  # noqa: F401 - fixtures
from tests.emulators.gce import GceEmulator
from tests.emulators.volcengine import VolcEmulator
from tests.support.cli import NodePaths, cocoon, run_args
from tests.support.netns import Netns

AUTO = ["--subnet", "auto", "--pool-size", "10"]


def _error_line(stderr: str) -> str:
    """The one error line of a failed command; every line it wrote is short."""
    lines = stderr.splitlines()
    assert all(len(line) <= MAX_LINE for line in lines), max(lines, key=len)
    errors = [line for line in lines if line.startswith("cocoon-net: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_gke_auto_rerun_keeps_the_subnet_and_teardown_says_what_happens_to_the_range(
    gce_node: tuple[Netns, GceEmulator],  # noqa: F811
    tmp_path: Path,
) -> None:
    ns, gce = gce_node
    paths = NodePaths(tmp_path)
    env = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "agent.cfg"))
    before = gce.snapshot()
    init = ["--platform", "gke", "--node-name", "n1", *AUTO]
    proc = cocoon(*run_args(paths, "init", *init, netns=ns.name), env=env)
    assert proc.returncode == 2
    assert "pass --range-cidr" in _error_line(proc.stderr)
    assert not paths.pool.exists() and gce.snapshot() == before

    dry = _ok(*run_args(paths, "init", *init, "--dry-run", netns=ns.name), env=env)
    assert "subnet:          auto (the first free /24, claimed by init)" in dry
    out = _ok(*run_args(paths, "init", *init, "--range-cidr", "172.20.0.0/16", netns=ns.name),
              env=env)  # fmt: skip
    assert "10 IPs provisioned on 172.20.0.0/24 (gke)" in out
    pool = state.load(paths.pool)
    assert pool.cloud["subnetAuto"] is True and pool.cloud["fleetRange"] == "172.20.0.0/16"
    assert "incomplete" not in json.loads(paths.pool.read_text())
    mutations = gce.state.mutations_applied
    again = _ok(*run_args(paths, "init", *init, netns=ns.name), env=env)
    assert "on 172.20.0.0/24 (gke)" in again and gce.state.mutations_applied == mutations

    dry = _ok(*run_args(paths, "init", *init, "--dry-run", netns=ns.name), env=env)
    assert "subnet:          172.20.0.0/24" in dry  # what this node holds
    dry = _ok(*run_args(paths, "teardown", "--dry-run", netns=ns.name), env=env)
    assert "remove range cocoon-pods=172.20.0.0/16 if no instance uses it any more" in dry
    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert gce.snapshot() == before  # the only node: its teardown removed the range


def test_a_failed_init_never_blocks_an_init_with_other_arguments(
    volc_node: tuple[Netns, VolcEmulator],  # noqa: F811
    tmp_path: Path,
) -> None:
    ns, emu = volc_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    before = emu.snapshot()
    init = ["--platform", "volcengine", *AUTO]
    no_keys = {**env, "VOLCENGINE_ACCESS_KEY_ID": ""}
    proc = cocoon(*run_args(paths, "init", *init, "--node-name", "a", netns=ns.name), env=no_keys)
    assert proc.returncode == 1
    assert "no Volcengine credentials" in _error_line(proc.stderr)
    assert not paths.pool.exists() or json.loads(paths.pool.read_text()).get("incomplete")

    out = _ok(*run_args(paths, "init", *init, "--node-name", "b", netns=ns.name), env=env)
    assert "10 IPs provisioned on 172.20.1.0/24 (volcengine)" in out
    assert state.load(paths.pool).node_name == "b"
    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert emu.snapshot() == before


@pytest.mark.parametrize(
    ("other", "node", "subnet"),
    [
        (["--node-name", "b", "--subnet", "auto"], "b", "172.20.1.0/24"),
        (["--node-name", "a", "--subnet", "172.20.101.0/24"], "a", "172.20.101.0/24"),
    ],
)
def test_an_incomplete_init_is_undone_before_an_init_with_other_arguments(
    volc_node: tuple[Netns, VolcEmulator],  # noqa: F811
    tmp_path: Path,
    other: list[str],
    node: str,
    subnet: str,
) -> None:
    """Made a subnet and ENIs, then failed: a different init says so and removes them first."""
    ns, emu = volc_node
    paths = NodePaths(tmp_path)
    paths.cni.mkdir()
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    before = emu.snapshot()
    emu.inject("AttachNetworkInterface", "InternalError", times=99)
    init = ["--platform", "volcengine", "--pool-size", "140"]
    first = ["--node-name", "a", "--subnet", "172.20.100.0/24"]
    proc = cocoon(*run_args(paths, "init", *init, *first, netns=ns.name), env=env)
    assert proc.returncode == 1
    line = _error_line(proc.stderr)  # seven ENIs failed alike: one line names the first
    assert "and 6 more failures" in line
    retries = [ln for ln in proc.stderr.splitlines() if "retrying (attempt" in ln]
    assert retries and all(" info " in ln for ln in retries)  # waits are never silent
    assert json.loads(paths.pool.read_text())["incomplete"] is True
    assert len(emu.subnets) == 2  # ours was made

    emu.faults.clear()
    proc = cocoon(*run_args(paths, "init", *init, *other, netns=ns.name), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "replaced the incomplete init of node 'a' on 172.20.100.0/24" in proc.stdout
    assert "never completed: undoing what it records" in proc.stderr
    pool = state.load(paths.pool)
    assert pool.node_name == node and pool.network == IPv4Network(subnet)
    made = {(s.name, str(s.cidr)) for s in emu.subnets.values()}
    assert made == {("default", "172.20.0.0/24"), (f"{node}-vms", subnet)}  # the first is gone
    _ok(*run_args(paths, "teardown", netns=ns.name), env=env)
    assert emu.snapshot() == before


def test_gke_remove_range_takes_a_range_no_instance_uses(
    gce_node: tuple[Netns, GceEmulator],  # noqa: F811
    tmp_path: Path,
) -> None:
    ns, gce = gce_node
    paths = NodePaths(tmp_path)
    env = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "agent.cfg"))
    before = gce.snapshot()
    init = ["--platform", "gke", "--node-name", "n1", "--subnet", "172.20.5.0/24"]
    _ok(*run_args(paths, "init", *init, "--pool-size", "10", netns=ns.name), env=env)
    dry = _ok(*run_args(paths, "teardown", "--dry-run", netns=ns.name), env=env)
    assert "keep range cocoon-pods (not claimed with --subnet auto" in dry
    dry = _ok(*run_args(paths, "teardown", "--dry-run", "--remove-range", netns=ns.name), env=env)
    assert "remove range cocoon-pods if no instance uses it any more" in dry
    gce.add_node("n2", "42:01:0a:80:02:02")  # another instance comes to hold an alias in it
    n2 = next(i for p, i in gce.state.instances.items() if p.endswith("/n2"))["networkInterfaces"][
        0
    ]
    n2["aliasIpRanges"] = [{"subnetworkRangeName": "cocoon-pods", "ipCidrRange": "172.20.5.8/29"}]
    proc = cocoon(*run_args(paths, "teardown", "--remove-range", netns=ns.name), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "kept: other instances still use it" in proc.stderr
    assert gce.subnet["secondaryIpRanges"] != []
    n2["aliasIpRanges"] = []  # n2 goes away
    _ok(*run_args(paths, "init", *init, "--pool-size", "10", netns=ns.name), env=env)
    _ok(*run_args(paths, "teardown", "--remove-range", netns=ns.name), env=env)
    after = gce.snapshot()
    assert after["subnets"] == before["subnets"]  # the range is gone
