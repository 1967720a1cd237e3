"""teardown's steps on EC2: remove what init made and nothing else, each removal recorded at
once, every step attempted; a rerun finishes what one run could not."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cocoon_net.errors import CloudError, CloudNotFound
from cocoon_net.platform import eni_steps
from cocoon_net.platform.aws import plan
from cocoon_net.platform.aws.plan import Eni
from cocoon_net.platform.base import ResourceRecorder
from cocoon_net.state import PoolState

if TYPE_CHECKING:
    from cocoon_net.platform.aws.platform import AwsPlatform

log = logging.getLogger("cocoon_net.platform.aws")


class Teardown:
    """Remove what init made, every step attempted, each success recorded at once; what
    could not be removed is raised as one CloudError, and a rerun finishes the job."""

    def __init__(self, platform: AwsPlatform, state: PoolState, record: ResourceRecorder):
        self.p = platform
        self.state = state
        self._record = record
        self._lock = threading.Lock()
        self.enis = eni_steps.recorded_enis(state.cloud)

    def run(self) -> None:
        cloud, node = self.state.cloud, self.state.node_name
        instance_id = str(cloud.get("instanceId") or self.p.identity().instance_id)
        ours = self.p.our_enis(node, set(self.enis))
        with self._lock:  # forget recorded ENIs that are already gone, learn unrecorded ones
            self.enis = {
                e.id: self.enis.get(e.id) or {"id": e.id, "slot": e.slot or 0} for e in ours
            }
            self._record({"enis": plan.eni_records(self.enis)})
        failures = eni_steps.remove_each(ours, lambda eni: self._remove_eni(eni, instance_id))
        kept = [str(i) for i in cloud.get("adoptedEnis") or () if str(i) not in self.enis]
        if kept:
            log.info("adopted ENIs %s are not ours: left in place", ", ".join(kept))
        failures += self._remove_rule(cloud.get("securityGroup") or self._unrecorded_rule())
        failures += self._remove_subnet(cloud.get("subnet") or {}, cloud.get("vpcId"))
        if failures:
            raise CloudError(
                "AWS teardown incomplete: "
                + "; ".join(failures)
                + " (re-run 'cocoon-net teardown' to finish)"
            )
        self._record({"clientTokens": {}})

    def _remove_eni(self, eni: Eni, instance_id: str) -> None:
        api = self.p.api()

        def detach() -> None:
            if eni.attachment_id and eni.attachment_status != "detaching":
                api.call("DetachNetworkInterface", {"AttachmentId": eni.attachment_id})
            if eni.instance_id:
                with contextlib.suppress(CloudNotFound):
                    self.p.wait_eni(eni.id, "to detach", lambda e: e.status == "available")

        eni_steps.release(
            eni.instance_id,
            instance_id,
            detach,
            lambda: api.call("DeleteNetworkInterface", {"NetworkInterfaceId": eni.id}),
        )
        with self._lock:
            self.enis.pop(eni.id, None)
            self._record({"enis": plan.eni_records(self.enis)})

    def _unrecorded_rule(self) -> dict[str, Any]:
        """A crash between AuthorizeSecurityGroupIngress and its record leaves only the
        rule's description to go by: our rule in any group of the VPC."""
        vpc_id = self.state.cloud.get("vpcId")
        if not vpc_id:
            return {}
        answer = self.p.api().call(
            "DescribeSecurityGroups", {"Filters": [{"Name": "vpc-id", "Values": [str(vpc_id)]}]}
        )
        mark = plan.rule_description(self.state.node_name)
        for group in answer.get("SecurityGroups") or ():
            for perm in group.get("IpPermissions") or ():
                for rng in perm.get("IpRanges") or ():
                    if rng.get("Description") == mark and perm.get("IpProtocol") == "-1":
                        return {"id": group["GroupId"], "cidr": rng["CidrIp"], "ruleCreated": True}
        return {}

    def _remove_rule(self, sg: Mapping[str, Any]) -> list[str]:
        if not sg.get("ruleCreated"):
            return []
        try:
            with contextlib.suppress(CloudNotFound):  # revoked by a run whose answer was lost
                self.p.api().call(
                    "RevokeSecurityGroupIngress",
                    {"GroupId": str(sg["id"]), "IpPermissions": plan.permission(str(sg["cidr"]))},
                )
        except CloudError as exc:
            return [f"security group rule in {sg['id']}: {exc}"]
        self._record({"securityGroup": {**sg, "ruleCreated": False}})
        return []

    def _remove_subnet(self, subnet: Mapping[str, Any], vpc_id: Any) -> list[str]:
        """The recorded subnet when init created it, and any other subnet tagged for this
        node: a crash between CreateSubnet and its record, or a lost answer, leaves only the
        tag to go by. A subnet that existed before init carries no tag of ours and stays."""
        recorded = str(subnet.get("id") or "")
        doomed = [recorded] if recorded and subnet.get("created") else []
        if vpc_id:
            tagged = plan.tagged_for(self.p.subnets(str(vpc_id)), self.state.node_name)
            doomed += [i for s in tagged if (i := str(s["SubnetId"])) not in (*doomed, recorded)]
        failures = []
        for subnet_id in doomed:
            try:
                with contextlib.suppress(CloudNotFound):
                    self.p.api().call("DeleteSubnet", {"SubnetId": subnet_id})
            except CloudError as exc:
                failures.append(f"subnet {subnet_id}: {exc}")
        if not failures:
            self._record({"subnet": {}})
        return failures
