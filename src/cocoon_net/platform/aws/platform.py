"""The `aws` platform: a VM subnet in the instance's VPC and zone, secondary ENIs in it, and
their /28 prefixes (Nitro instances) or secondary IPs (others).

What init makes, in order, each recorded in pool.json["cloud"] the moment it exists:

1. the VM subnet (`--subnet`): reused when the VPC has exactly it, else created as
   `<node>-vms` in the instance's zone, tagged `cocoon-net:node=<node>`; with `--subnet
   auto`, created in the first free block of the VPC (claim_subnet), found again by its tag;
2. an ingress rule for every protocol from the VM subnet in the instance's security group
   (or `--security-group`), when no rule already lets it in;
3. ENIs `<node>-eni-<n>` tagged for this node, as many as the pool needs at the limits
   DescribeInstanceTypes gives for this instance type, each created with its addresses,
   attached and brought up by MAC in its own thread.

Source/destination checking stays on: every VM address is assigned to the ENI it leaves by.
"Ours" is tagged for this node or recorded in pool.json; nothing else is reused or touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cocoon_net.errors import CloudConflict, CloudError, CloudQuotaError, CloudTimeout
from cocoon_net.node import nic
from cocoon_net.platform import eni_steps
from cocoon_net.platform.aws import imds, plan
from cocoon_net.platform.aws.ec2 import Ec2Api
from cocoon_net.platform.aws.plan import TAG_NODE, Eni, Limits
from cocoon_net.platform.base import NodeRequest, ProvisionResult, ResourceRecorder, StatusLine
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.platform.volc_api import PollPolicy, wait_for
from cocoon_net.state import PoolState

log = logging.getLogger("cocoon_net.platform.aws")


def tag_filter(node: str) -> dict[str, Any]:
    return {"Name": f"tag:{TAG_NODE}", "Values": [node]}


class AwsPlatform:
    name = "aws"

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
    ) -> None:
        self._environ = dict(environ)
        self.retry = retry
        self.poll = poll or PollPolicy()
        self._identity: imds.Identity | None = None
        self._api: Ec2Api | None = None

    # Metadata and the SDK are reached on first use: plan_teardown needs neither, and a
    # command that never calls EC2 never imports botocore.
    def identity(self) -> imds.Identity:
        if self._identity is None:
            self._identity = imds.read_identity(imds.endpoint(self._environ))
        return self._identity

    def api(self) -> Ec2Api:
        if self._api is None:
            region = self._environ.get("AWS_REGION") or self.identity().region
            self._api = Ec2Api.connect(self._environ, region=region, retry=self.retry)
        return self._api

    # --- reads -----------------------------------------------------------------------------

    def describe(self, *filters: Mapping[str, Any]) -> list[Eni]:
        return [
            Eni.from_api(raw)
            for raw in self.api().pages(
                "DescribeNetworkInterfaces", {"Filters": list(filters)}, "NetworkInterfaces"
            )
        ]

    def describe_ids(self, ids: list[str]) -> list[Eni]:
        """The ENIs of ids that exist and are visible yet; a filter, unlike
        NetworkInterfaceIds, answers a missing ID with nothing instead of an error."""
        if not ids:
            return []
        return self.describe({"Name": "network-interface-id", "Values": ids})

    def wait_eni(self, eni_id: str, what: str, done: Callable[[Eni], bool]) -> Eni:
        """Poll until the ENI is visible and done(eni): EC2 is eventually consistent, so a
        just-created ENI may be missing from the first answers."""

        def fetch() -> Eni | None:
            found = self.describe_ids([eni_id])
            return found[0] if found else None

        eni = wait_for(
            fetch,
            lambda e: e is not None and done(e),
            what=f"ENI {eni_id} {what}",
            policy=self.poll,
        )
        assert eni is not None
        return eni

    def our_enis(self, node: str, recorded: set[str]) -> list[Eni]:
        """Ours: tagged for node anywhere, or recorded by an earlier run and still there."""
        tagged = self.describe(tag_filter(node))
        known = {eni.id for eni in tagged}
        extra = self.describe_ids(sorted(recorded - known))
        return [eni for eni in tagged + extra if plan.is_ours(eni, node, recorded)]

    def instance(self, instance_id: str) -> Mapping[str, Any]:
        answer = self.api().call("DescribeInstances", {"InstanceIds": [instance_id]})
        for reservation in answer.get("Reservations") or ():
            for raw in reservation.get("Instances") or ():
                return dict(raw)
        raise CloudError(f"EC2 DescribeInstances: instance {instance_id} not found")

    def limits(self, instance_type: str) -> Limits:
        answer = self.api().call("DescribeInstanceTypes", {"InstanceTypes": [instance_type]})
        types = answer.get("InstanceTypes") or []
        if not types:
            raise CloudError(f"EC2 DescribeInstanceTypes: no entry for {instance_type}")
        return plan.limits_from(types[0])

    def vpc_cidrs(self, vpc_id: str) -> list[IPv4Network]:
        answer = self.api().call("DescribeVpcs", {"VpcIds": [vpc_id]})
        vpcs = answer.get("Vpcs") or []
        if not vpcs:
            raise CloudError(f"EC2 DescribeVpcs: VPC {vpc_id} not found")
        return plan.vpc_cidrs(vpcs[0])

    def subnets(self, vpc_id: str) -> list[Mapping[str, Any]]:
        return list(
            self.api().pages(
                "DescribeSubnets", {"Filters": [{"Name": "vpc-id", "Values": [vpc_id]}]}, "Subnets"
            )
        )

    def create_subnet(self, vpc_id: str, zone: str, cidr: IPv4Network, node: str) -> str:
        """CreateSubnet takes no ClientToken: the tag it is created with is what finds it
        again after a lost answer or a crash, and what marks it as ours to delete."""
        answer = self.api().call(
            "CreateSubnet",
            {
                "VpcId": vpc_id,
                "CidrBlock": str(cidr),
                "AvailabilityZone": zone,
                "TagSpecifications": [
                    {"ResourceType": "subnet", "Tags": plan.node_tags(node, f"{node}-vms")}
                ],
            },
        )
        return str(answer["Subnet"]["SubnetId"])

    # --- the Platform contract -------------------------------------------------------------

    def provision(self, request: NodeRequest, record: ResourceRecorder) -> ProvisionResult:
        from cocoon_net.platform.aws.provision import Provision

        return Provision(self, request, record).run()

    def claim_subnet(self, request: NodeRequest, record: ResourceRecorder) -> IPv4Network:
        """The subnet tagged for this node in the instance's VPC, else the first block of the
        VPC's CIDRs that no subnet overlaps, created in the instance's zone. EC2 refuses a
        subnet that overlaps another (InvalidSubnet.Conflict), listed yet or not: a node
        that was faster holds the block, and the next one is tried."""
        ident, node, prefix = self.identity(), request.node_name, request.subnet.prefixlen
        subnets = self.subnets(ident.vpc_id)
        mine = sorted(
            (s for s in plan.tagged_for(subnets, node) if eni_steps.subnet_network(s)),
            key=lambda s: (s.get("AvailabilityZone") != ident.zone, str(s.get("CidrBlock"))),
        )
        if mine:
            return self._claimed(record, ident.vpc_id, mine[0]["SubnetId"], mine[0]["CidrBlock"])
        cidrs = self.vpc_cidrs(ident.vpc_id)
        taken = [n for s in subnets if (n := eni_steps.subnet_network(s))]
        for block in plan.free_blocks(cidrs, taken, prefix):
            try:
                subnet_id = self.create_subnet(ident.vpc_id, ident.zone, block, node)
            except CloudConflict as exc:
                log.info("%s was taken meanwhile (%s); trying the next block", block, exc)
                continue
            except CloudTimeout:
                # The answer was lost, not necessarily the subnet: look once by its tag.
                again = plan.tagged_for(self.subnets(ident.vpc_id), node)
                if not again:
                    raise
                return self._claimed(
                    record, ident.vpc_id, again[0]["SubnetId"], again[0]["CidrBlock"]
                )
            return self._claimed(record, ident.vpc_id, subnet_id, block)
        raise CloudQuotaError(
            f"VPC {ident.vpc_id} ({', '.join(map(str, cidrs))}) has no free /{prefix} left "
            "for --subnet auto: pass a smaller --subnet-prefix or a --subnet"
        )

    @staticmethod
    def _claimed(record: ResourceRecorder, vpc_id: str, subnet_id: Any, cidr: Any) -> IPv4Network:
        network = IPv4Network(str(cidr), strict=False)
        subnet = {"id": str(subnet_id), "cidr": str(network), "created": True}
        record({"vpcId": vpc_id, "subnet": subnet})
        return network

    def adopt(self, request: NodeRequest) -> ProvisionResult:
        """The pool is the addresses (secondary IPs and prefixes) inside --subnet that this
        instance's non-primary ENIs hold. Any ENI holding some must be attached here and not
        tagged for another node, or adopt refuses before anything is recorded."""
        ident, node, subnet = self.identity(), request.node_name, request.subnet
        holding = [
            eni
            for eni in self.describe({"Name": "vpc-id", "Values": [ident.vpc_id]})
            if eni.device_index != 0 and any(ip in subnet for ip in eni.addresses())
        ]
        for eni in holding:
            refusal = plan.adopt_refusal(eni, node, ident.instance_id, subnet)
            if refusal is not None:
                raise CloudError(refusal)
        ips = plan.pool_ips(holding, subnet, request.gateway, request.pool_size)
        if not ips:
            raise CloudError(
                f"no secondary IPs or prefixes inside {subnet} on the ENIs of "
                f"{ident.instance_id}: nothing to adopt (run 'cocoon-net init' to create them)"
            )
        used = [eni for eni in holding if set(eni.addresses()) & set(ips)]
        recorded = set(eni_steps.recorded_enis(request.cloud))
        ours = [eni for eni in used if plan.is_ours(eni, node, recorded)]
        nics = {eni.id: nic.link_by_mac(eni.mac) or "" for eni in used}
        return ProvisionResult(
            ips=ips,
            secondary_nics=[name for name in nics.values() if name],
            vpc_cidrs=self.vpc_cidrs(ident.vpc_id),
            eni_ids=[eni.id for eni in used],
            cloud={
                "instanceId": ident.instance_id,
                "vpcId": ident.vpc_id,
                "enis": [plan.eni_record(e, subnet, nics[e.id]) for e in ours],
                "adoptedEnis": [eni.id for eni in used if eni not in ours],
            },
        )

    def pool_after(
        self, state: PoolState, request: NodeRequest, *, adopt: bool
    ) -> set[IPv4Address]:
        limits = state.cloud.get("limits") or {}
        if adopt or not limits:  # adopt takes the lowest addresses the ENIs hold
            return set(sorted(state.pool_ips)[: request.pool_size])
        recorded = Limits(
            str(limits["instanceType"]),
            int(limits["maxEnis"]),
            int(limits["addressesPerEni"]),
            str(limits["mode"]),
        )
        targets = plan.unit_targets(request.pool_size, recorded)
        enis = list(eni_steps.recorded_enis(state.cloud).values())
        return plan.kept_ips(enis, targets, recorded.mode, state.pool_ips, request.pool_size)

    def status(self, state: PoolState) -> list[StatusLine]:
        cloud = state.cloud
        lines: list[StatusLine] = []
        limits = cloud.get("limits") or {}
        if limits:
            lines.append(
                StatusLine(
                    "InstanceType",
                    f"{limits.get('instanceType')} ({limits.get('maxEnis')} ENIs x "
                    f"{limits.get('addressesPerEni')} addresses; {limits.get('mode')} mode)",
                )
            )
        subnet = cloud.get("subnet") or {}
        if subnet.get("id"):
            found = self.api().call(
                "DescribeSubnets", {"Filters": [{"Name": "subnet-id", "Values": [subnet["id"]]}]}
            )
            lines.append(eni_steps.subnet_status(subnet, found.get("Subnets") or [], "State"))
        recorded = set(eni_steps.recorded_enis(cloud))
        enis = sorted(self.our_enis(state.node_name, recorded), key=lambda e: (e.slot or 0, e.id))
        lines.append(StatusLine("ENIs", str(len(enis))))
        for eni in enis:
            name = plan.eni_name(state.node_name, eni.slot or 0)
            held = f"{len(eni.prefixes)} prefixes, {len(eni.secondary)} IPs"
            lines.append(eni_steps.eni_status(eni.id, name, eni.mac, eni.status, held))
        return lines

    def primary_nic(self) -> str | None:
        return eni_steps.primary_nic(self.identity().mac)

    def fix_host(self, state: PoolState) -> list[str]:
        return []

    def plan_teardown(self, state: PoolState) -> list[str]:
        cloud = state.cloud
        lines = [
            f"detach and delete ENI {e.get('id')} (slot {e.get('slot')}, "
            f"{len(e.get('prefixes') or [])} prefixes, {len(e.get('ips') or [])} IPs)"
            for e in eni_steps.recorded_enis(cloud).values()
        ]
        lines.append(f"and any other ENI tagged {TAG_NODE}={state.node_name}")
        sg = cloud.get("securityGroup") or {}
        if sg.get("ruleCreated"):
            lines.append(f"revoke the ingress rule from {sg.get('cidr')} in {sg.get('id')}")
        subnet = cloud.get("subnet") or {}
        if subnet.get("created"):
            lines.append(f"delete subnet {subnet.get('id')} ({subnet.get('cidr')})")
        lines.append(f"and any other subnet tagged {TAG_NODE}={state.node_name}")
        return lines

    def teardown(self, state: PoolState, record: ResourceRecorder) -> None:
        from cocoon_net.platform.aws.teardown import Teardown

        Teardown(self, state, record).run()
