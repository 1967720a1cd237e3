"""The `volcengine` platform: a VM subnet, secondary ENIs and their secondary IPs.

What init makes, in order, each recorded in pool.json["cloud"] the moment it exists:

1. the VM subnet (`--subnet`): reused when the VPC has it, else created as `<node>-vms`,
   tagged `cocoon-net:node=<node>`, and waited for until Available;
2. an ingress rule in the instance's own security group (or `--security-group`) accepting all
   traffic from the VPC CIDR, when no rule already does;
3. ENIs `<node>-eni-<n>` tagged for this node, one per 20 addresses of `--pool-size` (at most
   7: EBM instances take 1 primary + 7 ENIs of 20 secondary IPs each), created with their IPs,
   attached and brought up by MAC, all ENIs through each phase together; statuses are polled
   for all of them in one describe per round, never slept on.

A mutation without an idempotency token (attach, detach, unassign, delete) is judged by the
resource's state afterwards, not by its answer: a retry refused because the first attempt did
happen ("is Attaching") is no failure. With `--subnet auto`, claim_subnet creates the node's
subnet in the first free block of the VPC; the cloud's refusal of overlapping subnets keeps
nodes apart.

"Ours" means tagged for this node or recorded in pool.json, plus the ENIs the Go tool's init
made for this node (named `<node>-eni-<n>`, untagged, attached here, in the node's subnet):
those are recorded and tagged before anything else changes them, since once detached nothing
but the record and the tag tells them apart. Nothing else on the instance is reused or
touched (the Go tool took and deleted every non-primary ENI), and adopt refuses ENIs attached
elsewhere or tagged for another node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cocoon_net.errors import (
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    HostSetupError,
    UsageError,
    combined,
)
from cocoon_net.node import nic
from cocoon_net.platform import eni_steps, ownership, volc_api
from cocoon_net.platform.base import NodeRequest, ProvisionResult, ResourceRecorder, StatusLine
from cocoon_net.platform.eni_steps import subnet_network
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.platform.volc_api import (
    InstanceInfo,
    PollPolicy,
    VpcApi,
    indexed,
    tag_filter_params,
    tag_params,
    tags_of,
    wait_for,
)
from cocoon_net.platform.volc_sign import Credentials
from cocoon_net.state import PoolState

log = logging.getLogger("cocoon_net.platform.volcengine")

TAG_NODE = ownership.TAG_NODE
MAX_ENIS = 7  # secondary ENIs per EBM instance (cloud-apis.md E3, "Platform limits")
IPS_PER_ENI = 20  # secondary IPs per ENI on the same instances
MAX_POOL = MAX_ENIS * IPS_PER_ENI
# How long the cloud typically takes (the first status poll waits this long, then backs off):
# the Go tool slept 2 s after a create and 4 s after an attach.
TYPICAL_CREATE = 1.0
TYPICAL_ATTACH = 2.0
TYPICAL_DETACH = 1.0


@dataclass(frozen=True)
class Eni:
    """An ENI as DescribeNetworkInterfaces reports it."""

    id: str
    name: str
    status: str
    mac: str
    device_id: str
    subnet_id: str
    secondary: tuple[IPv4Address, ...]
    tags: Mapping[str, str] = field(default_factory=dict)
    primary: bool = False
    security_groups: tuple[str, ...] = ()

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> Eni:
        ips = (raw.get("PrivateIpSets") or {}).get("PrivateIpSet") or ()
        return cls(
            id=str(raw["NetworkInterfaceId"]),
            name=str(raw.get("NetworkInterfaceName", "")),
            status=str(raw.get("Status", "")),
            mac=str(raw.get("MacAddress", "")).lower(),
            device_id=str(raw.get("DeviceId") or ""),
            subnet_id=str(raw.get("SubnetId", "")),
            secondary=tuple(
                IPv4Address(ip["PrivateIpAddress"]) for ip in ips if not ip.get("Primary")
            ),
            tags=tags_of(raw),
            primary=raw.get("Type") == "primary",
            security_groups=tuple(str(sg) for sg in raw.get("SecurityGroupIds") or ()),
        )


# --- pure decisions -----------------------------------------------------------------------


def eni_name(node: str, slot: int) -> str:
    return f"{node}-eni-{slot}"


def slot_of(node: str, name: str) -> int | None:
    prefix = f"{node}-eni-"
    rest = name.removeprefix(prefix)
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def ip_targets(pool_size: int) -> list[int]:
    """Secondary IPs wanted on ENI slot 1, 2, ...: full ENIs first (50 -> [20, 20, 10])."""
    if not 1 <= pool_size <= MAX_POOL:
        raise UsageError(
            f"invalid --pool-size {pool_size}: a Volcengine node holds 1 to {MAX_POOL} "
            f"addresses ({MAX_ENIS} ENIs x {IPS_PER_ENI} secondary IPs)"
        )
    full, rest = divmod(pool_size, IPS_PER_ENI)
    return [IPS_PER_ENI] * full + ([rest] if rest else [])


def is_ours(eni: Eni, node: str, recorded: set[str]) -> bool:
    return eni.tags.get(TAG_NODE) == node or eni.id in recorded


def is_go_made(eni: Eni, node: str, instance_id: str, subnet_id: str) -> bool:
    """Made for this node by the Go tool's init, which named its ENIs `<node>-eni-<n>` in the
    node's subnet, attached them here and tagged nothing. Short of any one of these (a tag of
    any kind, another instance, another subnet) the ENI is someone else's."""
    return (
        not eni.primary
        and not eni.tags
        and slot_of(node, eni.name) is not None
        and bool(instance_id)
        and eni.device_id == instance_id
        and bool(subnet_id)
        and eni.subnet_id == subnet_id
    )


