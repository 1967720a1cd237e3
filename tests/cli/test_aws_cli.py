"""init / status / teardown for AWS through the real command, inside a node namespace, against
moto behind the fault proxy and the IMDSv2 emulator (both listening in that namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cocoon_net import state
from tests.emulators.aws import AwsWorld, MotoServer
from tests.support.cli import NodePaths, cocoon, kernel_snapshot, run_args, torn_down
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

CLOSED = "http://127.0.0.1:9"  # nothing listens there: a probe that must miss
INIT = ["--node-name", "aws-node", "--subnet", "10.0.100.0/24", "--platform", "aws"]


class Node:
    def __init__(self, ns: Netns, world: AwsWorld, tmp_path: Path) -> None:
        self.ns, self.world = ns, world
        self.paths = NodePaths(tmp_path)
        self.paths.cni.mkdir()
        self.env = {
            **world.environ(),
            "GCE_METADATA_HOST": CLOSED.removeprefix("http://"),
            "COCOON_NET_VOLCENGINE_METADATA_URL": CLOSED,
        }

    def run(self, command: str, *argv: str) -> tuple[int, str, str]:
        proc = cocoon(*run_args(self.paths, command, *argv, netns=self.ns.name), env=self.env)
        return proc.returncode, proc.stdout, proc.stderr

    def ok(self, command: str, *argv: str) -> str:
        code, out, err = self.run(command, *argv)
        assert code == 0, err
        return out

    def mutations(self) -> list[str]:
        return [c for c in self.world.proxy.calls if not c.startswith("Describe")]


def _node(
    make_netns: Callable[[str], Netns], moto: MotoServer, tmp_path: Path, instance_type: str
) -> Node:
    ns = make_netns("awscli")
    world = AwsWorld(moto, ns.name, instance_type)
    ns.ip("link", "add", "eth0", "address", world.mac, "type", "veth", "peer", "name", "eth0p")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth0p", "up")
    ns.ip("addr", "add", "10.0.0.4/24", "dev", "eth0")
    ns.ip("route", "add", "default", "via", "10.0.0.1", "dev", "eth0")
    return Node(ns, world, tmp_path)


@pytest.fixture
def node(
    request: pytest.FixtureRequest,
    make_netns: Callable[[str], Netns],
    moto_server: MotoServer,
    tmp_path: Path,
) -> Node:
    made = _node(make_netns, moto_server, tmp_path, getattr(request, "param", "c5.metal"))
    request.addfinalizer(made.world.stop)
    return made


def test_aws_detected_init_rerun_status_teardown(node: Node) -> None:
    foreign = node.world.add_foreign_eni()
    cloud_before = node.world.snapshot()
    kernel_before = kernel_snapshot(node.ns)
    # No --platform: detected from the (emulated) IMDSv2 token answer.
    out = node.ok("init", *INIT[:-2], "--pool-size", "40")
    assert "cocoon-net init complete: 40 IPs provisioned on 10.0.100.0/24 (aws)" in out
    pool = state.load(node.paths.pool)
    assert pool.platform == "aws" and pool.primary_nic == "eth0"  # the metadata MAC's link
    assert pool.vpc_cidrs == [AwsWorld.VPC_CIDR]
    (eni,) = node.world.ours("aws-node")
    assert pool.eni_ids == [eni["NetworkInterfaceId"]] and len(pool.ips) == 40
    prefixes = node.world.proxy.prefixes[eni["NetworkInterfaceId"]]
    assert {str(ip) for p in prefixes for ip in p} >= set(pool.ips)
    raw = json.loads(node.paths.pool.read_text())
    assert raw["cloud"]["enis"][0]["ifname"] == pool.secondary_nics[0]

    made = len(node.mutations())
    node.ok("init", *INIT, "--pool-size", "40")
    assert len(node.mutations()) == made  # init twice changes nothing

    status = node.ok("status", "--json")
    assert "c5.metal (15 ENIs x 50 addresses; prefix mode)" in status

    node.ok("teardown")
    assert node.world.snapshot() == cloud_before
    assert foreign in node.world.snapshot()["enis"]
    assert kernel_snapshot(node.ns) == torn_down(kernel_before)
    assert not node.paths.pool.exists()


@pytest.mark.parametrize("node", ["m4.large"], indirect=True)
def test_aws_secondary_ip_mode_within_the_instance_types_limits(node: Node) -> None:
    cloud_before = node.world.snapshot()
    code, _, err = node.run("init", *INIT, "--pool-size", "20")
    assert code == 2 and "m4.large node holds 1 to 9 addresses" in err
    assert node.world.snapshot() == cloud_before  # refused before any change
    node.ok("init", *INIT, "--pool-size", "9")
    (eni,) = node.world.ours("aws-node")
    held = sorted(i["PrivateIpAddress"] for i in eni["PrivateIpAddresses"] if not i["Primary"])
    assert sorted(state.load(node.paths.pool).ips) == held
    node.ok("teardown")
    assert node.world.snapshot() == cloud_before


# Every mutating call init makes, failed with a lost answer (done, unanswered) or an error
# (not done); the command says so in one line, and running it again finishes the job.
INIT_STEPS = [
    "CreateSubnet",
    "AuthorizeSecurityGroupIngress",
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
]


@pytest.mark.parametrize("kind", ["lost", "InternalError"])
@pytest.mark.parametrize("action", INIT_STEPS)
def test_aws_init_fault_at_each_step_is_recovered_by_a_rerun(
    node: Node, action: str, kind: str
) -> None:
    cloud_before = node.world.snapshot()
    grow = action in ("AssignPrivateIpAddresses", "UnassignPrivateIpAddresses")
    if grow:  # these run on an ENI that exists: change its size
        node.ok("init", *INIT, "--pool-size", "40")
    size = "16" if action == "UnassignPrivateIpAddresses" else "64"
    node.world.proxy.inject(action, kind, times=99)
    code, _, err = node.run("init", *INIT, "--pool-size", size)
    assert code == 1 and action in err and len(err.strip().splitlines()) == 1, err
    node.world.proxy.faults.clear()
    node.ok("init", *INIT, "--pool-size", size)
    (eni,) = node.world.ours("aws-node")
    assert len(node.world.proxy.prefixes[eni["NetworkInterfaceId"]]) == int(size) // 16
    assert len(state.load(node.paths.pool).ips) == int(size)
    node.ok("teardown")
    assert node.world.snapshot() == cloud_before


TEARDOWN_STEPS = [
    "DetachNetworkInterface",
    "DeleteNetworkInterface",
    "RevokeSecurityGroupIngress",
    "DeleteSubnet",
]


@pytest.mark.parametrize("kind", ["lost", "InternalError"])
@pytest.mark.parametrize("action", TEARDOWN_STEPS)
def test_aws_teardown_fault_at_each_step_is_recovered_by_a_rerun(
    node: Node, action: str, kind: str
) -> None:
    cloud_before = node.world.snapshot()
    node.ok("init", *INIT, "--pool-size", "20")
    node.world.proxy.inject(action, kind, times=99)
    code, _, err = node.run("teardown")
    assert code == 1 and "AWS teardown incomplete" in err, err
    assert node.paths.pool.exists()  # what is left stays recorded
    node.world.proxy.faults.clear()
    node.ok("teardown")
    assert node.world.snapshot() == cloud_before


def test_status_and_dry_run_teardown_never_load_the_sdk(node: Node) -> None:
    node.ok("init", *INIT, "--pool-size", "16")
    for argv in (["status", "--no-cloud"], ["teardown", "--dry-run"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "cocoon_net",
             *run_args(node.paths, *argv, netns=node.ns.name)],
            capture_output=True, text=True, env={**os.environ, **node.env}, timeout=60,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "cocoon_net.platform.aws" in proc.stderr or argv[0] == "status"
        assert "botocore" not in proc.stderr
    node.ok("teardown")


def test_aws_adopt_changes_nothing_and_teardown_finds_ours_by_tag(node: Node) -> None:
    foreign = node.world.add_foreign_eni()
    cloud_before = node.world.snapshot()
    node.ok("init", *INIT, "--pool-size", "40")
    made = sorted(state.load(node.paths.pool).ips)
    node.paths.pool.unlink()  # pool.json lost: adopt registers the node again
    calls = len(node.world.proxy.calls)
    out = node.ok("adopt", *INIT, "--pool-size", "40")
    assert "40 IPs registered on 10.0.100.0/24 (aws, cloud preserved)" in out
    assert all(c.startswith("Describe") for c in node.world.proxy.calls[calls:])
    pool = state.load(node.paths.pool)
    assert sorted(pool.ips) == made
    assert foreign not in pool.eni_ids  # it holds no address of the VM subnet
    # adopt recorded neither the subnet nor the rule: teardown goes by their tag and mark
    node.ok("teardown")
    assert node.world.snapshot() == cloud_before
