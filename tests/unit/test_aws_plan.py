"""The aws platform's pure decisions, and its metadata client against the IMDSv2 emulator."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cocoon_net.errors import (
    CloudAuthError,
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    UsageError,
)
from cocoon_net.platform import eni_steps
from cocoon_net.platform.aws import imds, plan
from cocoon_net.platform.aws.ec2 import classify, repeatable
from cocoon_net.platform.aws.plan import MODE_IP, MODE_PREFIX, Eni, Limits
from tests.emulators import EmulatorServer
from tests.emulators.imds import ImdsEmulator

SUBNET = IPv4Network("10.0.100.0/24")


def _type(name: str, enis: int, per_eni: int, hypervisor: str = "", metal: bool = False) -> Any:
    return {
        "InstanceType": name,
        "Hypervisor": hypervisor,
        "BareMetal": metal,
        "NetworkInfo": {"MaximumNetworkInterfaces": enis, "Ipv4AddressesPerInterface": per_eni},
    }


def test_limits_come_from_the_instance_type_and_nitro_means_prefixes() -> None:
    metal = plan.limits_from(_type("c5.metal", 15, 50, metal=True))
    assert metal == Limits("c5.metal", 15, 50, MODE_PREFIX)
    assert metal.max_pool == 14 * 49 * 16
    assert plan.limits_from(_type("m5.large", 3, 10, "nitro")).mode == MODE_PREFIX
    xen = plan.limits_from(_type("m4.large", 2, 10, "xen"))
    assert xen.mode == MODE_IP and xen.max_pool == 9
    with pytest.raises(CloudError, match="no room for a secondary ENI"):
        plan.limits_from(_type("t1.tiny", 1, 2, "xen"))
    with pytest.raises(CloudError, match="no ENI limits for x1"):
        plan.limits_from({"InstanceType": "x1"})


def test_unit_targets_fill_enis_first_and_refuse_what_does_not_fit() -> None:
    m5 = Limits("m5.large", 3, 10, MODE_PREFIX)
    assert plan.unit_targets(1, m5) == [1]
    assert plan.unit_targets(200, m5) == [9, 4]  # 13 prefixes
    assert plan.unit_targets(288, m5) == [9, 9]
    with pytest.raises(UsageError, match="holds 1 to 288 addresses"):
        plan.unit_targets(289, m5)
    m4 = Limits("m4.large", 2, 10, MODE_IP)
    assert plan.unit_targets(9, m4) == [9]
    with pytest.raises(UsageError, match=r"1 secondary ENIs x 9 secondary IPs"):
        plan.unit_targets(0, m4)


def _eni(ips: list[str] = (), prefixes: list[str] = (), **extra: Any) -> Eni:  # type: ignore[assignment]
    raw = {
        "NetworkInterfaceId": "eni-1",
        "Status": "in-use",
        "MacAddress": "0E:00:00:00:00:02",
        "SubnetId": "subnet-1",
        "Attachment": {"InstanceId": "i-1", "AttachmentId": "a-1", "Status": "attached",
                       "DeviceIndex": 1},
        "PrivateIpAddresses": [{"PrivateIpAddress": "10.0.100.4", "Primary": True}]
        + [{"PrivateIpAddress": ip, "Primary": False} for ip in ips],
        "Ipv4Prefixes": [{"Ipv4Prefix": p} for p in prefixes],
        "TagSet": [{"Key": plan.TAG_NODE, "Value": "n"}, {"Key": plan.TAG_SLOT, "Value": "2"}],
        **extra,
    }  # fmt: skip
    return Eni.from_api(raw)


def test_an_eni_from_the_api() -> None:
    eni = _eni(["10.0.100.9", "10.0.100.5"], ["10.0.100.32/28"])
    assert eni.mac == "0e:00:00:00:00:02" and eni.slot == 2 and eni.device_index == 1
    assert eni.primary_ip == IPv4Address("10.0.100.4")
    assert eni.secondary == (IPv4Address("10.0.100.5"), IPv4Address("10.0.100.9"))
    addresses = eni.addresses()
    assert len(addresses) == 18 and IPv4Address("10.0.100.32") in addresses  # /28 whole
    assert IPv4Address("10.0.100.4") not in addresses  # the ENI's own primary
    assert eni.units(MODE_PREFIX) == 1 and eni.units(MODE_IP) == 2
    assert plan.is_ours(eni, "n", []) and not plan.is_ours(eni, "m", [])
    assert plan.is_ours(eni, "m", ["eni-1"])


def test_excess_keeps_the_lowest_units_and_drops_the_other_kind() -> None:
    eni = _eni(["10.0.100.5", "10.0.100.6"], ["10.0.100.16/28", "10.0.100.48/28"])
    assert plan.excess(eni, MODE_PREFIX, 1) == (["10.0.100.5", "10.0.100.6"], ["10.0.100.48/28"])
    assert plan.excess(eni, MODE_IP, 1) == (["10.0.100.6"], ["10.0.100.16/28", "10.0.100.48/28"])
    assert plan.excess(_eni(["10.0.100.5"]), MODE_IP, 3) == ([], [])


def test_pool_ips_and_kept_ips_agree_on_a_shrink() -> None:
    eni = _eni([], ["10.0.100.16/28", "10.0.100.32/28", "10.0.100.48/28"])
    pool = plan.pool_ips([eni], SUBNET, IPv4Address("10.0.100.1"), 40)
    assert pool == [IPv4Address("10.0.100.16") + i for i in range(40)]
    record = plan.eni_record(eni, SUBNET, "ens6")
    assert record["gateway"] == "10.0.100.1" and record["ifname"] == "ens6"
    assert record["slot"] == 2  # its share is the second target
    kept = plan.kept_ips([record], [9, 1], MODE_PREFIX, pool, 16)
    assert kept == {IPv4Address("10.0.100.16") + i for i in range(16)}
    ip_eni = _eni(["10.0.100.7", "10.0.100.5", "10.0.100.6"])
    ip_pool = plan.pool_ips([ip_eni], SUBNET, IPv4Address("10.0.100.1"), 3)
    kept = plan.kept_ips([plan.eni_record(ip_eni, SUBNET)], [9, 2], MODE_IP, ip_pool, 2)
    assert kept == {IPv4Address("10.0.100.5"), IPv4Address("10.0.100.6")}


def test_rule_cover_vpc_cidrs_and_device_indexes() -> None:
    wide = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}
    assert plan.rule_covers(wide, SUBNET)
    assert not plan.rule_covers({**wide, "IpProtocol": "tcp"}, SUBNET)
    assert not plan.rule_covers(
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.1.0.0/16"}]}, SUBNET
    )
    vpc = {
        "CidrBlock": "10.0.0.0/16",
        "CidrBlockAssociationSet": [
            {"CidrBlock": "10.0.0.0/16", "CidrBlockState": {"State": "associated"}},
            {"CidrBlock": "100.64.0.0/16", "CidrBlockState": {"State": "associated"}},
            {"CidrBlock": "100.65.0.0/16", "CidrBlockState": {"State": "disassociated"}},
        ],
    }
    assert plan.vpc_cidrs(vpc) == [IPv4Network("10.0.0.0/16"), IPv4Network("100.64.0.0/16")]
    assert plan.free_device_indexes([0, 1, 3, None], 3) == [2, 4, 5]


def test_error_codes_map_to_what_the_operator_can_do() -> None:
    assert isinstance(classify("X", "UnauthorizedOperation", "m"), CloudAuthError)
    assert isinstance(classify("X", "InvalidNetworkInterfaceID.NotFound", "m"), CloudNotFound)
    assert isinstance(classify("X", "AttachmentLimitExceeded", "m"), CloudQuotaError)
    assert isinstance(classify("X", "InsufficientCidrBlocks", "m"), CloudQuotaError)
    assert isinstance(classify("X", "DependencyViolation", "m"), CloudConflict)
    assert type(classify("X", "RequestLimitExceeded", "m")) is CloudError
    assert str(classify("CreateSubnet", "Boom", "bad")) == "EC2 CreateSubnet: Boom: bad"
    assert repeatable("DescribeSubnets", {}) and repeatable("DeleteSubnet", {})
    assert repeatable("CreateNetworkInterface", {"ClientToken": "t"})
    assert not repeatable("CreateSubnet", {}) and not repeatable("AttachNetworkInterface", {})
    assert not repeatable("AssignPrivateIpAddresses", {"Ipv4PrefixCount": 1})


# --- instance metadata ----------------------------------------------------------------------


def _imds(**extra: Any) -> ImdsEmulator:
    return ImdsEmulator("i-0abc", "eu-west-1", "eu-west-1b", "0e:00:00:00:00:01", "vpc-9", **extra)


def test_identity_through_imdsv2() -> None:
    emu = _imds()
    server = EmulatorServer(emu.handle).start()
    try:
        ident = imds.read_identity(server.url)
    finally:
        server.stop()
    assert ident == imds.Identity("i-0abc", "eu-west-1", "eu-west-1b", "0e:00:00:00:00:01", "vpc-9")
    assert server.log[0].method == "PUT"  # the token first
    assert all(r.headers.get("x-aws-ec2-metadata-token") for r in server.log[1:])


def test_an_unanswered_token_falls_back_to_imdsv1_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emu = _imds(put_hangs=True, v1_allowed=True)
    server = EmulatorServer(emu.handle).start()
    try:
        with caplog.at_level(logging.WARNING):
            ident = imds.read_identity(server.url, timeout=0.3)
    finally:
        emu.hung.set()
        server.stop()
    assert ident.instance_id == "i-0abc"
    assert "IMDSv2 token request" in caplog.text and "trying IMDSv1" in caplog.text


def test_imdsv2_required_and_no_token_names_the_hop_limit() -> None:
    emu = _imds(put_hangs=True)
    server = EmulatorServer(emu.handle).start()
    try:
        with pytest.raises(CloudError, match="http-put-response-hop-limit 2"):
            imds.read_identity(server.url, timeout=0.3)
    finally:
        emu.hung.set()
        server.stop()


def test_free_blocks_skip_every_overlap_and_go_through_each_vpc_cidr_in_order() -> None:
    nets = [IPv4Network("10.0.0.0/24"), IPv4Network("10.1.0.0/25")]
    taken = [IPv4Network("10.0.0.0/26"), IPv4Network("10.0.0.128/27")]
    blocks = list(plan.free_blocks(nets, taken, 26))
    assert blocks == [
        IPv4Network("10.0.0.64/26"),
        IPv4Network("10.0.0.192/26"),
        IPv4Network("10.1.0.0/26"),
        IPv4Network("10.1.0.64/26"),
    ]
    # a block larger than a CIDR never fits in it; one partly taken is not free
    assert list(plan.free_blocks(nets, taken, 23)) == []
    assert list(plan.free_blocks([IPv4Network("10.0.0.0/23")], taken, 24)) == [
        IPv4Network("10.0.1.0/24")
    ]


def test_only_subnets_tagged_for_the_node_are_its_own() -> None:
    subnets: list[dict[str, Any]] = [
        {"SubnetId": "subnet-a", "Tags": [{"Key": plan.TAG_NODE, "Value": "n1"}]},
        {"SubnetId": "subnet-b", "Tags": [{"Key": plan.TAG_NODE, "Value": "n2"}]},
        {"SubnetId": "subnet-c", "Tags": [{"Key": "Name", "Value": "n1"}]},
        {"SubnetId": "subnet-d"},
    ]
    assert [s["SubnetId"] for s in plan.tagged_for(subnets, "n1")] == ["subnet-a"]
    assert eni_steps.subnet_network({"CidrBlock": "10.0.1.0/24"}) == IPv4Network("10.0.1.0/24")
    assert eni_steps.subnet_network({}) is None