def adopt_refusal(eni: Eni, node: str, instance_id: str, subnet: IPv4Network) -> str | None:
    """Why adopt must not pool an ENI that holds addresses of subnet, or None."""
    label = f"{eni.id} ({eni.name or 'unnamed'})"
    owner = eni.tags.get(TAG_NODE)
    return ownership.adopt_refusal(label, eni.device_id, owner, node, instance_id, subnet)


def untagged(enis: list[Eni]) -> list[Eni]:
    """Those of our ENIs that still lack our tag (never one tagged for another node: a
    recorded ENI someone re-tagged keeps its tag)."""
    return [eni for eni in enis if TAG_NODE not in eni.tags]


def eni_record(eni: Eni) -> dict[str, Any]:
    return {
        "id": eni.id,
        "name": eni.name,
        "mac": eni.mac,
        "subnetId": eni.subnet_id,
        "ips": [str(ip) for ip in sorted(eni.secondary)],
    }


def rule_covers(rule: Mapping[str, Any], vpc: IPv4Network) -> bool:
    """An ingress accept rule for every protocol from a range holding the whole VPC."""
    try:
        source = IPv4Network(str(rule.get("CidrIp", "")), strict=False)
    except ValueError:
        return False
    return (
        rule.get("Direction", "ingress") == "ingress"
        and rule.get("Policy", "accept") == "accept"
        and rule.get("Protocol") == "all"
        and vpc.subnet_of(source)
    )


def pool_ips(enis: list[Eni], subnet: IPv4Network, gateway: IPv4Address) -> list[IPv4Address]:
    """Exactly the secondary IPs of enis inside subnet, the gateway excluded, sorted."""
    found = {ip for eni in enis for ip in eni.secondary if ip in subnet and ip != gateway}
    return sorted(found)


def kept_ips(
    recorded: Iterable[Mapping[str, Any]], node: str, pool: Iterable[IPv4Address], size: int
) -> set[IPv4Address]:
    """The pool addresses a provision to `size` keeps: on each ENI slot its lowest addresses
    up to the slot's new target (what _Provision unassigns is the rest); ENIs outside the
    slots leave the pool."""
    targets = ip_targets(size)
    in_pool = set(pool)
    kept: set[IPv4Address] = set()
    for eni in recorded:
        slot = slot_of(node, str(eni.get("name", "")))
        if slot is None:
            continue
        target = targets[slot - 1] if slot <= len(targets) else 0
        ips = sorted(IPv4Address(str(ip)) for ip in eni.get("ips") or ())
        kept.update(ip for ip in ips[:target] if ip in in_pool)
    return kept


# --- the platform -------------------------------------------------------------------------


