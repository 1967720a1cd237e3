"""--subnet auto on GKE: nodes claim blocks of one fleet range, the cloud keeps them apart.

Every node is its own instance in one emulated project, with its own metadata server (each
VM sees only its own); the Compute API behind them is one cloud under one lock, so two nodes
adding the same block at once end with one holding it and the other refused with
IP_IN_USE_BY_ANOTHER_RESOURCE, as Compute does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.errors import UsageError
from cocoon_net.platform.base import NodeRequest
from cocoon_net.platform.gke import GkePlatform
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.state import PoolState
from tests.emulators import Fault
from tests.emulators.gce import GceEmulator

FLEET = "172.20.0.0/16"
AUTO = IPv4Network("0.0.0.0/24")  # what the CLI passes for --subnet auto: only the size counts


class FleetNode:
    def __init__(self, gce: GceEmulator, tmp_path: Path, name: str) -> None:
        self.name = name
        self.cloud: dict[str, Any] = {}
        self.subnet: IPv4Network | None = None
        mac = f"42:01:0a:80:{len(name):02x}:{sum(map(ord, name)) % 256:02x}"
        self.environ = {
            **gce.add_node(name, mac),
            "COCOON_NET_GCE_AGENT_CONFIG": str(tmp_path / f"{name}.cfg"),
        }

    def platform(self) -> GkePlatform:
        return GkePlatform(
            self.environ, timeout=2.0, retry=RetryPolicy(attempts=4, base_delay=0.01)
        )

    def record(self, mapping: Any) -> None:
        self.cloud.update(json.loads(json.dumps(dict(mapping))))

    def request(self, subnet: IPv4Network, **options: str) -> NodeRequest:
        return NodeRequest(
            node_name=self.name,
            subnet=subnet,
            gateway=subnet.network_address + 1,
            pool_size=10,
            primary_nic="cnt-nonic0",
            cloud=dict(self.cloud),
            options=options,
        )

    def init(self, **options: str) -> IPv4Network:
        """What lifecycle does: claim, then provision the claimed block."""
        platform = self.platform()
        self.subnet = platform.claim_subnet(self.request(AUTO, **options), self.record)
        result = platform.provision(self.request(self.subnet, **options), self.record)
        self.cloud.update(result.cloud)
        return self.subnet

    def teardown(self) -> list[str]:
        assert self.subnet is not None
        state = PoolState(
            platform="gke",
            node_name=self.name,
            subnet=str(self.subnet),
            gateway=str(self.subnet.network_address + 1),
            alias_range_name="cocoon-pods",
            cloud=dict(self.cloud),
        )
        plan = self.platform().plan_teardown(state)
        self.platform().teardown(state, self.record)
        return plan


def test_first_node_creates_the_range_others_reuse_it_last_removes_it(
    gce: GceEmulator, tmp_path: Path
) -> None:
    before = gce.snapshot()
    nodes = [FleetNode(gce, tmp_path, f"node-{i}") for i in range(1, 4)]
    before = gce.snapshot()
    claimed = [node.init(range_cidr=FLEET) for node in nodes]
    assert claimed == [IPv4Network(f"172.20.{i}.0/24") for i in range(3)]
    assert gce.subnet["secondaryIpRanges"] == [{"rangeName": "cocoon-pods", "ipCidrRange": FLEET}]
    # a re-run claims nothing new: the block nic0 holds is the node's
    assert nodes[1].init(range_cidr=FLEET) == claimed[1]
    # without --range-cidr the existing range is used; a different one is refused
    assert nodes[2].init() == claimed[2]
    with pytest.raises(UsageError, match="differs from the existing range"):
        FleetNode(gce, tmp_path, "node-x").init(range_cidr="172.21.0.0/16")
    # the listing told nodes 2 and 3 what was held: not one add was refused
    assert gce.state.list_calls >= 2
    assert not [op for op in gce.state.operations.values() if "error" in op]
    plan = nodes[0].teardown()
    assert any("remove range cocoon-pods=172.20.0.0/16 if no instance uses it" in p for p in plan)
    assert gce.subnet["secondaryIpRanges"] != []  # kept: two nodes still use it
    nodes[1].teardown()
    nodes[2].teardown()
    after = gce.snapshot()
    after["aliases"] = {p: a for p, a in after["aliases"].items() if "node-x" not in p}
    before["aliases"] = {p: a for p, a in before["aliases"].items() if "node-x" not in p}
    assert after == before


def test_nodes_racing_for_blocks_end_with_different_ones(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": FLEET}])
    # No permission to list instances: no node knows what the others hold, every one tries
    # the blocks in order and only the cloud's refusals keep them apart.
    gce.server.inject(Fault(status=403, count=1000, path="/aggregated/instances"))
    nodes = [FleetNode(gce, tmp_path, f"node-{i}") for i in range(12)]
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        claimed = list(pool.map(lambda node: node.init(), nodes))
    assert len(set(claimed)) == len(nodes)
    assert sorted(claimed) == [IPv4Network(f"172.20.{i}.0/24") for i in range(12)]
    refused = [op for op in gce.state.operations.values() if "error" in op]
    assert refused  # they did race: some adds were refused, and moved on
    held = [a for p, n in gce.snapshot()["aliases"].items() for a in n[0]]
    assert sorted(IPv4Network(a["ipCidrRange"]) for a in held) == sorted(claimed)


def test_auto_without_a_range_says_to_pass_range_cidr(gce: GceEmulator, tmp_path: Path) -> None:
    node = FleetNode(gce, tmp_path, "node-1")
    before = gce.snapshot()
    with pytest.raises(UsageError, match="pass --range-cidr"):
        node.init()
    assert gce.snapshot() == before


def test_subnet_inside_an_operator_range_points_to_adopt(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "operator", "ipCidrRange": "10.9.0.0/16"}])
    node = FleetNode(gce, tmp_path, "node-1")
    before = gce.snapshot()
    with pytest.raises(UsageError, match="run 'cocoon-net adopt'") as info:
        node.platform().provision(node.request(IPv4Network("10.9.3.0/24")), node.record)
    assert 'secondary range "operator" (10.9.0.0/16)' in str(info.value)
    assert gce.snapshot() == before
