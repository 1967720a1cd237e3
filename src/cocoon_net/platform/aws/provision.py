"""init's steps on EC2, each change recorded in pool.json the moment it is made.

A create that carries a ClientToken gets its token recorded before it is sent: a rerun after
a lost answer sends the same token and EC2 hands back the ENI the first attempt made, even
while DescribeNetworkInterfaces does not show it yet (EC2 is eventually consistent).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cocoon_net.errors import CloudConflict, CloudError, HostSetupError
from cocoon_net.platform import eni_steps
from cocoon_net.platform.aws import plan
from cocoon_net.platform.aws.plan import MODE_PREFIX, Eni, Limits
from cocoon_net.platform.base import NodeRequest, ProvisionResult, ResourceRecorder
from cocoon_net.platform.volc_api import wait_for

if TYPE_CHECKING:
    from cocoon_net.platform.aws.platform import AwsPlatform


class Provision:
    """One run of init; safe to re-run after a failure or crash at any point."""

    def __init__(self, platform: AwsPlatform, request: NodeRequest, record: ResourceRecorder):
        self.p = platform
        self.req = request
        self._record = record
        self._lock = threading.Lock()  # ENI threads record concurrently
        prev = request.cloud
        self.subnet: dict[str, Any] = dict(prev.get("subnet") or {})
        self.enis = eni_steps.recorded_enis(prev)
        # slot -> the token and address count of a create that may have happened
        self.tokens: dict[str, dict[str, Any]] = {
            str(k): dict(v)
            for k, v in (prev.get("clientTokens") or {}).items()
            if isinstance(v, dict)
        }
        self._sg_record: dict[str, Any] = {}

    def _save(self, eni: Eni, ifname: str = "") -> None:
        with self._lock:
            ifname = ifname or str(self.enis.get(eni.id, {}).get("ifname") or "")
            self.enis[eni.id] = plan.eni_record(eni, self.req.subnet, ifname)
            self._record({"enis": plan.eni_records(self.enis)})

    def run(self) -> ProvisionResult:
        ident = self.p.identity()
        self._record({"instanceId": ident.instance_id, "vpcId": ident.vpc_id})
        instance = self.p.instance(ident.instance_id)
        limits = self.p.limits(str(instance.get("InstanceType")))
        targets = plan.unit_targets(self.req.pool_size, limits)  # before any change
        self._record({"limits": limits.record()})
        cidrs = self.p.vpc_cidrs(ident.vpc_id)
        if not any(self.req.subnet.subnet_of(c) for c in cidrs):
            raise CloudError(
                f"--subnet {self.req.subnet} is outside VPC {ident.vpc_id} "
                f"({', '.join(map(str, cidrs))}): pick a free range inside the VPC"
            )
        subnet_id = self._ensure_subnet(ident.vpc_id, ident.zone)
        sg = self._ensure_rule(instance)
        done = self._ensure_enis(ident.instance_id, subnet_id, sg, limits, targets)
        enis = [eni for eni, _ in done]
        return ProvisionResult(
            ips=plan.pool_ips(enis, self.req.subnet, self.req.gateway, self.req.pool_size),
            secondary_nics=[ifname for _, ifname in done],
            vpc_cidrs=cidrs,
            subnet_id=subnet_id,
            eni_ids=[eni.id for eni in enis],
            cloud={
                "instanceId": ident.instance_id,
                "vpcId": ident.vpc_id,
                "limits": limits.record(),
                "subnet": self.subnet,
                "securityGroup": self._sg_record,
                "enis": plan.eni_records(self.enis),
            },
        )

    def _ensure_subnet(self, vpc_id: str, zone: str) -> str:
        """The VPC subnet that is exactly the pool's CIDR: found, or created in the
        instance's zone and tagged for this node. With `--subnet auto` claim_subnet has
        created and recorded it already."""
        cidr, node = self.req.subnet, self.req.node_name
        subnets = self.p.subnets(vpc_id)
        match = next((s for s in subnets if eni_steps.subnet_network(s) == cidr), None)
        recorded = str(self.subnet.get("id") or "") if self.subnet.get("cidr") == str(cidr) else ""
        if match is None and recorded:
            # Created a moment ago and not listed yet (EC2 is eventually consistent):
            # waited for below by its ID, never created twice.
            subnet_id, created = recorded, bool(self.subnet.get("created"))
        elif match is not None:
            subnet_id = str(match["SubnetId"])
            created = bool(
                (recorded == subnet_id and self.subnet.get("created"))
                or plan.tagged_for([match], node)
            )
            if match.get("AvailabilityZone") != zone:
                raise CloudError(
                    f"subnet {subnet_id} ({cidr}) is in {match.get('AvailabilityZone')} but this "
                    f"instance is in {zone}: ENIs need a subnet in the instance's zone"
                )
        else:
            networks = [(s, eni_steps.subnet_network(s)) for s in subnets]
            clash = next((s for s, n in networks if n and n.overlaps(cidr)), None)
            if clash is not None:
                raise CloudError(
                    f"--subnet {cidr} overlaps subnet {clash.get('SubnetId')} "
                    f"({clash.get('CidrBlock')}) of VPC {vpc_id}: pick a free range"
                )
            subnet_id = self.p.create_subnet(vpc_id, zone, cidr, node)
            created = True
        self.subnet = {"id": subnet_id, "cidr": str(cidr), "created": created}
        self._record({"subnet": self.subnet})
        wait_for(
            lambda: self.p.api().call(
                "DescribeSubnets", {"Filters": [{"Name": "subnet-id", "Values": [subnet_id]}]}
            ),
            lambda r: any(s.get("State") == "available" for s in r.get("Subnets") or ()),
            what=f"subnet {subnet_id} to become available",
            policy=self.p.poll,
        )
        return subnet_id

    def _ensure_rule(self, instance: Mapping[str, Any]) -> str:
        """Let the VM subnet into the instance's own security group, which our ENIs get too."""
        sg = self.req.options.get("security_group", "")
        if not sg:
            primary = [
                n
                for n in instance.get("NetworkInterfaces") or ()
                if (n.get("Attachment") or {}).get("DeviceIndex") == 0
            ]
            groups = [g["GroupId"] for n in primary for g in n.get("Groups") or ()]
            groups = groups or [g["GroupId"] for g in instance.get("SecurityGroups") or ()]
            if not groups:
                raise CloudError(
                    f"cannot find the security group of {instance.get('InstanceId')}: "
                    "pass --security-group"
                )
            sg = str(groups[0])
        cidr, api = self.req.subnet, self.p.api()
        answer = api.call("DescribeSecurityGroups", {"GroupIds": [sg]})
        perms = [
            p for g in answer.get("SecurityGroups") or () for p in g.get("IpPermissions") or ()
        ]
        description = plan.rule_description(self.req.node_name)
        covering = [p for p in perms if plan.rule_covers(p, cidr)]
        if not covering:
            # A repeat after a lost answer is refused as a duplicate: the rule is there.
            with contextlib.suppress(CloudConflict):
                api.call(
                    "AuthorizeSecurityGroupIngress",
                    {"GroupId": sg, "IpPermissions": plan.permission(str(cidr), description)},
                )
        created = not covering or any(
            r.get("Description") == description for p in covering for r in p.get("IpRanges") or ()
        )
        self._sg_record = {"id": sg, "cidr": str(cidr), "ruleCreated": created}
        self._record({"securityGroup": self._sg_record})
        return sg

    def _ensure_enis(
        self, instance_id: str, subnet_id: str, sg: str, limits: Limits, targets: list[int]
    ) -> list[tuple[Eni, str]]:
        node = self.req.node_name
        ours = self.p.our_enis(node, set(self.enis))
        by_slot: dict[int, Eni] = {}
        for eni in ours:
            self._save(eni)
            if eni.instance_id not in ("", instance_id):
                raise CloudError(
                    f"ENI {eni.id} is tagged for {node} but attached to {eni.instance_id}: "
                    f"detach it there or remove its {plan.TAG_NODE} tag"
                )
            if eni.slot is not None and eni.slot not in by_slot:
                by_slot[eni.slot] = eni
        with self._lock:  # a token whose ENI is found has done its job
            for slot in by_slot:
                self.tokens.pop(str(slot), None)
            self._record({"clientTokens": dict(self.tokens)})
        # Slots beyond --pool-size keep their ENI with no addresses, so the pool is exactly
        # what was asked for; teardown removes them.
        wanted = dict(enumerate(targets, start=1))
        wanted.update({slot: 0 for slot in by_slot if slot > len(targets)})
        loose = [s for s in wanted if s not in by_slot or not by_slot[s].instance_id]
        here = self.p.describe({"Name": "attachment.instance-id", "Values": [instance_id]})
        # Chosen up front: parallel attaches must not race for the same device index.
        indexes = dict(
            zip(
                loose,
                plan.free_device_indexes((e.device_index for e in here), len(loose)),
                strict=True,
            )
        )
        failures: list[tuple[str, Exception]] = []
        results: dict[int, tuple[Eni, str]] = {}
        with ThreadPoolExecutor(max_workers=len(wanted), thread_name_prefix="eni") as pool:
            futures = {
                slot: pool.submit(
                    self._slot,
                    instance_id,
                    subnet_id,
                    sg,
                    limits.mode,
                    slot,
                    n,
                    by_slot.get(slot),
                    indexes.get(slot, 0),
                )
                for slot, n in wanted.items()
            }
            for slot, future in sorted(futures.items()):
                try:
                    results[slot] = future.result()
                except (CloudError, HostSetupError) as exc:
                    failures.append((plan.eni_name(node, slot), exc))
        if failures:
            first = failures[0][1]
            if len(failures) == 1:
                raise first
            text = "; ".join(f"{what}: {exc}" for what, exc in failures)
            raise (type(first) if isinstance(first, CloudError) else CloudError)(text)
        return [results[slot] for slot in sorted(results)]

    def _create(self, subnet_id: str, sg: str, mode: str, slot: int, target: int) -> Eni:
        node, name = self.req.node_name, plan.eni_name(self.req.node_name, slot)
        with self._lock:
            # A repeat must match the first create in every parameter, or EC2 refuses it
            # (IdempotentParameterMismatch): a rerun asking for another size sends the first
            # count, and the assign step below corrects it.
            pending = self.tokens.setdefault(
                str(slot), {"token": f"cocoon-{uuid.uuid4().hex}", "units": target}
            )
            self._record({"clientTokens": dict(self.tokens)})
        units = int(pending["units"])
        params: dict[str, Any] = {
            "SubnetId": subnet_id,
            "Groups": [sg],
            "Description": f"cocoon-net VM addresses of node {node}",
            "TagSpecifications": [
                {"ResourceType": "network-interface", "Tags": plan.node_tags(node, name, slot)}
            ],
            "ClientToken": str(pending["token"]),
        }
        if units:
            count = "Ipv4PrefixCount" if mode == MODE_PREFIX else "SecondaryPrivateIpAddressCount"
            params[count] = units
        raw = self.p.api().call("CreateNetworkInterface", params)["NetworkInterface"]
        eni = Eni.from_api(raw)
        self._save(eni)
        with self._lock:  # the record names the ENI now: the token has done its job
            self.tokens.pop(str(slot), None)
            self._record({"clientTokens": dict(self.tokens)})
        return self.p.wait_eni(eni.id, "to become available", lambda e: e.status == "available")

    def _slot(
        self,
        instance_id: str,
        subnet_id: str,
        sg: str,
        mode: str,
        slot: int,
        target: int,
        eni: Eni | None,
        device_index: int,
    ) -> tuple[Eni, str]:
        """One ENI from nothing (or from wherever a previous run stopped) to an OS link that is
        up with `target` prefixes or secondary IPs."""
        api = self.p.api()
        if eni is None:
            eni = self._create(subnet_id, sg, mode, slot, target)
        if eni.subnet_id != subnet_id:
            raise CloudError(
                f"ENI {eni.id} is in subnet {eni.subnet_id}, not {subnet_id}: "
                "run 'cocoon-net teardown' before changing --subnet"
            )
        if not eni.instance_id:
            if eni.status != "available":
                eni = self.p.wait_eni(
                    eni.id, "to become available", lambda e: e.status == "available"
                )
            api.call(
                "AttachNetworkInterface",
                {
                    "NetworkInterfaceId": eni.id,
                    "InstanceId": instance_id,
                    "DeviceIndex": device_index,
                },
            )
        if eni.attachment_status != "attached":
            eni = self.p.wait_eni(
                eni.id, f"to attach to {instance_id}", lambda e: e.attachment_status == "attached"
            )
        self._save(eni)
        ips, prefixes = plan.excess(eni, mode, target)
        if ips:
            api.call(
                "UnassignPrivateIpAddresses",
                {"NetworkInterfaceId": eni.id, "PrivateIpAddresses": ips},
            )
        if prefixes:
            api.call(
                "UnassignPrivateIpAddresses",
                {"NetworkInterfaceId": eni.id, "Ipv4Prefixes": prefixes},
            )
        have = eni.units(mode) - (len(prefixes) if mode == MODE_PREFIX else len(ips))
        if have < target:
            count = "Ipv4PrefixCount" if mode == MODE_PREFIX else "SecondaryPrivateIpAddressCount"
            api.call(
                "AssignPrivateIpAddresses", {"NetworkInterfaceId": eni.id, count: target - have}
            )
        if ips or prefixes or have != target:
            eni = self.p.wait_eni(
                eni.id,
                f"to hold {target} {mode} units",
                lambda e: plan.excess(e, mode, target) == ([], []) and e.units(mode) == target,
            )
        ifname = eni_steps.link_up(eni.mac, self.p.poll)
        self._save(eni, ifname)
        return eni, ifname
