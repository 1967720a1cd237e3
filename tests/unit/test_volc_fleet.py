"""--subnet auto on Volcengine: each node creates the first free block of the VPC as its subnet.

Every node is its own instance of one emulated VPC, reached through its own metadata path;
the API is one cloud under one lock, so two nodes creating the same block at once end with
one subnet and one InvalidSubnet.Conflict, and the loser moves on to the next block.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network

import pytest

from cocoon_net.errors import CloudQuotaError
from cocoon_net.platform import volcengine
from cocoon_net.platform.base import NodeRequest
from cocoon_net.platform.http import RetryPolicy
from tests.emulators.volcengine import VolcEmulator

FAST = RetryPolicy(attempts=3, deadline=5.0, base_delay=0.01, max_delay=0.02)
AUTO = IPv4Network("0.0.0.0/24")


@pytest.fixture
def emu() -> Iterator[VolcEmulator]:
    emulator = VolcEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


def claim(environ: dict[str, str], node: str, prefix: int = 24) -> IPv4Network:
    request = NodeRequest(
        node_name=node,
        subnet=IPv4Network(f"0.0.0.0/{prefix}"),
        gateway=AUTO.network_address + 1,
        pool_size=10,
        primary_nic="",
    )
    return volcengine.create(environ, retry=FAST).claim_subnet(request, lambda _m: None)


def test_racing_nodes_create_distinct_subnets_and_a_rerun_finds_its_own(emu: VolcEmulator) -> None:
    nodes = {f"node-{i}": emu.add_node()[1] for i in range(12)}
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        claimed = dict(zip(nodes, pool.map(lambda n: claim(nodes[n], n), nodes), strict=True))
    assert len(set(claimed.values())) == len(nodes)
    # the default subnet holds 172.20.0.0/24: the blocks after it, none skipped
    assert sorted(claimed.values()) == [IPv4Network(f"172.20.{i}.0/24") for i in range(1, 13)]
    conflicts = [c for c in emu.calls if c == "CreateSubnet"]
    assert len(conflicts) > len(nodes)  # they did race: some creates were refused
    by_tag = {s.tags.get(volcengine.TAG_NODE): s.cidr for s in emu.subnets.values() if s.tags}
    assert by_tag == claimed
    assert claim(nodes["node-3"], "node-3") == claimed["node-3"]  # the same on a re-run


def test_a_full_vpc_is_a_clear_quota_error(emu: VolcEmulator) -> None:
    _, environ = emu.add_node()
    emu.add_subnet("big", "172.20.128.0/17")
    with pytest.raises(CloudQuotaError, match="no free /17 left for --subnet auto"):
        claim(environ, "node-x", prefix=17)
