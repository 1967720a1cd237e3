"""The `gke` platform: a routed alias IP range on nic0 of a GCE/GKE VM, over Compute REST.

provision, in order (each step reads the cloud first, so a rerun continues where a crash or a
failure stopped, and a second run changes nothing):
  1. metadata: instance name, zone, project, nic0 MAC and MTU;
  2. instances.get: nic0's subnetwork URL (its own project: the host project under Shared VPC);
  3. subnetworks.get: reuse the shared range `cocoon-pods` when it covers --subnet, refuse when
     it does not (before any change), create it at --subnet when absent;
  4. updateNetworkInterface: add `cocoon-pods:<--subnet>` to nic0, keeping every other alias;
  5. the guest agent: turn its alias routes off in its config and delete the local route.
Everything teardown needs is recorded before the change that needs undoing is made.

With `--subnet auto`, claim_subnet runs first: nic0's `cocoon-pods` block if it holds one,
else the first block of the fleet range (created at --range-cidr when absent) that the cloud
lets nic0 add; Compute refuses a block another instance holds, so nodes never share one. The
last node's teardown removes that fleet range (the cloud refuses while an alias is in it).

Ownership is a record, never a guess. init records `aliasOwned: true` for `cocoon-pods:<subnet>`
before it adds it; adopt records the alias it found with `aliasOwned: false`. teardown removes
an alias only when the record says it is ours, and restores the agent config; the shared range
is left alone (other nodes' aliases live in it; the operator owns it).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cocoon_net import config
from cocoon_net.errors import (
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CocoonError,
    HostSetupError,
    StateError,
    UsageError,
)
from cocoon_net.fsutil import remove_file
from cocoon_net.node import nic as host_nic
from cocoon_net.platform import gce_compute, gce_metadata, localroute
from cocoon_net.platform.base import NodeRequest, ProvisionResult, ResourceRecorder, StatusLine
from cocoon_net.platform.gce_compute import NIC, RANGE_NAME, Compute, Nic, SubnetRef
from cocoon_net.platform.gce_metadata import InstanceInfo, Metadata
from cocoon_net.platform.http import HttpClient, RetryPolicy
from cocoon_net.state import PoolState

log = logging.getLogger("cocoon_net.platform.gke")


class GkePlatform:
    name = "gke"

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        operation_deadline: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.environ = dict(environ)
        self.agent_config = localroute.agent_config_path(environ)
        self.go_cron = localroute.go_cron_path(environ)
        self._timeout = timeout
        self._retry = retry
        self._operation_deadline = operation_deadline
        self._sleep = sleep
        self._clock = clock
        self._metadata: Metadata | None = None
        self._compute: Compute | None = None

    # Clients are built on first use: `status` of another platform and `--help` never pay
    # for importing requests and google-auth.
    @property
    def metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = Metadata(self.environ, sleep=self._sleep, clock=self._clock)
        return self._metadata

    @property
    def compute(self) -> Compute:
        if self._compute is None:
            auth = gce_metadata.BearerAuth(gce_metadata.token_source(self.environ, self.metadata))
            http = HttpClient(
                service="Compute Engine",
                timeout=self._timeout,
                retry=self._retry,
                sign=auth.sign,
                classify=auth.classify,
                auth_hint=gce_compute.AUTH_HINT,
                sleep=self._sleep,
                clock=self._clock,
            )
            base = self.environ.get(gce_compute.ENV_COMPUTE_URL) or gce_compute.DEFAULT_COMPUTE_URL
            self._compute = Compute(
                http,
                base,
                operation_deadline=self._operation_deadline,
                sleep=self._sleep,
                clock=self._clock,
            )
        return self._compute

    # ------------------------------------------------------------------ Platform

    def provision(self, request: NodeRequest, record: ResourceRecorder) -> ProvisionResult:
        subnet = request.subnet
        inst = self.metadata.instance()
        record(_where(inst, subnet))
        nic = self.compute.get_nic(inst.project, inst.zone, inst.name)
        ref = SubnetRef.from_url(nic.subnetwork)
        subnetwork = self._ensure_range(ref, subnet, record)
        self._ensure_alias(inst, subnet)
        agent = self._quiet_guest_agent(request, subnet, record)
        return ProvisionResult(
            ips=config.first_hosts(subnet, request.gateway, request.pool_size),
            vpc_cidrs=_vpc_cidrs(subnetwork),
            mtu=inst.mtu,
            alias_range_name=RANGE_NAME,
            subnet_id=ref.path,
            cloud={**_where(inst, subnet), "subnetwork": ref.path, **agent, **_fleet(request)},
        )

    def claim_subnet(self, request: NodeRequest, record: ResourceRecorder) -> IPv4Network:
        """The block of the fleet range `cocoon-pods` that nic0 holds, else the first one the
        cloud lets nic0 add: it refuses a block another instance holds, so nodes racing for
        one end with different blocks. The range is created at --range-cidr when absent."""
        inst = self.metadata.instance()
        nic = self.compute.get_nic(inst.project, inst.zone, inst.name)
        mine = gce_compute.held_block(nic.aliases, RANGE_NAME)
        if mine is not None:
            return mine
        ref = SubnetRef.from_url(nic.subnetwork)
        fleet = self._fleet_range(ref, request.options.get("range_cidr", ""), record)
        prefix = request.subnet.prefixlen
        if prefix < fleet.prefixlen:
            raise UsageError(f"--subnet-prefix {prefix} is larger than range {RANGE_NAME}={fleet}")
        taken = self._held_elsewhere(inst, ref)
        for block in fleet.subnets(new_prefix=prefix):
            if any(block.overlaps(net) for net in taken):
                continue
            try:
                self._ensure_alias(inst, block)
            except gce_compute.AddressInUse:
                log.info("%s is held by another instance; trying the next block", block)
                continue
            record({"fleetRange": str(fleet)})
            return block
        raise CloudQuotaError(
            f"every /{prefix} of range {RANGE_NAME}={fleet} is held by another instance: "
            "widen the range or tear down unused nodes"
        )

    def _held_elsewhere(self, inst: InstanceInfo, ref: SubnetRef) -> list[IPv4Network]:
        """The alias blocks instances of our project hold on the subnetwork: skipped without
        a try. Only a hint (instances of other service projects are not listed, and the list
        ages at once): the cloud's refusal stays the arbiter. Without the permission to
        list, every block is simply tried in order."""
        try:
            return self.compute.aliases_in(inst.project, ref.path)
        except CloudError as exc:
            log.info("cannot list the instances' aliases, trying blocks in order: %s", exc)
            return []

    def _fleet_range(self, ref: SubnetRef, wanted: str, record: ResourceRecorder) -> IPv4Network:
        subnetwork = self.compute.get_subnetwork(ref)
        current = subnetwork.secondary_range(RANGE_NAME)
        if current is None and not wanted:
            raise UsageError(
                f"subnet {ref.name} has no secondary range {RANGE_NAME} for --subnet auto: "
                "pass --range-cidr (e.g. a /16) and the first node creates it"
            )
        if current is not None and wanted and IPv4Network(current) != IPv4Network(wanted):
            raise UsageError(
                f"--range-cidr {wanted} differs from the existing range {RANGE_NAME}={current} "
                f"of {ref.name}: pass {current} or leave --range-cidr out"
            )
        if current is None:
            subnetwork = self._ensure_range(ref, IPv4Network(wanted), record)
            current = subnetwork.secondary_range(RANGE_NAME)
        return IPv4Network(str(current))

    def adopt(self, request: NodeRequest) -> ProvisionResult:
        inst = self.metadata.instance()
        nic = self.compute.get_nic(inst.project, inst.zone, inst.name)
        alias = gce_compute.find_alias(nic.aliases, request.subnet)
        if alias is None:
            raise CloudNotFound(
                f"no alias IP range on {NIC} of instance {inst.name} covers {request.subnet} "
                f"(aliases: {_aliases_text(nic)}); run 'cocoon-net init' to create it"
            )
        owned = _adopt_keeps_ours(request.cloud, alias)
        ref = SubnetRef.from_url(nic.subnetwork)
        subnetwork = self.compute.get_subnetwork(ref)
        return ProvisionResult(
            ips=config.first_hosts(request.subnet, request.gateway, request.pool_size),
            vpc_cidrs=_vpc_cidrs(subnetwork),
            mtu=inst.mtu,
            # Empty for an adopted alias, as the Go tool's adopt left it: after a rollback its
            # teardown must not take the operator's range name for ours.
            alias_range_name=alias.range_name if owned else "",
            subnet_id=ref.path,
            cloud={
                **_where(inst, request.subnet),
                "aliasRangeName": alias.range_name,
                "aliasCidr": alias.cidr,
                "aliasOwned": owned,
                "subnetwork": ref.path,
            },
        )

    def pool_after(
        self, state: PoolState, request: NodeRequest, *, adopt: bool
    ) -> set[IPv4Address]:
        # The alias covers the whole subnet: the pool is its first addresses either way.
        return set(config.first_hosts(request.subnet, request.gateway, request.pool_size))

    def status(self, state: PoolState) -> list[StatusLine]:
        inst = self.metadata.instance()
        nic = self.compute.get_nic(inst.project, inst.zone, inst.name)
        used = alias_record(state)
        if used is None:  # adopted by the Go tool, which kept no name: found by its CIDR
            found = gce_compute.find_alias(nic.aliases, state.network)
            text = f"{found} present" if found else f"none covering {state.subnet} on {NIC}"
            return [StatusLine("Aliases", _aliases_text(nic)), StatusLine("Alias", text + _ADOPTED)]
        present = gce_compute.plan_alias_remove(nic.aliases, used.name, used.cidr) is not None
        return [
            StatusLine("Aliases", _aliases_text(nic)),
            StatusLine(
                "Alias",
                f"{used} "
                + ("present" if present else f"MISSING from {NIC}")
                + (" (ours)" if used.owned else _ADOPTED),
            ),
        ]

    def plan_teardown(self, state: PoolState) -> list[str]:
        used = alias_record(state)
        where = state.cloud.get("instance") or "this instance"
        if used is not None and used.owned:
            lines = [f"remove alias {used} from {NIC} of {where} (other aliases kept)"]
        else:
            lines = [f"keep alias {used or state.subnet} on {NIC}: adopted, not ours"]
        if _agent_to_restore(state.cloud):
            lines.append(f"restore [IpForwarding] ip_aliases in {self.agent_config}")
        if localroute.is_go_cron_for(self.go_cron, state.network):
            lines.append(f"remove {self.go_cron}, the Go tool's reboot fix for this pool")
        remove, fleet = _range_to_remove(state.cloud)
        if remove:
            lines.append(
                f"remove range {RANGE_NAME}{'=' + str(fleet) if fleet else ''} if no instance "
                "uses it any more (the last node's teardown does; the cloud refuses while any "
                "alias is in it)"
            )
        else:
            lines.append(
                f"keep range {RANGE_NAME} (not claimed with --subnet auto; --remove-range "
                "removes it once no instance uses it)"
            )
        return lines

    def teardown(self, state: PoolState, record: ResourceRecorder) -> None:
        failures: list[str] = []
        used = alias_record(state)
        if used is not None and used.owned:
            try:
                inst = self.metadata.instance()
                self._rmw_aliases(
                    inst,
                    lambda aliases: gce_compute.plan_alias_remove(aliases, used.name, used.cidr),
                )
                record({"aliasRemoved": True})
            except CocoonError as exc:
                failures.append(str(exc))
        else:
            log.info(
                "alias %s was adopted, not created by cocoon-net: left on %s",
                used or f"covering {state.subnet}",
                NIC,
            )
        if _agent_to_restore(state.cloud):
            try:
                localroute.set_agent_ip_aliases(
                    self.agent_config, state.cloud["agentIpAliasesBefore"]
                )
                record({"agentConfigRestored": True})
            except CocoonError as exc:
                failures.append(str(exc))
        try:
            # The Go tool's init wrote it and its teardown removed it; the daemon's route
            # watch does its job now.
            if localroute.is_go_cron_for(self.go_cron, state.network):
                remove_file(self.go_cron)
                log.info("removed %s, the Go tool's reboot fix for this pool", self.go_cron)
        except CocoonError as exc:
            failures.append(str(exc))
        remove, fleet = _range_to_remove(state.cloud)
        if remove and not failures:
            try:
                self._remove_fleet_range(state, fleet)
            except CocoonError as exc:
                failures.append(str(exc))
        if failures:
            raise CloudError("gke teardown incomplete: " + " | ".join(failures))

    def _remove_fleet_range(self, state: PoolState, fleet: IPv4Network | None) -> None:
        """The last node of a --subnet auto fleet removes the range (fleet: its CIDR, or
        None for whatever the range is, on --remove-range); while any instance holds an
        alias in it the cloud refuses, and the range stays for them."""
        ref = SubnetRef.from_url(str(state.cloud.get("subnetwork", "")))
        for _ in range(gce_compute.FINGERPRINT_ATTEMPTS):
            subnetwork = self.compute.get_subnetwork(ref)
            current = subnetwork.secondary_range(RANGE_NAME)
            if current is None or fleet not in (None, IPv4Network(current)):
                log.info("range %s=%s is gone already", RANGE_NAME, fleet)
                return
            try:
                self.compute.patch_secondary_ranges(
                    subnetwork, gce_compute.without_range(subnetwork, RANGE_NAME)
                )
            except CloudConflict:
                continue  # the subnetwork changed meanwhile: read again
            except CloudError as exc:
                if "resourceInUseByAnotherResource" not in str(exc):
                    raise
                log.info("range %s=%s kept: other instances still use it", RANGE_NAME, fleet)
                return
            log.info("removed range %s=%s: no instance used it any more", RANGE_NAME, fleet)
            return

    # ------------------------------------------------------------------ steps

    def fix_host(self, state: PoolState) -> list[str]:
        # The guest agent re-adds `local <alias range>` whenever it resyncs.
        return localroute.remove_guest_agent_routes(state.network)

    def primary_nic(self) -> str:
        """The host interface with nic0's MAC from metadata, else the default route's device
        (never a fixed 'ens4': newer images name it differently)."""
        name = host_nic.link_by_mac(self.metadata.instance().mac) or host_nic.primary_nic()
        if not name:
            raise HostSetupError(
                f"cannot tell which interface is {NIC}: no link has its metadata MAC and there "
                "is no default route; pass --primary-nic"
            )
        return name

    def _ensure_range(
        self, ref: SubnetRef, subnet: IPv4Network, record: ResourceRecorder
    ) -> gce_compute.Subnetwork:
        """The subnetwork, with `cocoon-pods` covering subnet (created when absent)."""
        last: CloudConflict | None = None
        for attempt in range(gce_compute.FINGERPRINT_ATTEMPTS + 1):
            subnetwork = self.compute.get_subnetwork(ref)
            if not gce_compute.plan_range(subnetwork, RANGE_NAME, subnet):
                return subnetwork
            if attempt == gce_compute.FINGERPRINT_ATTEMPTS:
                break
            log.info("creating secondary range %s=%s on %s", RANGE_NAME, subnet, ref.path)
            record({"subnetwork": ref.path, "rangeCreated": str(subnet)})
            try:
                self.compute.patch_secondary_ranges(
                    subnetwork, gce_compute.with_range(subnetwork, RANGE_NAME, subnet)
                )
            except CloudConflict as exc:
                # Another node (or the operator) changed the ranges since our read: read
                # again, and reuse the range if it now exists and covers us (two first inits
                # racing end with one creating and the other reusing).
                log.info("subnetwork changed concurrently, re-reading: %s", exc)
                last = exc
        raise CloudConflict(
            f"secondary ranges of {ref.path} kept changing during "
            f"{gce_compute.FINGERPRINT_ATTEMPTS} read-modify-write rounds; re-run ({last})"
        )

    def _ensure_alias(self, inst: InstanceInfo, subnet: IPv4Network) -> None:
        self._rmw_aliases(
            inst, lambda aliases: gce_compute.plan_alias_add(aliases, RANGE_NAME, subnet)
        )

    def _rmw_aliases(
        self,
        inst: InstanceInfo,
        plan: Callable[[tuple[dict[str, Any], ...]], list[dict[str, Any]] | None],
    ) -> None:
        """Read nic0, compute the new alias list, write it with the fingerprint; on a 412
        (the list changed since our read) start over. Nothing to change: no write at all."""
        last: CloudConflict | None = None
        for _ in range(gce_compute.FINGERPRINT_ATTEMPTS):
            nic = self.compute.get_nic(inst.project, inst.zone, inst.name)
            desired = plan(nic.aliases)
            if desired is None:
                return
            try:
                self.compute.update_aliases(inst.project, inst.zone, inst.name, nic, desired)
                return
            except CloudConflict as exc:
                log.info("%s changed concurrently, re-reading: %s", NIC, exc)
                last = exc
        assert last is not None
        raise CloudConflict(
            f"{NIC} of {inst.name} kept changing during {gce_compute.FINGERPRINT_ATTEMPTS} "
            f"read-modify-write rounds; re-run ({last})"
        )

    def _quiet_guest_agent(
        self, request: NodeRequest, subnet: IPv4Network, record: ResourceRecorder
    ) -> dict[str, Any]:
        """Stop the guest agent from claiming the alias range as local.

        The agent config's original value is recorded before it is changed, and only on the
        first run: a rerun finds our own 'false' there and must not record that as original.
        """
        agent: dict[str, Any] = {}
        if _agent_to_restore(request.cloud):
            agent["agentIpAliasesBefore"] = request.cloud["agentIpAliasesBefore"]
        try:
            if not agent:
                agent = {
                    "agentIpAliasesBefore": localroute.read_agent_ip_aliases(self.agent_config),
                    "agentConfigRestored": False,
                }
                record(agent)
            localroute.set_agent_ip_aliases(self.agent_config, "false")
        except HostSetupError as exc:
            log.warning("could not turn off the guest agent's alias routes: %s", exc)
        try:
            for route in localroute.remove_guest_agent_routes(subnet):
                log.info("removed guest-agent route: %s", route)
        except HostSetupError as exc:
            log.warning("guest-agent route check failed (the daemon retries): %s", exc)
        return agent


_ADOPTED = " (adopted: teardown leaves it)"


@dataclass(frozen=True)
class AliasRecord:
    """The alias a pool uses, and whether cocoon-net made it (only then does teardown remove
    it)."""

    name: str  # "" for an alias from the subnetwork's primary range
    cidr: IPv4Network
    owned: bool

    def __str__(self) -> str:
        return str(gce_compute.Alias(self.name, str(self.cidr)))


def alias_record(state: PoolState) -> AliasRecord | None:
    """What pool.json says about the alias; None when it names none (the Go tool's adopt).

    Our record carries aliasOwned. A pool.json without it is the Go tool's: only its init
    wrote aliasRangeName, always `cocoon-pods`, for the alias it added at the pool's subnet;
    its adopt wrote no name, and what it adopted is never ours.
    """
    cloud = state.cloud
    if "aliasOwned" in cloud:
        cidr = IPv4Network(cloud.get("aliasCidr") or state.subnet, strict=False)
        return AliasRecord(str(cloud.get("aliasRangeName", "")), cidr, bool(cloud["aliasOwned"]))
    if state.alias_range_name == RANGE_NAME:
        return AliasRecord(RANGE_NAME, state.network, True)
    return None


def _adopt_keeps_ours(cloud: Mapping[str, Any], alias: gce_compute.Alias) -> bool:
    """Whether the alias adopt found is one init made (then it stays ours); refuses to drop
    the record of an alias of ours that teardown has not removed yet."""
    if not cloud.get("aliasOwned") or cloud.get("aliasRemoved"):
        return False
    ours = gce_compute.Alias(str(cloud.get("aliasRangeName", "")), str(cloud.get("aliasCidr")))
    if ours.range_name == alias.range_name and _same_cidr(ours.cidr, alias.cidr):
        return True
    raise StateError(
        f"pool.json records alias {ours}, which cocoon-net added to {NIC}; adopting {alias} "
        "would forget it: run 'cocoon-net teardown' first"
    )


def _same_cidr(a: str, b: str) -> bool:
    return IPv4Network(a, strict=False) == IPv4Network(b, strict=False)


def _where(inst: InstanceInfo, subnet: IPv4Network) -> dict[str, Any]:
    """Where init's alias goes, recorded before it is added. init owns `cocoon-pods:<subnet>`
    even when it finds it there: that name is what init (ours, or the Go tool's before it)
    creates."""
    return {
        "project": inst.project,
        "zone": inst.zone,
        "instance": inst.name,
        "aliasRangeName": RANGE_NAME,
        "aliasCidr": str(subnet),
        "aliasOwned": True,
    }


def _range_to_remove(cloud: Mapping[str, Any]) -> tuple[bool, IPv4Network | None]:
    """Whether teardown removes the range once unused, and at which CIDR only (None: at
    whatever CIDR it has, the operator's --remove-range)."""
    if cloud.get("fleetRange"):
        return True, IPv4Network(str(cloud["fleetRange"]))
    return bool(cloud.get("removeRange")), None


def _fleet(request: NodeRequest) -> dict[str, Any]:
    """The fleet range claim_subnet recorded, kept through the re-provision that follows."""
    fleet = request.cloud.get("fleetRange")
    return {"fleetRange": fleet} if fleet else {}


def _agent_to_restore(cloud: Mapping[str, Any]) -> bool:
    """The agent config holds our 'false' and the recorded original is still to be put back
    (once: a second teardown must not put back what the first one already restored)."""
    return "agentIpAliasesBefore" in cloud and not cloud.get("agentConfigRestored")


def _aliases_text(nic: Nic) -> str:
    parts = [str(gce_compute.Alias.from_json(a)) for a in nic.aliases]
    return ", ".join(parts) if parts else "(none)"


def _vpc_cidrs(subnetwork: gce_compute.Subnetwork) -> list[IPv4Network]:
    """The node's subnetwork ranges: VMs reach them without masquerade."""
    cidrs = [subnetwork.cidr] + [str(r.get("ipCidrRange", "")) for r in subnetwork.secondary]
    out: list[IPv4Network] = []
    for text in cidrs:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if isinstance(net, IPv4Network) and net not in out:
            out.append(net)
    return out


def create(environ: Mapping[str, str]) -> GkePlatform:
    return GkePlatform(environ)
