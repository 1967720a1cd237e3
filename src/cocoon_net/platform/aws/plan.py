"""Pure decisions of the aws platform: limits, how a pool spreads over ENIs, what is ours.

Nothing here does I/O. EC2 answers come in as botocore's dicts (`Eni.from_api`) and leave as
pool.json records (`eni_record`); everything between is plain data, unit-tested without a
cloud.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cocoon_net.errors import CloudError, UsageError
from cocoon_net.platform import ownership

TAG_NODE = ownership.TAG_NODE
TAG_SLOT = "cocoon-net:slot"
PREFIX_LEN = 28  # EC2 delegates IPv4 prefixes as /28s: 16 addresses per address slot
PREFIX_SIZE = 2 ** (32 - PREFIX_LEN)
MODE_PREFIX = "prefix"
MODE_IP = "ip"


@dataclass(frozen=True)
class Limits:
    """What DescribeInstanceTypes says one instance of this type can hold."""

    instance_type: str
    max_enis: int  # the primary ENI included
    addresses_per_eni: int  # the ENI's primary address included
    mode: str  # MODE_PREFIX on Nitro instances (bare metal included), else MODE_IP

    @property
    def units_per_eni(self) -> int:
        """Secondary IPs, or /28 prefixes, one ENI takes: its primary address uses a slot."""
        return self.addresses_per_eni - 1

    @property
    def unit_size(self) -> int:
        return PREFIX_SIZE if self.mode == MODE_PREFIX else 1

    @property
    def max_pool(self) -> int:
        return (self.max_enis - 1) * self.units_per_eni * self.unit_size

    def record(self) -> dict[str, Any]:
        return {
            "instanceType": self.instance_type,
            "maxEnis": self.max_enis,
            "addressesPerEni": self.addresses_per_eni,
            "mode": self.mode,
        }


def limits_from(raw: Mapping[str, Any]) -> Limits:
    """Limits from one DescribeInstanceTypes entry. Prefix delegation is offered on instances
    built on the Nitro system, which every bare-metal type is (its Hypervisor field is empty)."""
    name = str(raw.get("InstanceType", "?"))
    info = raw.get("NetworkInfo") or {}
    try:
        max_enis = int(info["MaximumNetworkInterfaces"])
        per_eni = int(info["Ipv4AddressesPerInterface"])
    except (KeyError, TypeError, ValueError):
        raise CloudError(
            f"DescribeInstanceTypes gave no ENI limits for {name}: cannot plan the pool"
        ) from None
    if max_enis < 2 or per_eni < 2:
        raise CloudError(
            f"instance type {name} takes {max_enis} ENIs of {per_eni} addresses: no room for "
            "a secondary ENI with VM addresses"
        )
    nitro = raw.get("Hypervisor") == "nitro" or bool(raw.get("BareMetal"))
    return Limits(name, max_enis, per_eni, MODE_PREFIX if nitro else MODE_IP)


def unit_targets(pool_size: int, limits: Limits) -> list[int]:
    """Secondary IPs (or prefixes) wanted on ENI slot 1, 2, ...: full ENIs first."""
    if not 1 <= pool_size <= limits.max_pool:
        what = "/28 prefixes" if limits.mode == MODE_PREFIX else "secondary IPs"
        raise UsageError(
            f"invalid --pool-size {pool_size}: a {limits.instance_type} node holds 1 to "
            f"{limits.max_pool} addresses ({limits.max_enis - 1} secondary ENIs x "
            f"{limits.units_per_eni} {what})"
        )
    units = math.ceil(pool_size / limits.unit_size)
    full, rest = divmod(units, limits.units_per_eni)
    return [limits.units_per_eni] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Eni:
    """An ENI as DescribeNetworkInterfaces (or CreateNetworkInterface) reports it."""

    id: str
    status: str  # available, attaching, in-use, detaching
    mac: str
    subnet_id: str
    instance_id: str  # attached to, "" when not
    attachment_id: str
    attachment_status: str
    device_index: int | None
    primary_ip: IPv4Address | None
    secondary: tuple[IPv4Address, ...]
    prefixes: tuple[IPv4Network, ...]
    tags: Mapping[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    source_dest_check: bool = True

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> Eni:
        att = raw.get("Attachment") or {}
        ips = raw.get("PrivateIpAddresses") or ()
        primary = [str(i["PrivateIpAddress"]) for i in ips if i.get("Primary")]
        index = att.get("DeviceIndex")
        return cls(
            id=str(raw["NetworkInterfaceId"]),
            status=str(raw.get("Status", "")),
            mac=str(raw.get("MacAddress", "")).lower(),
            subnet_id=str(raw.get("SubnetId", "")),
            instance_id=str(att.get("InstanceId") or ""),
            attachment_id=str(att.get("AttachmentId") or ""),
            attachment_status=str(att.get("Status") or ""),
            device_index=int(index) if index is not None else None,
            primary_ip=IPv4Address(primary[0]) if primary else None,
            secondary=tuple(
                sorted(IPv4Address(str(i["PrivateIpAddress"])) for i in ips if not i.get("Primary"))
            ),
            prefixes=tuple(
                sorted(IPv4Network(str(p["Ipv4Prefix"])) for p in raw.get("Ipv4Prefixes") or ())
            ),
            tags={str(t["Key"]): str(t.get("Value", "")) for t in raw.get("TagSet") or ()},
            groups=tuple(str(g["GroupId"]) for g in raw.get("Groups") or ()),
            source_dest_check=raw.get("SourceDestCheck", True) is not False,
        )

    @property
    def slot(self) -> int | None:
        text = self.tags.get(TAG_SLOT, "")
        return int(text) if text.isdigit() and int(text) > 0 else None

    def units(self, mode: str) -> int:
        return len(self.prefixes) if mode == MODE_PREFIX else len(self.secondary)

    def addresses(self) -> list[IPv4Address]:
        """Every VM-usable address the ENI holds beyond its primary, sorted."""
        found = set(self.secondary)
        for prefix in self.prefixes:
            found.update(prefix)  # a delegated /28 is usable whole, network address included
        return sorted(found)


def eni_name(node: str, slot: int) -> str:
    return f"{node}-eni-{slot}"


def node_tags(node: str, name: str, slot: int | None = None) -> list[dict[str, str]]:
    tags = [{"Key": TAG_NODE, "Value": node}, {"Key": "Name", "Value": name}]
    if slot is not None:
        tags.append({"Key": TAG_SLOT, "Value": str(slot)})
    return tags


def is_ours(eni: Eni, node: str, recorded: Iterable[str]) -> bool:
    return eni.tags.get(TAG_NODE) == node or eni.id in set(recorded)


def adopt_refusal(eni: Eni, node: str, instance_id: str, subnet: IPv4Network) -> str | None:
    """Why adopt must not pool an ENI that holds addresses of subnet, or None."""
    owner = eni.tags.get(TAG_NODE)
    return ownership.adopt_refusal(eni.id, eni.instance_id, owner, node, instance_id, subnet)


def excess(eni: Eni, mode: str, target: int) -> tuple[list[str], list[str]]:
    """(secondary IPs, prefixes) to unassign so the ENI holds `target` units of mode and
    nothing of the other kind; the highest go first, so the pool's low addresses stay."""
    if mode == MODE_PREFIX:
        return [str(ip) for ip in eni.secondary], [str(p) for p in eni.prefixes[target:]]
    return [str(ip) for ip in eni.secondary[target:]], [str(p) for p in eni.prefixes]


