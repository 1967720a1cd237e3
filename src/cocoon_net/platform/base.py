"""The contract every platform (gke, volcengine, aws, static) fulfils.

A platform turns a validated NodeRequest into addresses the network routes to this node
(provision), finds them when they already exist (adopt), reports them (status) and removes
exactly what it created (teardown). Cloud resource IDs are handed to a ResourceRecorder the
moment they exist, so pool.json always lists what a crashed init left behind and a rerun of
init or teardown can pick up from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from cocoon_net.state import PoolState

# Merges a platform's record of created resources into pool.json["cloud"] and saves it
# durably before returning. Platforms call it after every create and every delete.
ResourceRecorder = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class NodeRequest:
    """What init/adopt were asked for, already validated (see config.py)."""

    node_name: str
    subnet: IPv4Network
    gateway: IPv4Address
    pool_size: int
    primary_nic: str  # the host's primary NIC, resolved by the caller
    cloud: Mapping[str, Any] = field(default_factory=dict)  # what a previous run recorded
    options: Mapping[str, str] = field(default_factory=dict)  # platform flags, e.g. security group


@dataclass
class ProvisionResult:
    ips: list[IPv4Address]
    secondary_nics: list[str] = field(default_factory=list)
    vpc_cidrs: list[IPv4Network] = field(default_factory=list)  # reached without masquerade
    mtu: int | None = None  # the VPC's MTU where the platform knows it
    alias_range_name: str = ""
    subnet_id: str = ""
    eni_ids: list[str] = field(default_factory=list)
    cloud: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusLine:
    label: str
    value: str


class Platform(Protocol):
    name: str

    def provision(self, request: NodeRequest, record: ResourceRecorder) -> ProvisionResult:
        """Create or reuse the cloud side; safe to re-run after any failure."""
        ...

    def claim_subnet(self, request: NodeRequest, record: ResourceRecorder) -> IPv4Network:
        """--subnet auto: a block of request.subnet's size that the cloud guarantees no
        other node holds, claimed in the cloud itself (found again by a re-run)."""
        ...

    def adopt(self, request: NodeRequest) -> ProvisionResult:
        """Describe a cloud side that already exists; changes nothing in the cloud."""
        ...

    def pool_after(
        self, state: PoolState, request: NodeRequest, *, adopt: bool
    ) -> set[IPv4Address]:
        """The addresses of state's pool that provision (adopt, when adopt) of request keeps,
        foreseen from pool.json alone: a shrink is checked against the leases before any
        cloud call."""
        ...

    def status(self, state: PoolState) -> list[StatusLine]:
        """What the cloud says about this node's resources."""
        ...

    def plan_teardown(self, state: PoolState) -> list[str]:
        """One line per cloud change teardown would make, for --dry-run."""
        ...

    def teardown(self, state: PoolState, record: ResourceRecorder) -> None:
        """Remove what provision created (never anything else); attempt every step and
        raise one CloudError listing all failures. Safe to re-run."""
        ...

    def primary_nic(self) -> str | None:
        """The host interface that carries the node's VPC traffic (never a guessed name)."""
        ...

    def fix_host(self, state: PoolState) -> list[str]:
        """Undo what the cloud's own agents do to the host against us (the GCE guest agent's
        local route for the alias range). The daemon calls it at start, on every netlink
        event and periodically; returns what it changed."""
        ...
