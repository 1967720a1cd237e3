"""Volcengine init/teardown against the emulator, with hot-plugged ENIs as veth links.

The platform runs inside a test namespace (Netns.call); the emulator listens in the same
namespace and creates a link with the ENI's MAC when an attach completes, as the
hypervisor's hot-plug would, and deletes it on detach.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.errors import CloudError, CloudQuotaError
from cocoon_net.platform import volcengine
from cocoon_net.platform.base import NodeRequest, ProvisionResult
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.platform.volc_api import PollPolicy
from cocoon_net.state import PoolState
from tests.emulators.volcengine import VolcEmulator, eni_link_name
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

NODE = "node-a"
SUBNET = IPv4Network("172.20.100.0/24")
FAST_RETRY = RetryPolicy(attempts=4, deadline=20.0, base_delay=0.01, max_delay=0.05)
FAST_POLL = PollPolicy(timeout=20.0, first=0.02, interval=0.1, typical_scale=0.01)


class Cloud:
    def __init__(self, ns: Netns, emu: VolcEmulator, pool_file: Path) -> None:
        self.ns, self.emu, self.pool_file = ns, emu, pool_file

    def recorded(self) -> dict[str, Any]:
        return json.loads(self.pool_file.read_text()) if self.pool_file.exists() else {}

    def init(self, pool_size: int = 140, **options: str) -> ProvisionResult:
        result: ProvisionResult = self.ns.call(
            _provision, self.emu.environ(), self.pool_file, pool_size, options
        )
        return result

    def teardown(self) -> None:
        self.ns.call(_teardown, self.emu.environ(), self.pool_file)

    def ours(self) -> list[Any]:
        return [e for e in self.emu.enis.values() if e.tags.get(volcengine.TAG_NODE) == NODE]


def _recorder(pool_file: Path) -> Any:
    def record(mapping: Mapping[str, Any]) -> None:
        cloud = json.loads(pool_file.read_text()) if pool_file.exists() else {}
        cloud.update(mapping)  # the CLI merges the same way into pool.json["cloud"]
        pool_file.write_text(json.dumps(cloud))

    return record


def _platform(environ: dict[str, str]) -> volcengine.VolcenginePlatform:
    return volcengine.create(environ, retry=FAST_RETRY, poll=FAST_POLL)


def _provision(
    environ: dict[str, str], pool_file: Path, pool_size: int, options: dict[str, str]
) -> ProvisionResult:
    cloud = json.loads(pool_file.read_text()) if pool_file.exists() else {}
    request = NodeRequest(
        node_name=NODE,
        subnet=SUBNET,
        gateway=SUBNET.network_address + 1,
        pool_size=pool_size,
        primary_nic="eth0",
        cloud=cloud,
        options=options,
    )
    return _platform(environ).provision(request, _recorder(pool_file))


def _teardown(environ: dict[str, str], pool_file: Path) -> None:
    cloud = json.loads(pool_file.read_text()) if pool_file.exists() else {}
    state = PoolState(
        platform="volcengine",
        node_name=NODE,
        subnet=str(SUBNET),
        gateway=str(SUBNET.network_address + 1),
        cloud=cloud,
    )
    _platform(environ).teardown(state, _recorder(pool_file))


@pytest.fixture
def cloud(make_netns: Any, tmp_path: Path) -> Iterator[Cloud]:
    ns = make_netns("volc")
    emu = VolcEmulator()
    emu.hotplug_into(ns.name)
    emu.start(netns=ns.name)
    try:
        yield Cloud(ns, emu, tmp_path / "cloud.json")
    finally:
        emu.stop()


def _assigned(enis: list[Any]) -> list[IPv4Address]:
    return sorted(ip for eni in enis for ip in eni.secondary)


def test_init_creates_subnet_enis_and_exactly_the_assigned_ips(cloud: Cloud) -> None:
    before = cloud.emu.snapshot()
    result = cloud.init()
    ours = cloud.ours()
    assert len(ours) == 7
    assert all(e.status == "InUse" and e.device_id == cloud.emu.instance_id for e in ours)
    assert result.ips == _assigned(ours)
    assert len(result.ips) == 140 and all(ip in SUBNET for ip in result.ips)
    assert sorted(result.eni_ids) == sorted(e.id for e in ours)
    # Interfaces were found by MAC and brought up, whatever their names.
    assert sorted(result.secondary_nics) == sorted(eni_link_name(e.id) for e in ours)
    for name in result.secondary_nics:
        assert "UP" in cloud.ns.ip("-o", "link", "show", name)
    subnet = next(s for s in cloud.emu.subnets.values() if s.cidr == SUBNET)
    assert result.subnet_id == subnet.id and subnet.status == "Available"
    assert result.vpc_cidrs == [cloud.emu.vpc_cidr]
    assert [r["CidrIp"] for r in cloud.emu.rules[cloud.emu.default_sg]] == [str(cloud.emu.vpc_cidr)]
    recorded = cloud.recorded()
    assert recorded["subnet"] == {"id": subnet.id, "cidr": str(SUBNET), "created": True}
    assert recorded["securityGroup"]["ruleCreated"] is True
    by_id = {e["id"]: e for e in recorded["enis"]}
    for eni in ours:
        assert by_id[eni.id]["mac"] == eni.mac
        assert by_id[eni.id]["ips"] == [str(ip) for ip in sorted(eni.secondary)]
    assert result.cloud["enis"] == recorded["enis"]

    cloud.teardown()
    assert cloud.emu.snapshot() == before
    assert cloud.recorded()["enis"] == [] and cloud.recorded()["subnet"] == {}


def test_init_twice_changes_nothing(cloud: Cloud) -> None:
    first = cloud.init(pool_size=45)
    snapshot = cloud.emu.snapshot()
    calls = len(cloud.emu.calls)
    second = cloud.init(pool_size=45)
    assert cloud.emu.snapshot() == snapshot
    assert second.ips == first.ips and sorted(second.eni_ids) == sorted(first.eni_ids)
    made = [c for c in cloud.emu.calls[calls:] if not c.startswith("Describe")]
    assert made == []


def test_foreign_eni_is_never_touched(cloud: Cloud) -> None:
    foreign = cloud.emu.add_foreign_eni(name=f"{NODE}-eni-1")  # even with our name
    loose = cloud.emu.add_foreign_eni(attach=False)
    before = cloud.emu.snapshot()
    result = cloud.init(pool_size=25)
    assert foreign.id not in result.eni_ids and loose.id not in result.eni_ids
    assert not set(result.ips) & set(foreign.secondary)
    assert cloud.emu.snapshot()["enis"][foreign.id] == before["enis"][foreign.id]
    cloud.teardown()
    assert cloud.emu.snapshot() == before


def test_pool_size_50_yields_50_addresses_on_3_enis(cloud: Cloud) -> None:
    result = cloud.init(pool_size=50)
    assert len(result.ips) == 50
    assert sorted(len(e.secondary) for e in cloud.ours()) == [10, 20, 20]
    # Shrinking the pool releases addresses instead of keeping them unused.
    smaller = cloud.init(pool_size=30)
    assert len(smaller.ips) == 30 and set(smaller.ips) <= set(result.ips)
    assert len(_assigned(cloud.ours())) == 30


def test_an_existing_subnet_and_rule_are_reused_and_kept(cloud: Cloud) -> None:
    emu = cloud.emu
    subnet = emu._add_subnet("shared", SUBNET, {}, ready=True)
    emu.rules[emu.other_sg].append(
        {
            "Direction": "ingress",
            "Protocol": "all",
            "PortStart": -1,
            "PortEnd": -1,
            "CidrIp": "0.0.0.0/0",
            "Policy": "accept",
            "Priority": 1,
            "Description": "",
        }
    )
    before = emu.snapshot()
    result = cloud.init(pool_size=20, security_group=emu.other_sg)
    assert result.subnet_id == subnet.id
    assert all(e.security_groups == [emu.other_sg] for e in cloud.ours())
    assert cloud.recorded()["subnet"]["created"] is False
    assert cloud.recorded()["securityGroup"] == {
        "id": emu.other_sg,
        "cidr": str(emu.vpc_cidr),
        "ruleCreated": False,
    }
    cloud.teardown()
    assert emu.snapshot() == before


# (action, code, times, after_commit, expected error or None for success after retries)
FAULTS = [
    ("DescribeSubnets", "AccountFlowLimitExceeded", 2, False, None),
    ("CreateSubnet", "InternalError", 1, True, None),
    ("CreateSubnet", "InternalError", 99, False, CloudError),
    # Made, but every answer lost: only the tag tells the rerun and teardown it is ours.
    ("CreateSubnet", "InternalError", 99, True, CloudError),
    ("CreateNetworkInterface", "InternalError", 99, True, CloudError),
    ("AuthorizeSecurityGroupIngress", "ServiceUnavailable", 1, True, None),
    ("CreateNetworkInterface", "InternalError", 1, True, None),
    ("CreateNetworkInterface", "QuotaExceeded.NetworkInterface", 1, False, CloudQuotaError),
    ("AttachNetworkInterface", "InternalError", 2, False, None),
    ("AttachNetworkInterface", "InternalError", 99, False, CloudError),
    # The attach happened, its answer was lost: the retry finds it Attaching, and the
    # ENI's state (not the answer) decides.
    ("AttachNetworkInterface", "InternalError", 1, True, None),
    ("AttachNetworkInterface", "InternalError", 3, True, None),
    ("CreateNetworkInterface", "InsufficientIpInSubnet", 1, False, CloudQuotaError),
    ("DescribeNetworkInterfaces", "AccountFlowLimitExceeded", 3, False, None),
    ("DescribeVpcAttributes", "InternalError", 99, False, CloudError),
]


@pytest.mark.parametrize(("action", "code", "times", "after_commit", "error"), FAULTS)
def test_each_init_fault_is_retried_or_fails_clearly_and_rerun_and_teardown_recover(
    cloud: Cloud,
    action: str,
    code: str,
    times: int,
    after_commit: bool,
    error: type[Exception] | None,
) -> None:
    before = cloud.emu.snapshot()
    cloud.emu.inject(action, code, times=times, after_commit=after_commit)
    if error is None:
        result = cloud.init(pool_size=45)
    else:
        with pytest.raises(error, match=code):
            cloud.init(pool_size=45)
        cloud.emu.faults.clear()
        result = cloud.init(pool_size=45)
    ours = cloud.ours()
    assert len(ours) == 3  # a retried create never made a second ENI
    assert result.ips == _assigned(ours) and len(result.ips) == 45
    cloud.teardown()
    assert cloud.emu.snapshot() == before


def test_failed_and_slow_attaches(cloud: Cloud) -> None:
    before = cloud.emu.snapshot()
    cloud.emu.failing_attaches = 1
    with pytest.raises(CloudError, match="Available again"):
        cloud.init(pool_size=45)
    cloud.emu.attach_delay = 1.0
    result = cloud.init(pool_size=45)
    assert len(result.ips) == 45
    cloud.teardown()
    assert cloud.emu.snapshot() == before


@pytest.mark.parametrize(
    "action",
    ["UnassignPrivateIpAddresses", "DetachNetworkInterface", "DeleteNetworkInterface"],
)
def test_teardown_survives_lost_answers(cloud: Cloud, action: str) -> None:
    """The change happened, its answer was lost; the retry's refusal ("is Detaching",
    "not found") is read as the state it reports."""
    before = cloud.emu.snapshot()
    cloud.init(pool_size=25)
    cloud.emu.inject(action, "InternalError", times=1, after_commit=True)
    cloud.teardown()
    assert cloud.emu.snapshot() == before


def test_quota_reached_by_another_eni_releases_what_it_made_and_a_smaller_rerun_completes(
    cloud: Cloud,
) -> None:
    cloud.emu.add_foreign_eni()  # the instance's 8th ENI: 7 slots no longer fit
    before = cloud.emu.snapshot()
    with pytest.raises(CloudQuotaError, match="takes no more ENIs") as info:
        cloud.init(pool_size=140)
    assert len(str(info.value)) < 300 and "lower --pool-size" in str(info.value)
    ours = cloud.ours()
    assert len(ours) == 6 and all(e.status == "InUse" for e in ours)  # the 7th was deleted
    assert len(cloud.recorded()["enis"]) == 6
    result = cloud.init(pool_size=120)
    assert len(result.ips) == 120 and len(cloud.ours()) == 6
    cloud.teardown()
    assert cloud.emu.snapshot() == before


def test_a_smaller_pool_releases_the_enis_it_no_longer_needs(cloud: Cloud) -> None:
    before = cloud.emu.snapshot()
    cloud.init(pool_size=60)
    result = cloud.init(pool_size=20)
    assert len(result.ips) == 20 and [e.name for e in cloud.ours()] == [f"{NODE}-eni-1"]
    assert [e["name"] for e in cloud.recorded()["enis"]] == [f"{NODE}-eni-1"]
    cloud.teardown()
    assert cloud.emu.snapshot() == before


@pytest.mark.parametrize(
    "action",
    [
        "UnassignPrivateIpAddresses",
        "DetachNetworkInterface",
        "DeleteNetworkInterface",
        "RevokeSecurityGroupIngress",
        "DeleteSubnet",
    ],
)
def test_teardown_reports_what_remains_and_a_rerun_finishes(cloud: Cloud, action: str) -> None:
    before = cloud.emu.snapshot()
    cloud.init(pool_size=25)
    cloud.emu.inject(action, "InternalError", times=99)
    with pytest.raises(CloudError, match="teardown incomplete"):
        cloud.teardown()
    cloud.emu.faults.clear()
    cloud.teardown()
    assert cloud.emu.snapshot() == before


def test_status_lists_our_enis_and_the_subnet(cloud: Cloud) -> None:
    cloud.emu.add_foreign_eni()
    result = cloud.init(pool_size=25)
    lines = cloud.ns.call(_status, cloud.emu.environ(), cloud.pool_file)
    text = "\n".join(f"{label}: {value}" for label, value in lines)
    assert f"SubnetID: {result.subnet_id} {SUBNET} (Available" in text
    assert "ENIs: 2" in text
    for eni in cloud.ours():
        assert f"{eni.id}: {eni.name} mac {eni.mac} if {eni_link_name(eni.id)} InUse" in text
        assert f"{len(eni.secondary)} IPs" in text


def test_adopt_pools_the_secondary_ips_the_vpc_routes_here(cloud: Cloud) -> None:
    made = cloud.init(pool_size=45)
    calls = len(cloud.emu.calls)
    adopted = cloud.ns.call(_adopt, cloud.emu.environ(), 253)
    assert adopted.ips == made.ips  # the ENIs' addresses, not sequential guesses
    assert sorted(adopted.secondary_nics) == sorted(made.secondary_nics)
    assert all(c.startswith("Describe") for c in cloud.emu.calls[calls:])
    assert len(cloud.ns.call(_adopt, cloud.emu.environ(), 10).ips) == 10


def _status(environ: dict[str, str], pool_file: Path) -> list[tuple[str, str]]:
    state = PoolState(
        platform="volcengine",
        node_name=NODE,
        subnet=str(SUBNET),
        gateway=str(SUBNET.network_address + 1),
        cloud=json.loads(pool_file.read_text()) if pool_file.exists() else {},
    )
    return [(line.label.strip(), line.value) for line in _platform(environ).status(state)]


def _adopt(environ: dict[str, str], pool_size: int) -> ProvisionResult:
    request = NodeRequest(
        node_name=NODE,
        subnet=SUBNET,
        gateway=SUBNET.network_address + 1,
        pool_size=pool_size,
        primary_nic="eth0",
    )
    return _platform(environ).adopt(request)


# --- what the Go tool left: ENIs named <node>-eni-<n>, untagged, attached here ----------------


class GoNode:
    """A node as the Go tool's init leaves it: its subnet `<node>-vms` (untagged), seven
    untagged ENIs `<node>-eni-1..7` attached here with 20 IPs each, and a pool.json without a
    cloud record. Next to them, ENIs that look like ours but are not: our name attached to
    another instance, our name outside the node's subnet, our name with someone's tag."""

    def __init__(self, cloud: Cloud, *, elsewhere: bool = True) -> None:
        emu = cloud.emu
        self.subnet = emu.add_subnet(f"{NODE}-vms", str(SUBNET))
        self.decoys = [
            emu.add_foreign_eni(name=f"{NODE}-eni-2"),  # the default subnet
            emu.add_foreign_eni(
                name=f"{NODE}-eni-3", subnet_id=self.subnet.id, tags={"owner": "ops"}
            ),
        ]
        if elsewhere:  # (adopt refuses a subnet whose addresses another instance holds)
            self.decoys.append(
                emu.add_foreign_eni(name=f"{NODE}-eni-1", subnet_id=self.subnet.id, device_id="i-x")
            )
        self.initial = emu.snapshot()  # what teardown must come back to
        self.enis = emu.add_go_enis(NODE, self.subnet.id)
        self.left = emu.snapshot()

    def ids(self) -> list[str]:
        return sorted(eni.id for eni in self.enis)


def _recorded_ids(cloud: Cloud) -> list[str]:
    return sorted(e["id"] for e in cloud.recorded().get("enis") or ())


def _tagged_ours(cloud: Cloud) -> list[str]:
    return sorted(e.id for e in cloud.ours())


def test_go_made_enis_are_found_tagged_and_torn_down(cloud: Cloud) -> None:
    go = GoNode(cloud)
    lines = cloud.ns.call(_status, cloud.emu.environ(), cloud.pool_file)
    text = "\n".join(f"{label}: {value}" for label, value in lines)
    assert "ENIs: 7" in text
    assert text.count("(made by the Go tool; init or teardown tags it as ours)") == 7
    assert all(decoy.id not in text for decoy in go.decoys)
    assert cloud.emu.snapshot() == go.left  # status changes nothing

    cloud.teardown()
    assert cloud.emu.snapshot() == go.initial
    calls = cloud.emu.calls
    assert calls.index("TagResources") < calls.index("UnassignPrivateIpAddresses")
    assert cloud.recorded()["enis"] == []


@pytest.mark.parametrize(
    ("action", "times"),
    [("TagResources", 1), ("TagResources", 99), ("DetachNetworkInterface", 99)],
)
def test_go_made_enis_teardown_faults(cloud: Cloud, action: str, times: int) -> None:
    go = GoNode(cloud)
    cloud.emu.inject(action, "InternalError", times=times)
    if times == 1:  # retried: one run does it all
        cloud.teardown()
        assert cloud.emu.snapshot() == go.initial
        return
    with pytest.raises(CloudError, match="teardown incomplete") as info:
        cloud.teardown()
    assert "\n" not in str(info.value)
    # Whatever failed, pool.json now names every Go-made ENI as ours, and none was changed
    # before it carried our tag.
    assert _recorded_ids(cloud) == go.ids()
    assert all(e["goTool"] for e in cloud.recorded()["enis"])
    if action == "TagResources":
        assert "tagging ENIs" in str(info.value)
        assert cloud.emu.snapshot() == go.left
    else:
        assert _tagged_ours(cloud) == go.ids()
    cloud.emu.faults.clear()
    cloud.teardown()
    assert cloud.emu.snapshot() == go.initial


def test_go_made_enis_detached_then_record_lost_are_found_by_their_tag(cloud: Cloud) -> None:
    go = GoNode(cloud)
    cloud.emu.inject("DeleteNetworkInterface", "InternalError", times=99)
    with pytest.raises(CloudError, match="teardown incomplete"):
        cloud.teardown()
    assert all(cloud.emu.enis[i].status == "Available" for i in go.ids())  # detached
    cloud.pool_file.unlink()  # pool.json lost: only the tag still says they are ours
    cloud.emu.faults.clear()
    cloud.teardown()
    assert cloud.emu.snapshot() == go.initial


def test_init_on_a_go_node_reuses_and_tags_its_enis(cloud: Cloud) -> None:
    go = GoNode(cloud)
    go_ips = sorted(ip for eni in go.enis for ip in eni.secondary)
    cloud.emu.inject("TagResources", "InternalError", times=99)
    with pytest.raises(CloudError, match="TagResources"):
        cloud.init(pool_size=140)
    # recorded before the tag was tried, and nothing changed in the cloud's networking
    assert _recorded_ids(cloud) == go.ids()
    assert cloud.emu.snapshot()["enis"] == go.left["enis"]
    cloud.emu.faults.clear()
    result = cloud.init(pool_size=140)
    assert "CreateNetworkInterface" not in cloud.emu.calls  # no second set hits the quota
    assert sorted(result.eni_ids) == go.ids() == _tagged_ours(cloud)
    assert result.ips == go_ips
    assert cloud.recorded()["subnet"]["created"] is False  # the Go tool's subnet stays
    cloud.teardown()
    assert cloud.emu.snapshot() == go.initial


def test_adopt_on_a_go_node_records_its_enis_as_ours_without_cloud_changes(cloud: Cloud) -> None:
    go = GoNode(cloud, elsewhere=False)
    operator = go.decoys[1]  # attached here, in the subnet, tagged by its owner
    adopted = cloud.ns.call(_adopt, cloud.emu.environ(), 253)
    assert all(c.startswith("Describe") for c in cloud.emu.calls)
    assert len(adopted.ips) == 143
    assert sorted(adopted.eni_ids) == sorted([*go.ids(), operator.id])
    assert sorted(e["id"] for e in adopted.cloud["enis"]) == go.ids()
    assert all(e["goTool"] for e in adopted.cloud["enis"])
    assert adopted.cloud["adoptedEnis"] == [operator.id]
    _recorder(cloud.pool_file)(adopted.cloud)
    cloud.teardown()
    assert cloud.emu.snapshot() == go.initial


def _provision_with_default_polls(environ: dict[str, str]) -> ProvisionResult:
    request = NodeRequest(
        node_name=NODE,
        subnet=SUBNET,
        gateway=SUBNET.network_address + 1,
        pool_size=140,
        primary_nic="eth0",
    )
    platform = volcengine.create(environ, retry=FAST_RETRY)
    return platform.provision(request, lambda _mapping: None)


def test_a_7_eni_init_with_slow_attaches_makes_under_30_calls(cloud: Cloud) -> None:
    """Creates take 1 s and attaches 3 s, as on the real cloud: the waits poll all ENIs in
    one describe per round, first after the cloud's typical time."""
    cloud.emu.create_delay, cloud.emu.attach_delay = 1.0, 3.0
    result = cloud.ns.call(_provision_with_default_polls, cloud.emu.environ())
    assert len(result.ips) == 140
    assert len(cloud.emu.calls) < 30, cloud.emu.calls


def test_init_and_teardown_with_only_the_instance_roles_credentials(cloud: Cloud) -> None:
    """No keys anywhere: the instance role's temporary keys from the metadata server (after
    its session token) sign every call, and the API takes nothing else."""
    before = cloud.emu.snapshot()
    cloud.emu.use_instance_role("cocoon-node")
    environ = {k: v for k, v in cloud.emu.environ().items() if not k.startswith("VOLCENGINE_")}
    pool_size = 25
    result: ProvisionResult = cloud.ns.call(_provision, environ, cloud.pool_file, pool_size, {})
    assert len(result.ips) == pool_size
    assert cloud.emu.role_fetches >= 1 and cloud.emu.imds_tokens
    cloud.ns.call(_teardown, environ, cloud.pool_file)
    assert cloud.emu.snapshot() == before
