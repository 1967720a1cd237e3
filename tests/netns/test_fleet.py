"""A fleet booting at once: 20 nodes run `cocoon-net init --subnet auto` at the same time.

Each node is its own network namespace and its own instance of one emulated cloud, with its
own metadata address (a listener in its namespace, as every VM reaches only its own). The
cloud is the only coordinator: it refuses an alias block another instance holds (GKE) and a
subnet that overlaps another (Volcengine, AWS). Every node must end with a different subnet and a
usable pool, and after 20 teardowns the cloud must be as it was before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cocoon_net import state
from tests.emulators.aws import AwsInstance, AwsWorld, MotoServer, link_name
from tests.emulators.gce import GceEmulator
from tests.emulators.volcengine import VolcEmulator, eni_link_name
from tests.support.cli import NodePaths, run_args
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

NODES = 20
FLEET = IPv4Network("172.20.0.0/16")


def _node(make_netns: Callable[[str], Netns], mac: str) -> Netns:
    ns = make_netns("fleet")
    ns.ip("link", "add", "ens4", "address", mac, "type", "veth", "peer", "name", "ens4p")
    ns.ip("link", "set", "ens4", "up")
    ns.ip("link", "set", "ens4p", "up")
    ns.ip("addr", "add", "192.0.2.10/24", "dev", "ens4")
    ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "ens4")
    return ns


def _all_at_once(runs: Sequence[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Start every command, then wait for all: returns their stderr; each must succeed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_NET_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cocoon_net", *argv],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, env in runs
    ]
    errors = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{out}\n{err}"
        errors.append(err)
    return errors


def _init_all(nodes: Sequence[tuple[Netns, dict[str, str], NodePaths]], init: list[str]) -> None:
    """Node i is node-<i>, with a pool of 10: every init at once."""
    pool = ["--pool-size", "10"]
    runs = [
        (run_args(p, "init", *init, *pool, "--node-name", f"node-{i}", netns=ns.name), env)
        for i, (ns, env, p) in enumerate(nodes)
    ]
    _all_at_once(runs)


def _claimed(nodes: Sequence[tuple[Netns, dict[str, str], NodePaths]]) -> list[IPv4Network]:
    subnets = [state.load(paths.pool).network for _, _, paths in nodes]
    assert len(set(subnets)) == len(nodes)
    assert all(a == b or not a.overlaps(b) for a in subnets for b in subnets)
    for (ns, _, paths), subnet in zip(nodes, subnets, strict=True):
        pool = state.load(paths.pool)
        assert len(pool.ips) == 10 and all(ip in subnet for ip in pool.pool_ips)
        # the pool is served from this node's bridge at the claimed subnet's gateway
        assert f"inet {subnet.network_address + 1}/{subnet.prefixlen}" in ns.ip(
            "-o", "addr", "show", "cni0"
        )
    return subnets


def test_gke_fleet_claims_20_distinct_blocks_and_leaves_nothing(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    gce = GceEmulator().start()
    try:
        nodes = []
        for i in range(NODES):
            mac = f"42:01:0a:80:01:{i:02x}"
            ns = _node(make_netns, mac)
            env = gce.add_node(f"node-{i}", mac, netns=ns.name)
            env["COCOON_NET_GCE_AGENT_CONFIG"] = str(tmp_path / f"agent-{i}.cfg")
            nodes.append((ns, env, NodePaths(tmp_path / f"n{i}")))
        before = gce.snapshot()
        _init_all(nodes, ["--platform", "gke", "--subnet", "auto", "--range-cidr", str(FLEET)])
        subnets = _claimed(nodes)
        assert all(s.subnet_of(FLEET) and s.prefixlen == 24 for s in subnets)
        held = {
            path.rsplit("/", 1)[-1]: [IPv4Network(a["ipCidrRange"]) for a in nics[0]]
            for path, nics in gce.snapshot()["aliases"].items()
            if "/node-" in path
        }
        assert held == {f"node-{i}": [subnets[i]] for i in range(NODES)}
        _all_at_once([(run_args(p, "teardown", netns=ns.name), env) for ns, env, p in nodes])
        # the last node's teardown removed the fleet range too
        assert gce.snapshot() == before
    finally:
        gce.stop()


def test_volcengine_fleet_creates_20_distinct_subnets_and_leaves_nothing(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    emu = VolcEmulator()
    emu.start()
    try:
        nodes = []
        for i in range(NODES):
            ns = make_netns("fleet")
            instance_id, env = emu.add_node(netns=ns.name)
            ns.ip("link", "add", "eth0", "address", emu.nodes[instance_id].primary.mac,
                  "type", "veth", "peer", "name", "eth0p")  # fmt: skip
            ns.ip("link", "set", "eth0", "up")
            env["GCE_METADATA_HOST"] = "127.0.0.1:9"
            nodes.append((ns, env, NodePaths(tmp_path / f"n{i}")))
        before = emu.snapshot()
        _init_all(nodes, ["--platform", "volcengine", "--subnet", "auto", "--primary-nic", "eth0"])
        subnets = _claimed(nodes)
        assert all(s.subnet_of(emu.vpc_cidr) for s in subnets)
        for (ns, _, paths), subnet in zip(nodes, subnets, strict=True):
            pool = state.load(paths.pool)
            # the VPC routes the pool to this node: its ENI holds exactly these addresses
            enis = [emu.enis[eni_id] for eni_id in pool.eni_ids]
            assert sorted(ip for e in enis for ip in e.secondary) == sorted(pool.pool_ips)
            assert all(emu.subnets[e.subnet_id].cidr == subnet for e in enis)
            for eni in enis:
                assert "UP" in ns.ip("-o", "link", "show", eni_link_name(eni.id))
        _all_at_once([(run_args(p, "teardown", netns=ns.name), env) for ns, env, p in nodes])
        assert emu.snapshot() == before
    finally:
        emu.stop()


def test_aws_fleet_creates_20_distinct_subnets_and_leaves_nothing(
    make_netns: Callable[[str], Netns], moto_server: MotoServer, tmp_path: Path
) -> None:
    namespaces = [make_netns("fleet") for _ in range(NODES)]
    world = AwsWorld(moto_server, namespaces[0].name)
    instances: list[AwsInstance] = [world]
    try:
        instances += [world.add_instance(ns.name) for ns in namespaces[1:]]
        nodes = []
        for i, (ns, instance) in enumerate(zip(namespaces, instances, strict=True)):
            ns.ip("link", "add", "eth0", "address", instance.mac, "type", "veth",
                  "peer", "name", "eth0p")  # fmt: skip
            ns.ip("link", "set", "eth0", "up")
            nodes.append((ns, instance.environ(), NodePaths(tmp_path / f"n{i}")))
        before = world.snapshot()
        _init_all(nodes, ["--platform", "aws", "--subnet", "auto", "--primary-nic", "eth0"])
        subnets = _claimed(nodes)
        assert all(s.subnet_of(IPv4Network(AwsWorld.VPC_CIDR)) for s in subnets)
        cidrs = {s["SubnetId"]: s["CidrBlock"] for s in world.client.describe_subnets()["Subnets"]}
        for i, ((ns, _, paths), subnet) in enumerate(zip(nodes, subnets, strict=True)):
            pool = state.load(paths.pool)
            # the VPC routes the pool to this node: its ENI, in its subnet, holds the addresses
            (eni,) = world.ours(f"node-{i}")
            assert pool.eni_ids == [eni["NetworkInterfaceId"]]
            assert IPv4Network(cidrs[eni["SubnetId"]]) == subnet
            assert pool.cloud["subnet"] == {
                "id": eni["SubnetId"], "cidr": str(subnet), "created": True
            }  # fmt: skip
            assert "UP" in ns.ip("-o", "link", "show", link_name(eni["NetworkInterfaceId"]))
        _all_at_once([(run_args(p, "teardown", netns=ns.name), env) for ns, env, p in nodes])
        assert world.snapshot() == before
    finally:
        for instance in instances:
            instance.stop()
