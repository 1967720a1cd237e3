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
from cocoon_net.errors import MAX_LINE
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


# --- --subnet auto ------------------------------------------------------------------------

AUTO = ["--node-name", "aws-node", "--platform", "aws", "--subnet", "auto", "--pool-size", "16"]


def _error_line(err: str) -> str:
    """The one error line of a failed command; every line it wrote is short."""
    lines = err.strip().splitlines()
    assert all(len(line) <= MAX_LINE for line in lines), max(lines, key=len)
    errors = [line for line in lines if line.startswith("cocoon-net: ")]
    assert len(errors) == 1, err
    return errors[0]


def _ours(world: AwsWorld) -> list[tuple[str, str, str]]:
    """(id, CIDR, zone) of every subnet tagged for the node."""
    answer = world.client.describe_subnets(
        Filters=[{"Name": "tag:cocoon-net:node", "Values": ["aws-node"]}]
    )
    return [(s["SubnetId"], s["CidrBlock"], s["AvailabilityZone"]) for s in answer["Subnets"]]


def _operator_subnet(world: AwsWorld, cidr: str) -> str:
    return str(
        world.client.create_subnet(
            VpcId=world.vpc_id, CidrBlock=cidr, AvailabilityZone=AwsWorld.ZONE
        )["Subnet"]["SubnetId"]
    )


def test_aws_auto_claims_the_first_free_block_rerun_changes_nothing_teardown_deletes_it(
    node: Node,
) -> None:
    operator = _operator_subnet(node.world, "10.0.1.0/24")
    cloud_before = node.world.snapshot()
    dry = node.ok("init", *AUTO, "--dry-run")
    assert "subnet:          auto (the first free /24, claimed by init)" in dry
    assert node.world.snapshot() == cloud_before and not node.paths.pool.exists()

    out = node.ok("init", *AUTO)
    assert "16 IPs provisioned on 10.0.2.0/24 (aws)" in out  # past eth0's and the operator's
    ((subnet_id, _, zone),) = _ours(node.world)
    assert zone == AwsWorld.ZONE  # the instance's zone, where its ENIs can use it
    pool = state.load(node.paths.pool)
    assert pool.cloud["subnetAuto"] is True
    assert pool.cloud["subnet"] == {"id": subnet_id, "cidr": "10.0.2.0/24", "created": True}
    (eni,) = node.world.ours("aws-node")
    assert eni["SubnetId"] == subnet_id and pool.eni_ids == [eni["NetworkInterfaceId"]]

    made = len(node.mutations())
    again = node.ok("init", *AUTO)
    assert "on 10.0.2.0/24 (aws)" in again and len(node.mutations()) == made
    assert "SubnetID" in node.ok("status") and subnet_id in node.ok("status")
    dry = node.ok("teardown", "--dry-run")
    assert f"delete subnet {subnet_id} (10.0.2.0/24)" in dry

    node.ok("teardown")
    assert node.world.snapshot() == cloud_before  # ours gone, the operator's kept
    assert operator in node.world.snapshot()["subnets"]


def test_aws_auto_loses_a_race_for_a_block_and_takes_the_next(node: Node) -> None:
    """Another node created 10.0.1.0/24 a moment ago and DescribeSubnets does not list it
    yet: EC2's InvalidSubnet.Conflict is the only word, and the next block is taken."""
    cloud_before = node.world.snapshot()
    other = _operator_subnet(node.world, "10.0.1.0/24")
    node.world.proxy.hide("DescribeSubnets", other, describes=99)
    code, out, err = node.run("init", *AUTO)
    assert code == 0, err
    assert "on 10.0.2.0/24 (aws)" in out
    taken = [ln for ln in err.splitlines() if "10.0.1.0/24 was taken meanwhile" in ln]
    assert taken and " info " in taken[0] and "InvalidSubnet.Conflict" in taken[0]
    node.ok("teardown")
    node.world.client.delete_subnet(SubnetId=other)
    assert node.world.snapshot() == cloud_before


@pytest.mark.parametrize("kind", ["lost", "InternalError"])
def test_aws_auto_create_subnet_fault_is_recovered_by_a_rerun(node: Node, kind: str) -> None:
    cloud_before = node.world.snapshot()
    node.world.proxy.inject("CreateSubnet", kind)
    # lost: made, unanswered, and not listed yet either, so the one look by tag misses it
    node.world.proxy.hide_new("CreateSubnet", describes=1)
    code, _, err = node.run("init", *AUTO)
    assert code == 1 and "EC2 CreateSubnet" in _error_line(err), err
    assert len(_ours(node.world)) == (1 if kind == "lost" else 0)
    node.ok("init", *AUTO)
    ((subnet_id, cidr, _),) = _ours(node.world)  # found again by its tag, never made twice
    assert cidr == "10.0.1.0/24" and state.load(node.paths.pool).cloud["subnet"]["id"] == subnet_id
    node.ok("teardown")
    assert node.world.snapshot() == cloud_before


@pytest.mark.parametrize("fault", ["lost", "not listed yet"])
def test_aws_auto_a_subnet_made_but_unseen_is_found_in_the_same_run(node: Node, fault: str) -> None:
    """A lost answer is followed by one look by tag; a subnet not listed yet is waited for
    by its ID. Either way the one subnet made is the node's: never a second."""
    cloud_before = node.world.snapshot()
    if fault == "lost":
        node.world.proxy.inject("CreateSubnet", "lost")
    else:
        node.world.proxy.hide_new("CreateSubnet", describes=3)
    node.ok("init", *AUTO)
    assert node.world.proxy.calls.count("CreateSubnet") == 1 and len(_ours(node.world)) == 1
    node.ok("teardown")
    assert node.world.snapshot() == cloud_before


def test_aws_auto_a_full_vpc_is_refused_in_one_line_with_nothing_made(node: Node) -> None:
    cloud_before = node.world.snapshot()
    code, _, err = node.run("init", *AUTO, "--subnet-prefix", "16")
    assert code == 1, err
    assert "has no free /16 left for --subnet auto" in _error_line(err)
    assert node.world.snapshot() == cloud_before


def test_aws_teardown_deletes_every_subnet_tagged_for_the_node_and_no_other(node: Node) -> None:
    """A claim whose record was lost (pool.json written by an older run, a crash) leaves a
    tagged subnet behind: teardown finds it by the tag. A --subnet that existed stays."""
    existing = _operator_subnet(node.world, "10.0.100.0/24")
    cloud_before = node.world.snapshot()
    node.ok("init", *INIT, "--pool-size", "16")
    assert state.load(node.paths.pool).cloud["subnet"]["created"] is False
    stray = node.world.client.create_subnet(
        VpcId=node.world.vpc_id,
        CidrBlock="10.0.7.0/24",
        AvailabilityZone=AwsWorld.ZONE,
        TagSpecifications=[
            {"ResourceType": "subnet", "Tags": [{"Key": "cocoon-net:node", "Value": "aws-node"}]}
        ],
    )["Subnet"]["SubnetId"]
    dry = node.ok("teardown", "--dry-run")
    assert "delete subnet" not in dry and "any other subnet tagged cocoon-net:node=aws-node" in dry
    # pool.json says the pool's subnet was there before init: that outweighs a tag
    mark = [{"Key": "cocoon-net:node", "Value": "aws-node"}]
    node.world.client.create_tags(Resources=[existing], Tags=mark)
    node.ok("teardown")
    subnets = node.world.snapshot()["subnets"]
    assert stray not in subnets and existing in subnets
    node.world.client.delete_tags(Resources=[existing], Tags=mark)
    assert node.world.snapshot() == cloud_before
