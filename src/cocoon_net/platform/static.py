"""The `static` platform: the operator's network already routes --subnet to this node.

Bare metal, on-prem and labs. There is nothing to create or remove in a cloud: the pool is the
subnet's first addresses, and masquerading is skipped only for the --vpc-cidr ranges the
operator names.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

from cocoon_net import config
from cocoon_net.errors import UsageError
from cocoon_net.node import nic
from cocoon_net.platform.base import NodeRequest, ProvisionResult, ResourceRecorder, StatusLine
from cocoon_net.state import PoolState


class StaticPlatform:
    name = "static"

    def provision(self, request: NodeRequest, record: ResourceRecorder) -> ProvisionResult:
        return self.adopt(request)

    def claim_subnet(self, request: NodeRequest, record: ResourceRecorder) -> IPv4Network:
        raise UsageError(
            "--subnet auto needs a cloud that tells nodes' subnets apart (gke, volcengine); "
            "give the static platform a --subnet"
        )

    def adopt(self, request: NodeRequest) -> ProvisionResult:
        return ProvisionResult(
            ips=config.first_hosts(request.subnet, request.gateway, request.pool_size)
        )

    def pool_after(
        self, state: PoolState, request: NodeRequest, *, adopt: bool
    ) -> set[IPv4Address]:
        return set(self.adopt(request).ips)

    def status(self, state: PoolState) -> list[StatusLine]:
        return [StatusLine("Cloud", "none (static: the network routes the subnet here)")]

    def plan_teardown(self, state: PoolState) -> list[str]:
        return []

    def teardown(self, state: PoolState, record: ResourceRecorder) -> None:
        return None

    def primary_nic(self) -> str | None:
        return nic.primary_nic()

    def fix_host(self, state: PoolState) -> list[str]:
        return []


def create(environ: Mapping[str, str]) -> StaticPlatform:
    return StaticPlatform()