class VolcenginePlatform:
    name = "volcengine"

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
    ) -> None:
        self._settings = volc_api.settings(environ)
        self._environ = dict(environ)
        self._retry = retry
        self._poll = poll or PollPolicy()
        self._info: InstanceInfo | None = None
        self._api: VpcApi | None = None
        self._on_instance: list[Eni] = []  # the instance's ENIs, as _find_enis last saw them

    # Credentials and metadata are read on first use, so a missing key fails the command
    # that needs the cloud with a clear message, and plan_teardown needs neither.
    def _instance(self) -> InstanceInfo:
        if self._info is None:
            self._info = volc_api.read_metadata(self._settings.metadata_url, retry=self._retry)
        return self._info

    def _vpc(self) -> VpcApi:
        if self._api is None:
            creds = volc_api.load_credentials(self._environ, self._settings.config_path)
            source: Credentials | volc_api.InstanceRole
            if creds is None:
                source = volc_api.InstanceRole(
                    self._settings.metadata_url,
                    self._instance().region,
                    self._environ.get(volc_api.ENV_ROLE, ""),
                )
            elif not creds.region:
                source = dataclasses.replace(creds, region=self._instance().region)
            else:
                source = creds
            self._api = VpcApi(self._settings.endpoint, source, retry=self._retry)
        return self._api

    def _describe(self, **filters: str) -> list[Eni]:
        return [
            Eni.from_api(raw)
            for raw in self._vpc().pages(
                "DescribeNetworkInterfaces", filters, "NetworkInterfaceSets"
            )
        ]

    def _wait_enis(
        self, ids: list[str], what: str, done: Callable[[Eni], bool], *, first: float = 0.0
    ) -> dict[str, Eni]:
        """Poll the ENIs, all in one describe per round, until done(eni) for each; the first
        look after `first` seconds (the cloud's typical time for the change)."""

        def fetch() -> dict[str, Eni]:
            found = {e.id: e for e in self._describe(**indexed("NetworkInterfaceIds", ids))}
            gone = [eni_id for eni_id in ids if eni_id not in found]
            if gone:
                raise CloudNotFound(f"Volcengine ENI {', '.join(gone)} disappeared while waiting")
            return found

        if not ids:
            return {}
        policy = self._poll
        policy = dataclasses.replace(policy, first=max(policy.first, first * policy.typical_scale))
        shown = ids[0] if len(ids) == 1 else f"{len(ids)} ENIs"
        return wait_for(
            fetch,
            lambda found: all(done(e) for e in found.values()),
            what=f"{shown} {what}",
            policy=policy,
        )

    def _release(self, eni: Eni, instance_id: str) -> None:
        """Take an ENI of ours off this instance and delete it. Each step that carries no
        idempotency token is judged by the ENI's state, not by its answer: a detach whose
        answer was lost is seen Detaching, an unassign or delete seen done."""
        api = self._vpc()

        def detach() -> None:
            settled = eni
            if eni.status not in ("Available", "InUse"):
                settled = self._wait_enis([eni.id], "to settle", _settled)[eni.id]
            if settled.status != "InUse":
                return
            if settled.secondary:
                with contextlib.suppress(CloudNotFound):
                    api.call(
                        "UnassignPrivateIpAddresses",
                        {
                            "NetworkInterfaceId": eni.id,
                            **indexed("PrivateIpAddress", [str(ip) for ip in settled.secondary]),
                        },
                    )
            try:
                api.call(
                    "DetachNetworkInterface",
                    {"NetworkInterfaceId": eni.id, "InstanceId": instance_id},
                )
            except CloudConflict as exc:
                log.info("detach of %s answered %s; reading its state", eni.id, exc)
            self._wait_enis(
                [eni.id], "to detach", lambda e: e.status == "Available", first=TYPICAL_DETACH
            )

        eni_steps.release(
            eni.device_id,
            instance_id,
            detach,
            lambda: api.call("DeleteNetworkInterface", {"NetworkInterfaceId": eni.id}),
        )

    def _our_enis(self, node: str, recorded: set[str]) -> list[Eni]:
        """Ours: tagged for node anywhere, or recorded by an earlier run and still there."""
        tagged = self._describe(**tag_filter_params({TAG_NODE: node}))
        known = {eni.id for eni in tagged}
        rest = sorted(recorded - known)
        extra = self._describe(**indexed("NetworkInterfaceIds", rest)) if rest else []
        return [eni for eni in tagged + extra if is_ours(eni, node, recorded)]

    def _find_enis(
        self, node: str, recorded: set[str], instance_id: str, subnet_id: str
    ) -> tuple[list[Eni], list[Eni]]:
        """Ours, and those the Go tool made for node that are not ours yet."""
        ours = self._our_enis(node, recorded)
        if not instance_id or not subnet_id:
            return ours, []
        known = {eni.id for eni in ours}
        self._on_instance = self._on_instance or self._describe(InstanceId=instance_id)
        go = [
            eni
            for eni in self._on_instance
            if eni.id not in known and is_go_made(eni, node, instance_id, subnet_id)
        ]
        return ours, go

    def _node_subnet_id(self, cloud: Mapping[str, Any], network: IPv4Network) -> str:
        """The pool's VPC subnet: recorded, else (the Go tool recorded none) the VPC's subnet
        whose CIDR is the pool's, which is the one the Go tool reused or created."""
        recorded = str((cloud.get("subnet") or {}).get("id") or "")
        if recorded:
            return recorded
        vpc_id = str(cloud.get("vpcId") or self._instance().vpc_id)
        subnets = self._vpc().pages("DescribeSubnets", {"VpcId": vpc_id}, "Subnets")
        match = next((s for s in subnets if subnet_network(s) == network), None)
        return str(match["SubnetId"]) if match else ""

    def _tag(self, node: str, enis: list[Eni]) -> None:
        """Mark ENIs as node's in the cloud itself, before anything changes them: once
        detached, a Go-made ENI looks like anyone's, and only this tag (or pool.json) still
        says it is ours."""
        if not enis:
            return
        self._vpc().call(
            "TagResources",
            {
                "ResourceType": "eni",
                **indexed("ResourceIds", [eni.id for eni in enis]),
                **tag_params({TAG_NODE: node}),
            },
        )

    # --- provision ----------------------------------------------------------------------

    def provision(self, request: NodeRequest, record: ResourceRecorder) -> ProvisionResult:
        targets = ip_targets(request.pool_size)  # before any cloud call
        return _Provision(self, request, record).run(targets)

    def claim_subnet(self, request: NodeRequest, record: ResourceRecorder) -> IPv4Network:
        """The VPC subnet tagged for this node, else the first block of the VPC's CIDR that
        no subnet overlaps, created with CreateSubnet. The cloud refuses a subnet that
        overlaps another: a node that was faster holds it, and the next block is tried."""
        info, node, prefix = self._instance(), request.node_name, request.subnet.prefixlen
        api = self._vpc()
        vpc = self.vpc_cidr(info.vpc_id)
        subnets = list(api.pages("DescribeSubnets", {"VpcId": info.vpc_id}, "Subnets"))
        mine = [n for s in subnets if tags_of(s).get(TAG_NODE) == node and (n := subnet_network(s))]
        if mine:
            return mine[0]
        used = [n for s in subnets if (n := subnet_network(s))]
        for block in vpc.subnets(new_prefix=prefix) if prefix >= vpc.prefixlen else ():
            if any(block.overlaps(n) for n in used):
                continue
            try:
                api.create("CreateSubnet", _subnet_params(info, node, block))
            except CloudConflict as exc:
                log.info("%s was taken meanwhile (%s); trying the next block", block, exc)
                continue
            return block
        raise CloudQuotaError(
            f"VPC {info.vpc_id} ({vpc}) has no free /{prefix} left for --subnet auto: "
            "use a smaller --subnet-prefix or free a subnet"
        )

    def adopt(self, request: NodeRequest) -> ProvisionResult:
        """The pool is the secondary IPs the VPC already routes to this instance's ENIs
        inside --subnet (the Go tool pooled sequential addresses instead). Every ENI holding
        addresses of --subnet must be attached here and not tagged for another node, or
        adopt refuses before anything is recorded."""
        info, node, subnet = self._instance(), request.node_name, request.subnet
        subnets = list(self._vpc().pages("DescribeSubnets", {"VpcId": info.vpc_id}, "Subnets"))
        subnet_ids = [
            str(s["SubnetId"]) for s in subnets if (n := subnet_network(s)) and n.overlaps(subnet)
        ]
        node_subnet = next((str(s["SubnetId"]) for s in subnets if subnet_network(s) == subnet), "")
        holding = [
            eni
            for subnet_id in subnet_ids
            for eni in self._describe(SubnetId=subnet_id)
            if not eni.primary and any(ip in subnet for ip in eni.secondary)
        ]
        for eni in holding:
            refusal = adopt_refusal(eni, node, info.instance_id, subnet)
            if refusal is not None:
                raise CloudError(refusal)
        enis = [eni for eni in holding if eni.status == "InUse"]
        ips = pool_ips(enis, subnet, request.gateway)[: request.pool_size]
        if not ips:
            raise CloudError(
                f"no secondary IPs inside {subnet} on the ENIs of {info.instance_id}: "
                "nothing to adopt (run 'cocoon-net init' to create them)"
            )
        used = [eni for eni in enis if any(ip in ips for ip in eni.secondary)]
        recorded = eni_steps.recorded_enis(request.cloud)
        for eni in used:
            if is_ours(eni, node, set(recorded)):
                recorded[eni.id] = {**recorded.get(eni.id, {}), **eni_record(eni)}
            elif is_go_made(eni, node, info.instance_id, node_subnet):
                # Ours by the Go tool's init; adopt changes nothing in the cloud, so the tag
                # waits for init or teardown, and pool.json carries the claim until then.
                recorded[eni.id] = {**eni_record(eni), "goTool": True}
        nics = [name for eni in used if (name := nic.link_by_mac(eni.mac))]
        return ProvisionResult(
            ips=ips,
            secondary_nics=nics,
            vpc_cidrs=[self.vpc_cidr(info.vpc_id)],
            eni_ids=[eni.id for eni in used],
            cloud={
                "instanceId": info.instance_id,
                "vpcId": info.vpc_id,
                "enis": _eni_records(recorded),
                "adoptedEnis": [eni.id for eni in used if eni.id not in recorded],
            },
        )

    def pool_after(
        self, state: PoolState, request: NodeRequest, *, adopt: bool
    ) -> set[IPv4Address]:
        if adopt:  # adopt takes the lowest addresses the ENIs hold
            return set(sorted(state.pool_ips)[: request.pool_size])
        enis = list(eni_steps.recorded_enis(state.cloud).values())
        return kept_ips(enis, request.node_name, state.pool_ips, request.pool_size)

    def vpc_cidr(self, vpc_id: str) -> IPv4Network:
        raw = self._vpc().call("DescribeVpcAttributes", {"VpcId": vpc_id})
        try:
            return IPv4Network(str(raw.get("CidrBlock", "")))
        except ValueError:
            raise CloudError(f"Volcengine VPC {vpc_id}: no usable CidrBlock") from None

    # --- status and teardown ------------------------------------------------------------

    def status(self, state: PoolState) -> list[StatusLine]:
        cloud = state.cloud
        recorded = set(eni_steps.recorded_enis(cloud))
        lines: list[StatusLine] = []
        subnet = cloud.get("subnet") or {}
        if subnet.get("id"):
            found = self._vpc().call("DescribeSubnets", indexed("SubnetIds", [subnet["id"]]))
            lines.append(eni_steps.subnet_status(subnet, found.get("Subnets") or [], "Status"))
        instance_id = str(cloud.get("instanceId") or self._instance().instance_id)
        subnet_id = self._node_subnet_id(cloud, state.network)
        ours, go = self._find_enis(state.node_name, recorded, instance_id, subnet_id)
        go_tool = {
            str(e.get("id"))
            for e in cloud.get("enis") or ()
            if isinstance(e, dict) and e.get("goTool")
        }
        enis = sorted(ours + go, key=lambda e: e.name)
        lines.append(StatusLine("ENIs", str(len(enis))))
        for eni in enis:
            origin = ""
            if eni in go:
                origin = " (made by the Go tool; init or teardown tags it as ours)"
            elif eni.id in go_tool:
                origin = " (made by the Go tool)"
            held = f"{len(eni.secondary)} IPs{origin}"
            lines.append(eni_steps.eni_status(eni.id, eni.name, eni.mac, eni.status, held))
        return lines

    def primary_nic(self) -> str | None:
        return eni_steps.primary_nic(self._instance().mac)

    def fix_host(self, state: PoolState) -> list[str]:
        return []

    def plan_teardown(self, state: PoolState) -> list[str]:
        cloud = state.cloud
        lines = [
            f"detach and delete ENI {e.get('id')} ({e.get('name')}, {len(e.get('ips') or [])} IPs)"
            for e in eni_steps.recorded_enis(cloud).values()
        ]
        lines.append(f"and any other ENI tagged {TAG_NODE}={state.node_name}")
        lines.append(
            f"and any ENI the Go tool made for {state.node_name} ({eni_name(state.node_name, 1)}"
            "... untagged, attached here, in the pool's subnet), tagged as ours first"
        )
        sg = cloud.get("securityGroup") or {}
        if sg.get("ruleCreated"):
            lines.append(f"revoke the VPC ingress rule {sg.get('cidr')} in {sg.get('id')}")
        subnet = cloud.get("subnet") or {}
        if subnet.get("created"):
            lines.append(f"delete subnet {subnet.get('id')} ({subnet.get('cidr')})")
        return lines

    def teardown(self, state: PoolState, record: ResourceRecorder) -> None:
        _Teardown(self, state, record).run()