def pool_ips(
    enis: Iterable[Eni], subnet: IPv4Network, gateway: IPv4Address, size: int
) -> list[IPv4Address]:
    """The first `size` addresses the ENIs hold inside subnet, gateway excluded, sorted."""
    found = {ip for eni in enis for ip in eni.addresses() if ip in subnet and ip != gateway}
    return sorted(found)[:size]


def kept_ips(
    recorded: Iterable[Mapping[str, Any]],
    targets: list[int],
    mode: str,
    pool: Iterable[IPv4Address],
    size: int,
) -> set[IPv4Address]:
    """The pool addresses a provision to `targets` keeps, from pool.json alone: on each slot
    its lowest units up to the slot's target (excess unassigns the rest)."""
    in_pool = set(pool)
    kept: set[IPv4Address] = set()
    for raw in recorded:
        slot = int(raw.get("slot") or 0)
        target = targets[slot - 1] if 0 < slot <= len(targets) else 0
        if mode == MODE_PREFIX:
            nets = sorted(IPv4Network(str(p)) for p in raw.get("prefixes") or ())
            kept.update(ip for net in nets[:target] for ip in net if ip in in_pool)
        else:
            ips = sorted(IPv4Address(str(ip)) for ip in raw.get("ips") or ())
            kept.update(ip for ip in ips[:target] if ip in in_pool)
    return set(sorted(kept)[:size])


