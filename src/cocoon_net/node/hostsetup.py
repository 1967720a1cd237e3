"""Host setup as one reconciler: bridge, sysctls, firewall, CNI conflist, and its undo.

`reconcile` is what init, adopt and every daemon start run: each step compares the kernel with
the spec and changes only the difference, so a second run reports nothing. What it changed
on the host the first time (bridge created, address set, sysctl values before and the values
we wrote) goes into the HostRecord in pool.json, so `teardown` restores exactly that and
nothing else, and can be run again after a half-finished run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from cocoon_net.errors import CocoonError, HostSetupError
from cocoon_net.node import bridge, cni, egress, firewall, nic, routes, sysctl
from cocoon_net.state import HostRecord

DEFAULT_MTU = 1500
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSpec:
    """What the host should look like; built by the CLI from PoolState and flags."""

    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    mtu: int | None  # None: the primary NIC's MTU, or 1500 without one
    bridge_mac: str | None  # None: bridge.default_mac(gateway)
    primary_nic: str | None  # None: the device of the default route
    secondary_nics: tuple[str, ...]
    manage_firewall: bool
    drop_cidrs: tuple[IPv4Network, ...]
    drop_internal_access: bool
    vpc_cidrs: tuple[IPv4Network, ...]
    conflist: Path
    port_isolation: bool = True  # off only when VMs may talk to each other


def _bridge_spec(spec: HostSpec, primary: str | None) -> bridge.BridgeSpec:
    mtu = spec.mtu or (nic.link_mtu(primary) if primary else None) or DEFAULT_MTU
    return bridge.BridgeSpec(
        name=spec.bridge,
        mac=(spec.bridge_mac or bridge.default_mac(spec.gateway)).lower(),
        mtu=mtu,
        address=IPv4Interface(f"{spec.gateway}/{spec.subnet.prefixlen}"),
    )


def reconcile(
    spec: HostSpec,
    record: HostRecord,
    *,
    dry_run: bool = False,
    on_progress: Callable[[HostRecord], None] | None = None,
) -> tuple[HostRecord, list[str]]:
    """Bring the host to spec; return the updated record and the changes made.

    Order matters: the bridge must exist before its rp_filter can be set. The first error
    aborts (the caller's command fails). `on_progress` receives the record as soon as a step
    changed what teardown must undo (a bridge we created, our address, the sysctls' old
    values and ours), so a caller that persists it can undo a half-applied setup. With dry_run
    nothing is changed, the record comes back as given and the changes are what a real run
    would do.
    """
    primary = spec.primary_nic or nic.primary_nic()
    wanted = _bridge_spec(spec, primary)
    bridge_plan = bridge.plan(wanted, *bridge.read(spec.bridge), record.bridge_address)
    changes = bridge.changes(bridge_plan) if dry_run else bridge.apply(bridge_plan)
    if not dry_run:
        record = _progress(
            record,
            replace(
                record,
                bridge_created=record.bridge_created or bridge_plan.creates,
                bridge_address=str(wanted.address),
            ),
            on_progress,
        )

    pending = sysctl.plan(sysctl.desired(spec.bridge, primary, spec.secondary_nics))
    if dry_run:
        changes += [sysctl.describe(change) for change in pending]
    else:
        # One at a time: a later required setting that fails must not lose the record of
        # one already written.
        for change in pending:
            for done in sysctl.apply([change]):
                changes.append(sysctl.describe(done))
                record = _progress(record, _record_sysctl(record, done), on_progress)

    if spec.manage_firewall:
        fw_spec = firewall.FirewallSpec(
            bridge=spec.bridge,
            subnet=spec.subnet,
            drop_cidrs=spec.drop_cidrs,
            drop_internal_access=spec.drop_internal_access,
            vpc_cidrs=spec.vpc_cidrs,
            secondary_nics=spec.secondary_nics,
        )
        changes += firewall.ensure(fw_spec, dry_run=dry_run)

    if dry_run:
        return record, changes + cni.plan_conflist(spec.conflist, spec.bridge, spec.port_isolation)
    changes += cni.ensure_conflist(spec.conflist, spec.bridge, spec.port_isolation)
    return record, changes


def _record_sysctl(record: HostRecord, change: sysctl.Change) -> HostRecord:
    """The record after writing change: the value we wrote, and the first value seen before
    ours (a later run only sees ours, or what someone set after it)."""
    key = change.setting.key
    before = dict(record.sysctls_before)
    if change.before is not None:
        before.setdefault(key, change.before)
    ours = {**record.sysctls_set, key: change.setting.value}
    return replace(record, sysctls_before=before, sysctls_set=ours)


def _progress(
    old: HostRecord, new: HostRecord, on_progress: Callable[[HostRecord], None] | None
) -> HostRecord:
    if new != old and on_progress is not None:
        on_progress(new)
    return new


# A teardown step: a name for errors, what it would do, and doing it.
_Step = tuple[str, Callable[[], list[str]], Callable[[], list[str]]]


def _teardown_steps(
    record: HostRecord,
    bridge_name: str,
    subnet: IPv4Network,
    conflist: Path,
    manage_firewall: bool,
) -> list[_Step]:
    def bridge_plan() -> bridge.BridgePlan:
        return bridge.plan_teardown(
            bridge_name, record.bridge_created, record.bridge_address, *bridge.read(bridge_name)
        )

    steps: list[_Step] = [
        ("egress", egress.plan_flush, egress.flush),
        (
            "lease routes",
            lambda: routes.plan_flush(bridge_name, subnet),
            lambda: routes.flush_routes(bridge_name, subnet),
        ),
    ]
    if manage_firewall:
        steps.append(("firewall", firewall.plan_removal, firewall.remove))
    steps += [
        (
            "conflist",
            lambda: cni.plan_remove_conflist(conflist),
            lambda: cni.remove_conflist(conflist),
        ),
        # Before the bridge goes: its own rp_filter is restored while it still exists.
        (
            "sysctls",
            lambda: sysctl.read_restore_plan(record.sysctls_before, record.sysctls_set).lines(),
            lambda: sysctl.restore(record.sysctls_before, record.sysctls_set),
        ),
        ("bridge", lambda: bridge.changes(bridge_plan()), lambda: bridge.apply(bridge_plan())),
    ]
    return steps


def _run_teardown(steps: list[_Step], *, apply: bool) -> list[str]:
    """Attempt every step, then report every failure in one error (CNI's cmdDel pattern)."""
    changes: list[str] = []
    errors: list[str] = []
    for name, plan_step, apply_step in steps:
        try:
            done = apply_step() if apply else plan_step()
        except CocoonError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if apply:  # logged as they happen: a later failure raises and drops the list
            for line in done:
                log.info("teardown: %s", line)
        changes += done
    if errors:
        raise HostSetupError("teardown incomplete: " + "; ".join(errors))
    return changes


def plan_teardown(
    record: HostRecord, bridge: str, subnet: IPv4Network, conflist: Path, manage_firewall: bool
) -> list[str]:
    """What teardown would change and leave; reads the host, changes nothing."""
    steps = _teardown_steps(record, bridge, subnet, conflist, manage_firewall)
    return _run_teardown(steps, apply=False)


def teardown(
    record: HostRecord, bridge: str, subnet: IPv4Network, conflist: Path, manage_firewall: bool
) -> list[str]:
    """Undo reconcile: lease routes, firewall (if ours), conflist, sysctls, bridge address/bridge.

    Returns what it changed, then each recorded sysctl it left as it is and why (see
    sysctl.plan_restore). Idempotent: a second run changes nothing and succeeds.
    """
    steps = _teardown_steps(record, bridge, subnet, conflist, manage_firewall)
    return _run_teardown(steps, apply=True)