def _combined(failures: list[tuple[str, Exception]]) -> Exception:
    """One error for several threads' failures, of the first failure's kind: the first in
    full, the others counted here and logged in full at debug."""
    first = failures[0][1]
    if len(failures) == 1:
        return first
    for what, exc in failures:
        log.debug("%s: %s", what, exc)
    kind = type(first) if isinstance(first, CloudError | HostSetupError) else CloudError
    return combined(kind, [f"{what}: {exc}" for what, exc in failures], "")


class _Provision:
    """One run of init. Every create is recorded before the next step, so a crash anywhere
    leaves pool.json naming what exists; a rerun finds it (record or tag) and carries on."""

    def __init__(
        self, platform: VolcenginePlatform, request: NodeRequest, record: ResourceRecorder
    ) -> None:
        self.p = platform
        self.req = request
        self._record = record
        self._lock = threading.Lock()  # ENI threads record concurrently
        prev = request.cloud
        self.subnet: dict[str, Any] = dict(prev.get("subnet") or {})
        self.enis = eni_steps.recorded_enis(prev)

    def _save_eni(self, eni: Eni, *, go_tool: bool = False) -> None:
        with self._lock:
            saved = {**self.enis.get(eni.id, {}), **eni_record(eni)}
            if go_tool:
                saved["goTool"] = True
            self.enis[eni.id] = saved
            self._record({"enis": _eni_records(self.enis)})

    def run(self, targets: list[int]) -> ProvisionResult:
        self.p._on_instance = []  # read afresh by this run
        info = self.p._instance()
        self._record({"instanceId": info.instance_id, "vpcId": info.vpc_id})
        vpc = self.p.vpc_cidr(info.vpc_id)
        if not self.req.subnet.subnet_of(vpc):
            raise CloudError(
                f"--subnet {self.req.subnet} is outside VPC {info.vpc_id} ({vpc}): "
                "pick a free range inside the VPC"
            )
        subnet_id = self._ensure_subnet(info)
        sg_record = self._ensure_rule(info, vpc)
        done = self._ensure_enis(info, subnet_id, sg_record["id"], targets)
        enis = [eni for eni, _ in done]
        cloud = {
            "instanceId": info.instance_id,
            "vpcId": info.vpc_id,
            "subnet": self.subnet,
            "securityGroup": sg_record,
            "enis": _eni_records(self.enis),
        }
        return ProvisionResult(
            ips=pool_ips(enis, self.req.subnet, self.req.gateway),
            secondary_nics=[ifname for _, ifname in done],
            vpc_cidrs=[vpc],
            subnet_id=subnet_id,
            eni_ids=[eni.id for eni in enis],
            cloud=cloud,
        )

    def _ensure_subnet(self, info: InstanceInfo) -> str:
        api, node, cidr = self.p._vpc(), self.req.node_name, self.req.subnet
        subnets = list(api.pages("DescribeSubnets", {"VpcId": info.vpc_id}, "Subnets"))
        # Compared as networks, not strings: "172.20.100.0/24" is "172.20.100.5/24".
        match = next((s for s in subnets if subnet_network(s) == cidr), None)
        if match is not None:
            subnet_id = str(match["SubnetId"])
            created = bool(
                (self.subnet.get("id") == subnet_id and self.subnet.get("created"))
                or tags_of(match).get(TAG_NODE) == node
            )
            if match.get("ZoneId") != info.zone:
                raise CloudError(
                    f"subnet {subnet_id} ({cidr}) is in zone {match.get('ZoneId')} but this "
                    f"instance is in {info.zone}: ENIs need a subnet in the instance's zone"
                )
        else:
            clash = next(
                (s for s in subnets if (n := subnet_network(s)) and n.overlaps(cidr)), None
            )
            if clash is not None:
                raise CloudError(
                    f"--subnet {cidr} overlaps subnet {clash.get('SubnetId')} "
                    f"({clash.get('CidrBlock')}) of VPC {info.vpc_id}: pick a free range"
                )
            params = _subnet_params(info, node, cidr)
            subnet_id = str(api.create("CreateSubnet", params)["SubnetId"])
            created = True
        self.subnet = {"id": subnet_id, "cidr": str(cidr), "created": created}
        self._record({"subnet": self.subnet})
        wait_for(
            lambda: api.call("DescribeSubnets", indexed("SubnetIds", [subnet_id])),
            lambda r: any(s.get("Status") == "Available" for s in r.get("Subnets") or ()),
            what=f"subnet {subnet_id} to become Available",
            policy=self.p._poll,
        )
        return subnet_id

    def _ensure_rule(self, info: InstanceInfo, vpc: IPv4Network) -> dict[str, Any]:
        """The VPC-internal ingress rule the Volcengine docs require, in the instance's own
        security group (the Go tool took the VPC's first group, §9.7 #38)."""
        api, node = self.p._vpc(), self.req.node_name
        sg = self.req.options.get("security_group", "")
        if not sg:
            # kept for _find_enis, a moment later in this same init
            self.p._on_instance = self.p._describe(InstanceId=info.instance_id)
            primary = [e for e in self.p._on_instance if e.primary]
            if not primary or not primary[0].security_groups:
                raise CloudError(
                    f"cannot find the security group of {info.instance_id}'s primary ENI: "
                    "pass --security-group"
                )
            sg = primary[0].security_groups[0]
        perms = api.call("DescribeSecurityGroupAttributes", {"SecurityGroupId": sg})
        rules = [r for r in perms.get("Permissions") or () if isinstance(r, dict)]
        description = f"cocoon-net {node}: VPC-internal traffic"
        covering = [r for r in rules if rule_covers(r, vpc)]
        created = not covering or any(r.get("Description") == description for r in covering)
        if not covering:
            try:
                api.create(
                    "AuthorizeSecurityGroupIngress",
                    {
                        "SecurityGroupId": sg,
                        "Protocol": "all",
                        "PortStart": "-1",
                        "PortEnd": "-1",
                        "CidrIp": str(vpc),
                        "Policy": "accept",
                        "Priority": "1",
                        "Description": description,
                    },
                )
            except CloudConflict:
                # Another node of the fleet added the same rule a moment ago: it covers this
                # node too, and it is that node's, not ours.
                perms = api.call("DescribeSecurityGroupAttributes", {"SecurityGroupId": sg})
                rules = [r for r in perms.get("Permissions") or () if isinstance(r, dict)]
                covering = [r for r in rules if rule_covers(r, vpc)]
                if not covering:
                    raise
                created = any(r.get("Description") == description for r in covering)
        record = {"id": sg, "cidr": str(vpc), "ruleCreated": created}
        self._record({"securityGroup": record})
        return record

    def _ensure_enis(
        self, info: InstanceInfo, subnet_id: str, sg: str, targets: list[int]
    ) -> list[tuple[Eni, str]]:
        """ENI slots 1..len(targets) attached here with their IPs and links up; the ENIs of
        slots beyond them released. In phases, each over all ENIs at once, so a wait is one
        describe per round for all of them."""
        node, here = self.req.node_name, info.instance_id
        ours, go = self.p._find_enis(node, set(self.enis), here, subnet_id)
        for eni in ours + go:
            self._save_eni(eni, go_tool=eni in go)
            if eni.device_id not in ("", here):
                raise CloudError(
                    f"ENI {eni.id} ({eni.name}) is tagged for {node} but attached to "
                    f"{eni.device_id}: detach it there or remove its {TAG_NODE} tag"
                )
        self.p._tag(node, untagged(ours + go))
        by_slot: dict[int, Eni] = {}
        for eni in ours + go:
            slot = slot_of(node, eni.name)
            if slot is not None and slot not in by_slot:
                by_slot[slot] = eni
        for slot, eni in by_slot.items():
            if slot <= len(targets) and eni.subnet_id != subnet_id:
                raise CloudError(
                    f"ENI {eni.id} ({eni.name}) is in subnet {eni.subnet_id}, not {subnet_id}: "
                    "run 'cocoon-net teardown' before changing --subnet"
                )
        failures: list[tuple[str, Exception]] = []
        # What this node made that the pool no longer needs goes first: it may hold the
        # instance's ENI quota that the slots still missing need.
        spare = [eni for slot, eni in by_slot.items() if slot > len(targets)]
        self._each(spare, lambda eni: self._release(eni, here), failures)
        made = self._each(
            [slot for slot in range(1, len(targets) + 1) if slot not in by_slot],
            lambda slot: self._create(subnet_id, sg, slot, targets[slot - 1]),
            failures,
        )
        by_slot.update(made)
        enis = {slot: by_slot[slot] for slot in range(1, len(targets) + 1) if slot in by_slot}
        ids = [eni.id for eni in enis.values()]
        first = TYPICAL_CREATE if made else 0.0
        found = self.p._wait_enis(ids, "to be ready", _settled, first=first)
        to_attach = [e for e in found.values() if e.status == "Available"]
        attached = self._each(to_attach, lambda eni: self._attach(eni, here), failures)
        refused = {eni.id for eni in to_attach} - set(attached)
        ids = [eni_id for eni_id in ids if eni_id not in refused]
        wait = TYPICAL_ATTACH if to_attach else 0.0
        found = self.p._wait_enis(
            ids, f"to attach to {here}", lambda eni: _attached(eni, here), first=wait
        )
        by_id = {eni.id: slot for slot, eni in enis.items()}
        changed = self._each(
            list(found.values()), lambda eni: self._size(eni, targets[by_id[eni.id] - 1]), failures
        )
        if any(changed.values()):
            found = self.p._wait_enis(list(found), "to report its addresses", lambda e: True)
        for eni in found.values():
            self._save_eni(eni)
        links = self._each(
            list(found.values()), lambda eni: eni_steps.link_up(eni.mac, self.p._poll), failures
        )
        if failures:
            raise _combined(failures)
        return [(found[eni_id], links[eni_id]) for eni_id in sorted(found, key=by_id.__getitem__)]

    def _each(
        self, items: list[Any], work: Callable[[Any], Any], failures: list[tuple[str, Exception]]
    ) -> dict[Any, Any]:
        """work(item) for every item in its own thread; failures collected, not raised.
        Returns {slot or ENI id: result} of those that succeeded."""
        done: dict[Any, Any] = {}
        if not items:
            return done
        with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="eni") as pool:
            futures = [(item, pool.submit(work, item)) for item in items]
            for item, future in futures:
                key = item.id if isinstance(item, Eni) else item
                try:
                    done[key] = future.result()
                except (CloudError, HostSetupError) as exc:
                    what = (
                        item.name if isinstance(item, Eni) else eni_name(self.req.node_name, item)
                    )
                    failures.append((what, exc))
        return done

    def _create(self, subnet_id: str, sg: str, slot: int, target: int) -> Eni:
        """A new ENI for slot, with its secondary IPs asked for in the same call."""
        api, name = self.p._vpc(), eni_name(self.req.node_name, slot)
        params = {
            "SubnetId": subnet_id,
            **indexed("SecurityGroupIds", [sg]),
            "NetworkInterfaceName": name,
            "Description": f"cocoon-net VM addresses of node {self.req.node_name}",
            "SecondaryPrivateIpAddressCount": str(target),
            **tag_params({TAG_NODE: self.req.node_name}),
        }
        eni_id = str(api.create("CreateNetworkInterface", params)["NetworkInterfaceId"])
        with self._lock:
            self.enis[eni_id] = {"id": eni_id, "name": name, "mac": "", "ips": []}
            self._record({"enis": _eni_records(self.enis)})
        return Eni(eni_id, name, "Creating", "", "", subnet_id, ())

    def _attach(self, eni: Eni, instance_id: str) -> bool:
        """Ask for the attach; True when it was accepted or its state shows it was. A
        refused attach over the instance's ENI quota deletes the ENI (this node made it and
        cannot use it) and says so."""
        try:
            self.p._vpc().call(
                "AttachNetworkInterface",
                {"NetworkInterfaceId": eni.id, "InstanceId": instance_id},
            )
        except CloudConflict as exc:
            # A retried attach whose first answer was lost finds the ENI Attaching: the
            # wait that follows reads its state and judges.
            log.info("attach of %s answered %s; reading its state", eni.id, exc)
        except CloudQuotaError as exc:
            self._release(eni, instance_id)
            on_instance = self.p._on_instance
            others = [e.id for e in on_instance if not e.primary and e.id not in self.enis]
            raise CloudQuotaError(
                f"{instance_id} takes no more ENIs ({exc}); {eni.id} was deleted. ENIs that are "
                f"not this node's: {', '.join(others) or 'none'}; free one or lower --pool-size"
            ) from None
        return True

    def _release(self, eni: Eni, instance_id: str) -> None:
        self.p._release(eni, instance_id)
        with self._lock:
            self.enis.pop(eni.id, None)
            self._record({"enis": _eni_records(self.enis)})

    def _size(self, eni: Eni, target: int) -> bool:
        """Give eni exactly target secondary IPs; True when that changed anything."""
        api, have = self.p._vpc(), len(eni.secondary)
        if have < target:
            api.create(
                "AssignPrivateIpAddresses",
                {
                    "NetworkInterfaceId": eni.id,
                    "SecondaryPrivateIpAddressCount": str(target - have),
                },
            )
        elif have > target:
            extra = [str(ip) for ip in sorted(eni.secondary)[target:]]
            with contextlib.suppress(CloudNotFound):  # a lost answer: already unassigned
                api.call(
                    "UnassignPrivateIpAddresses",
                    {"NetworkInterfaceId": eni.id, **indexed("PrivateIpAddress", extra)},
                )
        return have != target


