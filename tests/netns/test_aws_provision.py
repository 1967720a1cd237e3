"""AWS init/teardown against moto (behind the fault proxy) and the IMDSv2 emulator.

The platform runs inside a test namespace (Netns.call); the proxy and the IMDS emulator
listen in that namespace, and the proxy hot-plugs a veth link with the ENI's MAC on attach.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.errors import CloudError, CloudQuotaError, UsageError
from cocoon_net.platform import aws
from cocoon_net.platform.aws import plan
from cocoon_net.platform.base import NodeRequest, ProvisionResult
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.platform.volc_api import PollPolicy
from cocoon_net.state import PoolState
from tests.emulators.aws import AwsWorld, MotoServer, link_name
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

NODE = "node-a"
SUBNET = IPv4Network("10.0.100.0/24")
FAST_RETRY = RetryPolicy(attempts=4, deadline=20.0, base_delay=0.01, max_delay=0.05)
FAST_POLL = PollPolicy(timeout=20.0, first=0.02, interval=0.1)


class Cloud:
    def __init__(self, ns: Netns, world: AwsWorld, pool_file: Path) -> None:
        self.ns, self.world, self.pool_file = ns, world, pool_file

    def recorded(self) -> dict[str, Any]:
        return json.loads(self.pool_file.read_text()) if self.pool_file.exists() else {}

    def init(self, pool_size: int = 64, **options: str) -> ProvisionResult:
        result: ProvisionResult = self.ns.call(
            _provision, self.world.environ(), self.pool_file, pool_size, options
        )
        return result

    def teardown(self) -> None:
        self.ns.call(_teardown, self.world.environ(), self.pool_file)

    def ours(self) -> list[dict[str, Any]]:
        return self.world.ours(NODE)


def _recorder(pool_file: Path) -> Any:
    def record(mapping: Mapping[str, Any]) -> None:
        cloud = json.loads(pool_file.read_text()) if pool_file.exists() else {}
        cloud.update(mapping)  # the CLI merges the same way into pool.json["cloud"]
        pool_file.write_text(json.dumps(cloud))

    return record


def _platform(environ: dict[str, str]) -> aws.AwsPlatform:
    return aws.create(environ, retry=FAST_RETRY, poll=FAST_POLL)


def _request(pool_size: int, cloud: Mapping[str, Any], options: Mapping[str, str]) -> NodeRequest:
    return NodeRequest(
        node_name=NODE,
        subnet=SUBNET,
        gateway=SUBNET.network_address + 1,
        pool_size=pool_size,
        primary_nic="eth0",
        cloud=cloud,
        options=options,
    )


def _provision(
    environ: dict[str, str], pool_file: Path, pool_size: int, options: dict[str, str]
) -> ProvisionResult:
    cloud = json.loads(pool_file.read_text()) if pool_file.exists() else {}
    return _platform(environ).provision(_request(pool_size, cloud, options), _recorder(pool_file))


def _state(pool_file: Path) -> PoolState:
    return PoolState(
        platform="aws",
        node_name=NODE,
        subnet=str(SUBNET),
        gateway=str(SUBNET.network_address + 1),
        cloud=json.loads(pool_file.read_text()) if pool_file.exists() else {},
    )


def _teardown(environ: dict[str, str], pool_file: Path) -> None:
    _platform(environ).teardown(_state(pool_file), _recorder(pool_file))


def _world(request: pytest.FixtureRequest, make_netns: Any, moto: MotoServer) -> AwsWorld:
    ns = make_netns("aws")
    instance_type = getattr(request, "param", "c5.metal")
    world = AwsWorld(moto, ns.name, instance_type)
    request.addfinalizer(world.stop)
    ns.ip("link", "add", "eth0", "address", world.mac, "type", "veth", "peer", "name", "eth0p")
    world.ns = ns  # type: ignore[attr-defined]
    return world


@pytest.fixture
def cloud(
    request: pytest.FixtureRequest, make_netns: Any, moto_server: MotoServer, tmp_path: Path
) -> Cloud:
    world = _world(request, make_netns, moto_server)
    return Cloud(world.ns, world, tmp_path / "cloud.json")  # type: ignore[attr-defined]


def _addresses(raw: dict[str, Any], world: AwsWorld) -> list[IPv4Address]:
    ips = {
        IPv4Address(i["PrivateIpAddress"]) for i in raw["PrivateIpAddresses"] if not i["Primary"]
    }
    for net in world.proxy.prefixes.get(raw["NetworkInterfaceId"], []):
        ips.update(net)
    return sorted(ips)


def test_prefix_mode_init_creates_subnet_enis_prefixes_and_teardown_restores(cloud: Cloud) -> None:
    world = cloud.world
    before = world.snapshot()
    result = cloud.init(pool_size=100)  # 7 /28 prefixes on one ENI of a c5.metal
    ours = cloud.ours()
    assert len(ours) == 1
    eni = ours[0]
    assert eni["Attachment"]["InstanceId"] == world.instance_id
    assert eni["SourceDestCheck"] is True  # left on: each address leaves by its own ENI
    prefixes = world.proxy.prefixes[eni["NetworkInterfaceId"]]
    assert len(prefixes) == 7 and all(p.prefixlen == 28 and p.subnet_of(SUBNET) for p in prefixes)
    assert [i for i in eni["PrivateIpAddresses"] if not i["Primary"]] == []
    assert result.ips == _addresses(eni, world)[:100] and len(result.ips) == 100
    assert result.secondary_nics == [link_name(eni["NetworkInterfaceId"])]
    assert "UP" in cloud.ns.ip("-o", "link", "show", result.secondary_nics[0])
    subnet = next(
        s for s in world.client.describe_subnets()["Subnets"] if s["CidrBlock"] == str(SUBNET)
    )
    assert subnet["AvailabilityZone"] == world.ZONE and result.subnet_id == subnet["SubnetId"]
    assert result.vpc_cidrs == [IPv4Network(world.VPC_CIDR)]
    perms = world.client.describe_security_groups(GroupIds=[world.sg])["SecurityGroups"][0]
    assert [r["CidrIp"] for p in perms["IpPermissions"] for r in p["IpRanges"]] == [str(SUBNET)]
    recorded = cloud.recorded()
    assert recorded["subnet"] == {"id": subnet["SubnetId"], "cidr": str(SUBNET), "created": True}
    assert recorded["securityGroup"] == {"id": world.sg, "cidr": str(SUBNET), "ruleCreated": True}
    assert recorded["limits"] == {
        "instanceType": "c5.metal", "maxEnis": 15, "addressesPerEni": 50, "mode": "prefix",
    }  # fmt: skip
    (rec,) = recorded["enis"]
    assert rec["id"] == eni["NetworkInterfaceId"] and rec["mac"] == eni["MacAddress"]
    assert rec["ifname"] == result.secondary_nics[0] and rec["gateway"] == "10.0.100.1"
    assert rec["prefixes"] == [str(p) for p in sorted(prefixes)] and rec["slot"] == 1
    assert recorded["clientTokens"] == {}
    assert result.cloud["enis"] == recorded["enis"]

    cloud.teardown()
    assert world.snapshot() == before
    assert cloud.recorded()["enis"] == [] and cloud.recorded()["subnet"] == {}


@pytest.mark.parametrize("cloud", ["m4.large"], indirect=True)
def test_ip_mode_on_a_xen_instance_takes_its_limits_from_the_instance_type(cloud: Cloud) -> None:
    before = cloud.world.snapshot()
    # m4.large: 2 ENIs x 10 addresses -> 1 secondary ENI with 9 secondary IPs at most
    with pytest.raises(UsageError, match=r"m4.large node holds 1 to 9 addresses"):
        cloud.init(pool_size=10)
    result = cloud.init(pool_size=9)
    (eni,) = cloud.ours()
    assert cloud.world.proxy.prefixes.get(eni["NetworkInterfaceId"], []) == []
    assert result.ips == _addresses(eni, cloud.world) and len(result.ips) == 9
    assert cloud.recorded()["limits"]["mode"] == "ip"
    state = _state(cloud.pool_file)
    state.ips = [str(ip) for ip in result.ips]
    foreseen = aws.create({}).pool_after(state, _request(4, state.cloud, {}), adopt=False)
    smaller = cloud.init(pool_size=4)  # shrinking unassigns the highest addresses
    assert smaller.ips == result.ips[:4] == sorted(foreseen)
    assert _addresses(cloud.ours()[0], cloud.world) == result.ips[:4]
    cloud.teardown()
    assert cloud.world.snapshot() == before


@pytest.mark.parametrize("cloud", ["m5.large"], indirect=True)
def test_prefixes_spread_over_enis_full_ones_first(cloud: Cloud) -> None:
    # m5.large (Nitro): 3 ENIs x 10 addresses -> 2 secondary ENIs x 9 prefixes
    result = cloud.init(pool_size=200)  # 13 prefixes: 9 + 4
    counts = sorted(len(cloud.world.proxy.prefixes[e["NetworkInterfaceId"]]) for e in cloud.ours())
    assert counts == [4, 9] and len(result.ips) == 200
    indexes = sorted(e["Attachment"]["DeviceIndex"] for e in cloud.ours())
    assert indexes == [1, 2]
    cloud.teardown()


@pytest.mark.parametrize("cloud", ["m5.large"], indirect=True)
def test_an_eni_slot_taken_by_someone_else_fails_the_attach_clearly(cloud: Cloud) -> None:
    cloud.world.add_foreign_eni()  # 1 of the m5.large's 2 secondary ENI slots
    before = cloud.world.snapshot()
    with pytest.raises(CloudQuotaError, match="AttachmentLimitExceeded"):
        cloud.init(pool_size=200)  # 9 + 4 prefixes: two ENIs
    assert len(cloud.ours()) == 2  # both recorded; teardown removes both
    cloud.teardown()
    assert cloud.world.snapshot() == before


def test_init_twice_changes_nothing(cloud: Cloud) -> None:
    first = cloud.init(pool_size=40)
    snapshot = cloud.world.snapshot()
    calls = len(cloud.world.proxy.calls)
    second = cloud.init(pool_size=40)
    assert cloud.world.snapshot() == snapshot
    assert second.ips == first.ips and second.eni_ids == first.eni_ids
    made = [c for c in cloud.world.proxy.calls[calls:] if not c.startswith("Describe")]
    assert made == []


def test_foreign_enis_are_never_touched(cloud: Cloud) -> None:
    world = cloud.world
    attached = world.add_foreign_eni()
    loose = world.add_foreign_eni(attach=False, tags={plan.TAG_NODE: "node-b"})
    before = world.snapshot()
    result = cloud.init(pool_size=20)
    assert attached not in result.eni_ids and loose not in result.eni_ids
    after = world.snapshot()
    assert after["enis"][attached] == before["enis"][attached]
    assert after["enis"][loose] == before["enis"][loose]
    # Our ENI took the next free device index, not the foreign one's (1).
    assert cloud.ours()[0]["Attachment"]["DeviceIndex"] == 2
    cloud.teardown()
    assert world.snapshot() == before


def test_an_existing_subnet_and_a_covering_rule_are_reused_and_kept(cloud: Cloud) -> None:
    world = cloud.world
    world.client.create_subnet(
        VpcId=world.vpc_id, CidrBlock=str(SUBNET), AvailabilityZone=world.ZONE
    )
    world.client.authorize_security_group_ingress(
        GroupId=world.sg,
        IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}],
    )
    before = world.snapshot()
    cloud.init(pool_size=16)
    assert cloud.recorded()["subnet"]["created"] is False
    assert cloud.recorded()["securityGroup"]["ruleCreated"] is False
    cloud.teardown()
    assert world.snapshot() == before


def test_a_subnet_outside_the_vpc_or_in_another_zone_is_refused_before_any_change(
    cloud: Cloud,
) -> None:
    world = cloud.world
    world.client.create_subnet(
        VpcId=world.vpc_id, CidrBlock=str(SUBNET), AvailabilityZone="us-east-1b"
    )
    before = world.snapshot()
    with pytest.raises(CloudError, match="is in us-east-1b but this instance is in us-east-1a"):
        cloud.init(pool_size=16)
    assert world.snapshot() == before


# (action, fault, times, expected error or None when retried within the run)
FAULTS = [
    ("DescribeNetworkInterfaces", "RequestLimitExceeded", 3, None),
    ("DescribeInstanceTypes", "RequestLimitExceeded", 2, None),
    ("CreateSubnet", "RequestLimitExceeded", 1, None),
    ("CreateSubnet", "lost", 1, CloudError),
    ("CreateSubnet", "InternalError", 1, CloudError),
    ("AuthorizeSecurityGroupIngress", "lost", 1, CloudError),
    ("AuthorizeSecurityGroupIngress", "RequestLimitExceeded", 2, None),
    ("CreateNetworkInterface", "lost", 1, None),  # same ClientToken, same ENI
    ("CreateNetworkInterface", "lost", 99, CloudError),  # the rerun's token finds it
    ("CreateNetworkInterface", "InsufficientFreeAddressesInSubnet", 1, CloudQuotaError),
    ("AttachNetworkInterface", "lost", 1, CloudError),
    ("AttachNetworkInterface", "RequestLimitExceeded", 2, None),
    ("AttachNetworkInterface", "AttachmentLimitExceeded", 1, CloudQuotaError),
    ("AssignPrivateIpAddresses", "lost", 1, CloudError),  # the rerun unassigns the excess
    ("AssignPrivateIpAddresses", "InsufficientCidrBlocks", 1, CloudQuotaError),
    ("DescribeVpcs", "InternalError", 99, CloudError),
]


@pytest.mark.parametrize(("action", "fault", "times", "error"), FAULTS)
def test_each_init_fault_is_retried_or_fails_clearly_and_rerun_and_teardown_recover(
    cloud: Cloud, action: str, fault: str, times: int, error: type[Exception] | None
) -> None:
    world = cloud.world
    before = world.snapshot()
    # the ENI is created bare and given its prefixes afterwards only when it exists already
    if action == "AssignPrivateIpAddresses":
        cloud.init(pool_size=16)
    world.proxy.inject(action, fault, times=times)
    if error is None:
        result = cloud.init(pool_size=40)
    else:
        with pytest.raises(error, match=action):  # says which call, not a later timeout
            cloud.init(pool_size=40)
        world.proxy.faults.clear()
        result = cloud.init(pool_size=40)
    (eni,) = cloud.ours()  # a retried or repeated create never made a second ENI
    assert len(world.proxy.prefixes[eni["NetworkInterfaceId"]]) == 3
    assert result.ips == _addresses(eni, world)[:40] and len(result.ips) == 40
    cloud.teardown()
    assert world.snapshot() == before


def test_a_rerun_with_another_size_after_a_lost_create_gets_the_same_eni(cloud: Cloud) -> None:
    before = cloud.world.snapshot()
    cloud.world.proxy.inject("CreateNetworkInterface", "lost", times=99)
    # and the ENI stays out of the next Describe answers: the rerun's search by tag misses it
    cloud.world.proxy.hide_new("CreateNetworkInterface", describes=2)
    with pytest.raises(CloudError, match="CreateNetworkInterface"):
        cloud.init(pool_size=40)
    cloud.world.proxy.faults.clear()
    result = cloud.init(pool_size=64)  # the recorded token, sent with the first count
    (eni,) = cloud.ours()
    assert len(cloud.world.proxy.prefixes[eni["NetworkInterfaceId"]]) == 4
    assert len(result.ips) == 64 and cloud.recorded()["clientTokens"] == {}
    cloud.teardown()
    assert cloud.world.snapshot() == before


@pytest.mark.parametrize("create", ["CreateNetworkInterface", "CreateSubnet"])
def test_a_new_resource_not_yet_visible_is_waited_for(cloud: Cloud, create: str) -> None:
    before = cloud.world.snapshot()
    cloud.world.proxy.hide_new(create, describes=3)
    result = cloud.init(pool_size=40)
    assert len(result.ips) == 40 and len(cloud.ours()) == 1
    cloud.teardown()
    assert cloud.world.snapshot() == before


@pytest.mark.parametrize(
    "action",
    [
        "DetachNetworkInterface",
        "DeleteNetworkInterface",
        "RevokeSecurityGroupIngress",
        "DeleteSubnet",
    ],
)
def test_teardown_reports_what_remains_and_a_rerun_finishes(cloud: Cloud, action: str) -> None:
    before = cloud.world.snapshot()
    cloud.init(pool_size=40)
    cloud.world.proxy.inject(action, "InternalError", times=99)
    with pytest.raises(CloudError, match="AWS teardown incomplete"):
        cloud.teardown()
    cloud.world.proxy.faults.clear()
    cloud.teardown()
    assert cloud.world.snapshot() == before


@pytest.mark.parametrize("action", ["DetachNetworkInterface", "DeleteNetworkInterface"])
def test_teardown_after_a_lost_answer(cloud: Cloud, action: str) -> None:
    before = cloud.world.snapshot()
    cloud.init(pool_size=40)
    cloud.world.proxy.inject(action, "lost", times=1)
    try:
        cloud.teardown()
    except CloudError:
        cloud.teardown()
    assert cloud.world.snapshot() == before


def test_a_lost_pool_json_still_finds_our_enis_and_subnet_by_their_tags(cloud: Cloud) -> None:
    before = cloud.world.snapshot()
    cloud.init(pool_size=40)
    vpc = cloud.recorded()["vpcId"]
    cloud.pool_file.write_text(json.dumps({"vpcId": vpc}))
    cloud.teardown()
    assert cloud.world.snapshot() == before


def test_status_lists_limits_subnet_and_our_enis(cloud: Cloud) -> None:
    cloud.world.add_foreign_eni()
    result = cloud.init(pool_size=40)
    lines = cloud.ns.call(_status, cloud.world.environ(), cloud.pool_file)
    text = "\n".join(f"{label}: {value}" for label, value in lines)
    assert "InstanceType: c5.metal (15 ENIs x 50 addresses; prefix mode)" in text
    assert f"SubnetID: {result.subnet_id} {SUBNET} (available" in text
    assert "ENIs: 1" in text
    (eni,) = cloud.ours()
    ifname = link_name(eni["NetworkInterfaceId"])
    assert (
        f"{eni['NetworkInterfaceId']}: {NODE}-eni-1 mac {eni['MacAddress']} if {ifname} "
        "in-use 3 prefixes" in text
    )


def _status(environ: dict[str, str], pool_file: Path) -> list[tuple[str, str]]:
    return [
        (line.label.strip(), line.value) for line in _platform(environ).status(_state(pool_file))
    ]


def _adopt(environ: dict[str, str], pool_size: int) -> ProvisionResult:
    return _platform(environ).adopt(_request(pool_size, {}, {}))


def test_adopt_pools_what_the_enis_hold_and_changes_nothing(cloud: Cloud) -> None:
    made = cloud.init(pool_size=40)
    calls = len(cloud.world.proxy.calls)
    adopted = cloud.ns.call(_adopt, cloud.world.environ(), 40)
    assert adopted.ips == made.ips
    assert adopted.secondary_nics == made.secondary_nics
    assert all(c.startswith("Describe") for c in cloud.world.proxy.calls[calls:])


def test_adopt_refuses_an_eni_of_another_node(cloud: Cloud) -> None:
    cloud.init(pool_size=16)
    (eni,) = cloud.ours()
    cloud.world.client.create_tags(
        Resources=[eni["NetworkInterfaceId"]], Tags=[{"Key": plan.TAG_NODE, "Value": "node-b"}]
    )
    with pytest.raises(CloudError, match="belongs to node 'node-b'"):
        cloud.ns.call(_adopt, cloud.world.environ(), 16)