def eni_record(eni: Eni, subnet: IPv4Network, ifname: str = "") -> dict[str, Any]:
    """What pool.json keeps of one of our ENIs: enough to find it again, and for egress to
    route each address out of the ENI that owns it (its link, MAC and subnet gateway)."""
    return {
        "id": eni.id,
        "slot": eni.slot or 0,
        "mac": eni.mac,
        "ifname": ifname,
        "subnetId": eni.subnet_id,
        "subnetCidr": str(subnet),
        "gateway": str(subnet_gateway(subnet)),
        "deviceIndex": eni.device_index,
        "ips": [str(ip) for ip in eni.secondary],
        "prefixes": [str(p) for p in eni.prefixes],
    }


def subnet_gateway(subnet: IPv4Network) -> IPv4Address:
    """The VPC router of an EC2 subnet: always its network address + 1."""
    return subnet.network_address + 1


def rule_covers(permission: Mapping[str, Any], subnet: IPv4Network) -> bool:
    """An ingress permission for every protocol from a range holding subnet."""
    if str(permission.get("IpProtocol")) != "-1":
        return False
    for rng in permission.get("IpRanges") or ():
        try:
            if subnet.subnet_of(IPv4Network(str(rng.get("CidrIp", "")), strict=False)):
                return True
        except ValueError:
            continue
    return False


def vpc_cidrs(vpc: Mapping[str, Any]) -> list[IPv4Network]:
    """Every associated IPv4 CIDR of a DescribeVpcs entry, primary first."""
    out = [IPv4Network(str(vpc["CidrBlock"]))] if vpc.get("CidrBlock") else []
    for assoc in vpc.get("CidrBlockAssociationSet") or ():
        state = (assoc.get("CidrBlockState") or {}).get("State", "associated")
        net = IPv4Network(str(assoc.get("CidrBlock")))
        if state == "associated" and net not in out:
            out.append(net)
    return out


def tagged_for(subnets: Iterable[Mapping[str, Any]], node: str) -> list[Mapping[str, Any]]:
    """The subnets tagged as node's: only init tags a subnet, and only one it created."""
    mark = {"Key": TAG_NODE, "Value": node}
    return [s for s in subnets if mark in (s.get("Tags") or ())]


def free_blocks(
    cidrs: Iterable[IPv4Network], taken: Iterable[IPv4Network], prefix: int
) -> Iterator[IPv4Network]:
    """Every /prefix of the VPC's CIDRs (primary first, lowest first) that no subnet overlaps."""
    used = list(taken)
    for cidr in cidrs:
        if prefix < cidr.prefixlen:
            continue
        for block in cidr.subnets(new_prefix=prefix):
            if not any(block.overlaps(net) for net in used):
                yield block


def free_device_indexes(used: Iterable[int | None], count: int) -> list[int]:
    """The lowest `count` device indexes not in use on the instance (0 is the primary's)."""
    taken = {i for i in used if i is not None} | {0}
    out: list[int] = []
    index = 1
    while len(out) < count:
        if index not in taken:
            out.append(index)
        index += 1
    return out


def permission(cidr: str, description: str = "") -> list[dict[str, Any]]:
    """The ingress permission init adds: every protocol from cidr."""
    rng = {"CidrIp": cidr, **({"Description": description} if description else {})}
    return [{"IpProtocol": "-1", "IpRanges": [rng]}]


def rule_description(node: str) -> str:
    """Marks the ingress rule as this node's, in the cloud itself."""
    return f"cocoon-net {node}: VM subnet"


def eni_records(enis: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pool.json's `enis`: a list, so merging into pool.json["cloud"] replaces it whole and a
    deletion sticks."""
    return [
        dict(e) for e in sorted(enis.values(), key=lambda e: (int(e.get("slot") or 0), e["id"]))
    ]