def _subnet_params(info: InstanceInfo, node: str, cidr: IPv4Network) -> dict[str, str]:
    return {
        "VpcId": info.vpc_id,
        "ZoneId": info.zone,
        "CidrBlock": str(cidr),
        "SubnetName": f"{node}-vms",
        "Description": f"cocoon-net VM subnet of node {node}",
        **tag_params({TAG_NODE: node}),
    }


def _settled(eni: Eni) -> bool:
    return eni.status in ("Available", "InUse")


def _attached(eni: Eni, instance_id: str) -> bool:
    if eni.device_id not in ("", instance_id):
        raise CloudError(f"ENI {eni.id} is attached to {eni.device_id}, not to {instance_id}")
    if eni.status == "Available":
        # The attach was accepted, then undone by the cloud: say so instead of waiting out
        # the deadline. The ENI stays recorded, so a rerun attaches it again.
        raise CloudError(f"attaching ENI {eni.id} failed (it is Available again); re-run init")
    return eni.status == "InUse"


def _eni_records(enis: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    # A list, so merging into pool.json["cloud"] replaces it whole and a deletion sticks.
    return [dict(e) for e in sorted(enis.values(), key=lambda e: (str(e.get("name")), e["id"]))]


class _Teardown:
    """Remove what init made, every step attempted, each success recorded at once; what
    could not be removed is raised as one CloudError, and a rerun finishes the job."""

    def __init__(
        self, platform: VolcenginePlatform, state: PoolState, record: ResourceRecorder
    ) -> None:
        self.p = platform
        self.state = state
        self._record = record
        self._lock = threading.Lock()
        cloud = state.cloud
        self.enis = eni_steps.recorded_enis(cloud)

    def run(self) -> None:
        cloud, node = self.state.cloud, self.state.node_name
        instance_id = str(cloud.get("instanceId") or self.p._instance().instance_id)
        failures: list[str] = []
        subnet_id = self.p._node_subnet_id(cloud, self.state.network)
        ours, go = self.p._find_enis(node, set(self.enis), instance_id, subnet_id)
        with self._lock:  # forget recorded ENIs that are already gone, learn unrecorded ones
            self.enis = {e.id: self.enis.get(e.id, eni_record(e)) for e in ours}
            self.enis.update({e.id: {**eni_record(e), "goTool": True} for e in go})
            self._record({"enis": _eni_records(self.enis)})
        found = ours + go
        to_tag = untagged(found)
        try:
            self.p._tag(node, to_tag)
        except CloudError as exc:
            # Not one of them is changed before it carries our tag; a rerun tags them again.
            failures.append(
                f"tagging ENIs {', '.join(e.id for e in to_tag)} as ours failed, so they "
                f"were left in place: {exc}"
            )
            found = [eni for eni in found if eni not in to_tag]
        failures += eni_steps.remove_each(found, lambda eni: self._remove_eni(eni, instance_id))
        kept = [str(i) for i in cloud.get("adoptedEnis") or () if str(i) not in self.enis]
        if kept:
            log.info("adopted ENIs %s are not ours: left in place", ", ".join(kept))
        failures += self._remove_rule(cloud.get("securityGroup") or {})
        failures += self._remove_subnet(cloud.get("subnet") or {}, cloud.get("vpcId"))
        if failures:
            for failure in failures:
                log.debug("teardown: %s", failure)
            raise combined(
                CloudError,
                [f"Volcengine teardown incomplete: {failures[0]}", *failures[1:]],
                "re-run 'cocoon-net teardown' to finish",
            )

    def _remove_eni(self, eni: Eni, instance_id: str) -> None:
        self.p._release(eni, instance_id)
        with self._lock:
            self.enis.pop(eni.id, None)
            self._record({"enis": _eni_records(self.enis)})

    def _remove_rule(self, sg: Mapping[str, Any]) -> list[str]:
        if not sg.get("ruleCreated"):
            return []
        try:
            self.p._vpc().call(
                "RevokeSecurityGroupIngress",
                {
                    "SecurityGroupId": str(sg["id"]),
                    "Protocol": "all",
                    "PortStart": "-1",
                    "PortEnd": "-1",
                    "CidrIp": str(sg["cidr"]),
                    "Policy": "accept",
                    "Priority": "1",
                },
            )
        except CloudNotFound:
            pass  # an earlier attempt's answer was lost: the rule is gone
        except CloudError as exc:
            return [f"security group rule in {sg['id']}: {exc}"]
        self._record({"securityGroup": {**sg, "ruleCreated": False}})
        return []

    def _remove_subnet(self, subnet: Mapping[str, Any], vpc_id: Any) -> list[str]:
        subnet_id = str(subnet.get("id") or "")
        api = self.p._vpc()
        if not subnet.get("created") and vpc_id:
            # A crash between CreateSubnet and its record leaves only the tag to go by.
            tagged = [
                s
                for s in api.pages("DescribeSubnets", {"VpcId": str(vpc_id)}, "Subnets")
                if tags_of(s).get(TAG_NODE) == self.state.node_name
            ]
            subnet_id = str(tagged[0]["SubnetId"]) if tagged else ""
        if not subnet_id or not (subnet.get("created") or subnet_id != subnet.get("id", "")):
            return []
        try:
            api.call("DeleteSubnet", {"SubnetId": subnet_id})
        except CloudNotFound:
            pass
        except CloudError as exc:
            return [f"subnet {subnet_id}: {exc}"]
        self._record({"subnet": {}})
        return []


def create(
    environ: Mapping[str, str],
    *,
    retry: RetryPolicy | None = None,
    poll: PollPolicy | None = None,
) -> VolcenginePlatform:
    return VolcenginePlatform(environ, retry=retry, poll=poll)
