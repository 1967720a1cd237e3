"""init, adopt and teardown: the node's life, from provisioning to removal.

Every input has been validated by the CLI before these functions run. The order of effects is
chosen so that a failure at any point leaves pool.json describing everything that exists:
cloud resources are recorded the moment a platform creates them, the pool is saved before host
setup touches the kernel, and teardown deletes pool.json only after everything else is gone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon_net import config, lock, poolchange, state
from cocoon_net.errors import CocoonError, StateError
from cocoon_net.fsutil import atomic_write, remove_file
from cocoon_net.platform import get_platform
from cocoon_net.platform.base import NodeRequest, Platform, ProvisionResult, ResourceRecorder
from cocoon_net.state import GuardRecord, HostRecord, PoolState

if TYPE_CHECKING:  # node.hostsetup is imported when used: status never needs it
    from cocoon_net.node.hostsetup import HostSpec

log = logging.getLogger("cocoon_net.lifecycle")

DAEMON_HOLD_WAIT = 10.0  # the daemon's host setup, at start or after the bridge was lost
DAEMON_ANSWER_WAIT = 30.0  # a daemon restarting meanwhile: until it serves again


@dataclass(frozen=True)
class NodeOptions:
    """init/adopt input after validation (config.py)."""

    command: str  # "init" or "adopt"
    platform: str  # "" = detect from metadata
    node_name: str
    subnet: IPv4Network
    gateway: IPv4Address
    pool_size: int
    primary_nic: str | None
    dns: tuple[IPv4Address, ...]
    drop_internal_access: bool
    drop_cidrs: tuple[IPv4Network, ...]
    vpc_cidrs: tuple[IPv4Network, ...]
    mtu: int | None
    bridge: str
    bridge_mac: str | None
    manage_iptables: bool
    paths: config.Paths
    dry_run: bool = False
    allow_vm_to_vm: bool = False
    allow_ipv6: bool = False
    platform_options: Mapping[str, str] = field(default_factory=dict)
    subnet_auto: bool = False  # subnet is config.AUTO_PLACEHOLDER until claimed

    @property
    def lease_file(self) -> Path:
        return self.paths.default_lease_file()


def read_pool(paths: config.Paths) -> PoolState | None:
    """pool.json if present, fully validated; callers run this before taking the lock too, so
    a bad file or path fails before anything (even the lock file) is created."""
    if paths.state_dir.exists() and not paths.state_dir.is_dir():
        raise StateError(f"state dir {paths.state_dir} exists and is not a directory")
    return state.load_optional(paths.pool_file)


def resolve_platform(name: str, environ: Mapping[str, str]) -> str:
    if name:
        return name
    from cocoon_net.platform.detect import detect

    detected: str = detect(environ)
    log.info("detected platform: %s", detected)
    return detected


def host_spec(
    pool: PoolState, paths: config.Paths, *, manage_firewall: bool, bridge_mac: str | None = None
) -> HostSpec:
    """The desired host state for pool (node.hostsetup.HostSpec)."""
    from cocoon_net.node.hostsetup import HostSpec

    return HostSpec(
        bridge=pool.bridge,
        subnet=pool.network,
        gateway=pool.gateway_ip,
        mtu=pool.mtu or None,
        bridge_mac=bridge_mac,
        primary_nic=pool.primary_nic or None,
        secondary_nics=tuple(pool.secondary_nics),
        manage_firewall=manage_firewall,
        drop_cidrs=tuple(config.parse_cidr_list(pool.drop_cidrs, flag="dropCIDRs")),
        drop_internal_access=pool.drop_internal_access,
        vpc_cidrs=tuple(config.parse_cidr_list(pool.vpc_cidrs, flag="vpcCIDRs")),
        conflist=paths.conflist_for(pool.cni_conflist),
        port_isolation=not pool.guard.allow_vm_to_vm,
    )


def _check_ownership(existing: PoolState | None, opts: NodeOptions, platform: str) -> None:
    """Refuse to repurpose a pool.json that describes another node or platform."""
    if existing is None:
        return
    if existing.platform and existing.platform != platform:
        raise StateError(
            f"{opts.paths.pool_file} belongs to platform {existing.platform!r}; run "
            "'cocoon-net teardown' before switching it to " + repr(platform)
        )
    if existing.node_name and existing.node_name != opts.node_name:
        raise StateError(
            f"{opts.paths.pool_file} belongs to node {existing.node_name!r}; run "
            f"'cocoon-net teardown' before using it for {opts.node_name!r}"
        )


def _pending_state(opts: NodeOptions, platform: str, existing: PoolState | None) -> PoolState:
    """pool.json as it will read while provisioning runs: the new settings, the old pool."""
    same_subnet = existing is not None and existing.network == opts.subnet
    return PoolState(
        platform=platform,
        node_name=opts.node_name,
        subnet=str(opts.subnet),
        gateway=str(opts.gateway),
        ips=list(existing.ips) if existing is not None and same_subnet else [],
        primary_nic=opts.primary_nic or "",
        dns_servers=[str(ip) for ip in opts.dns],
        drop_internal_access=opts.drop_internal_access,
        drop_cidrs=[str(n) for n in opts.drop_cidrs],
        manage_iptables=opts.manage_iptables,
        vpc_cidrs=[str(n) for n in opts.vpc_cidrs],
        bridge=opts.bridge,
        mtu=opts.mtu or 0,
        lease_file=str(opts.lease_file),
        cni_conflist=str(opts.paths.conflist),
        host=existing.host if existing is not None else HostRecord(),
        cloud=dict(existing.cloud) if existing is not None else {},
        guard=GuardRecord(
            allow_vm_to_vm=opts.allow_vm_to_vm,
            allow_ipv6=opts.allow_ipv6,
            installed=existing is not None and existing.guard.installed,
        ),
        extra=dict(existing.extra) if existing is not None else {},
    )


def _apply_result(pool: PoolState, result: ProvisionResult, opts: NodeOptions) -> None:
    pool.ips = [str(ip) for ip in sorted(result.ips, key=int)]
    pool.secondary_nics = list(result.secondary_nics)
    pool.alias_range_name = result.alias_range_name
    pool.subnet_id = result.subnet_id
    pool.eni_ids = list(result.eni_ids)
    if not pool.vpc_cidrs:  # neither named by a flag nor kept for a running daemon
        pool.vpc_cidrs = [str(n) for n in result.vpc_cidrs]
    if not pool.mtu and result.mtu:
        pool.mtu = result.mtu
    pool.cloud.update(result.cloud)


def describe_options(opts: NodeOptions, platform: str) -> list[str]:
    ips = config.first_hosts(opts.subnet, opts.gateway, opts.pool_size)
    first_last = f" (first={ips[0]}, last={ips[-1]})" if platform == "static" else ""
    rows = [
        ("platform", platform),
        ("node-name", opts.node_name),
        ("subnet", str(opts.subnet)),
        ("gateway", str(opts.gateway)),
    ]
    if opts.subnet_auto:  # not claimed yet: only its size is known
        rows[2:] = [
            ("subnet", f"auto (the first free /{opts.subnet.prefixlen}, claimed by init)"),
            ("gateway", "(its first host)"),
        ]
    rows += [
        ("primary-nic", opts.primary_nic or "(auto)"),
        ("pool-size", f"{opts.pool_size}{first_last}"),
        ("dns", ",".join(map(str, opts.dns))),
        ("drop-internal", str(opts.drop_internal_access).lower()),
        ("drop-cidr", ",".join(map(str, opts.drop_cidrs))),
        ("vpc-cidr", ",".join(map(str, opts.vpc_cidrs)) or "(from platform)"),
        ("bridge", opts.bridge),
        ("mtu", str(opts.mtu or "(primary NIC)")),
        ("state-dir", str(opts.paths.state_dir)),
        ("lease-file", str(opts.lease_file)),
        ("cni-conflist", str(opts.paths.conflist)),
        ("manage-iptables", str(opts.manage_iptables).lower()),
        ("allow-vm-to-vm", str(opts.allow_vm_to_vm).lower()),
        ("allow-ipv6", str(opts.allow_ipv6).lower()),
    ]
    verb = "provision networking" if opts.command == "init" else "adopt node"
    lines = [f"[dry-run] would {verb} with config:"]
    lines += [f"  {label + ':':17}{value}" for label, value in rows]
    return lines


def provision_node(opts: NodeOptions, environ: Mapping[str, str] | None = None) -> list[str]:
    """init (cloud changes allowed) or adopt (cloud read only). Returns the lines to print.

    With a daemon running, only what it can take online may change (poolchange.py): the pool
    grows or shrinks, cloud first, then pool.json, then the daemon is asked to serve it and
    says how many addresses it now serves. A shrink is refused while addresses it would
    remove are leased."""
    env = os.environ if environ is None else environ
    platform_name = resolve_platform(opts.platform, env)
    if opts.dry_run:
        return _dry_run(opts, platform_name)
    replaced = _replace_incomplete(read_pool(opts.paths), opts, platform_name, env)
    _check_ownership(read_pool(opts.paths), opts, platform_name)
    with _state_lock(opts.paths, opts.command):
        existing = read_pool(opts.paths)
        _check_ownership(existing, opts, platform_name)
        daemon = lock.holder(opts.paths.daemon_lock)
        platform = get_platform(platform_name, env)
        claimed: dict[str, Any] = {}
        if opts.subnet_auto:
            opts = _claim_subnet(opts, existing, platform, claimed.update)
        pool = _pending_state(opts, platform_name, existing)
        pool.cloud.update(claimed)
        if daemon is not None and existing is not None:
            _check_online(opts, pool, existing, daemon)
        if opts.command == "init" and (existing is None or "incomplete" in existing.extra):
            # Until the pool is served, a re-run with other arguments may replace this file
            # (after undoing what it records): see _replace_incomplete.
            pool.extra["incomplete"] = True
        pool.primary_nic = pool.primary_nic or platform.primary_nic() or ""

        def record(resources: Mapping[str, Any]) -> None:
            pool.cloud.update(resources)
            state.save(opts.paths.pool_file, pool)

        request = NodeRequest(
            node_name=opts.node_name,
            subnet=opts.subnet,
            gateway=opts.gateway,
            pool_size=opts.pool_size,
            primary_nic=pool.primary_nic,
            cloud=dict(pool.cloud),
            options=dict(opts.platform_options),
        )
        if existing is not None and opts.pool_size < len(existing.ips):
            kept = platform.pool_after(existing, request, adopt=opts.command == "adopt")
            _check_shrink(opts.paths, existing, kept, daemon)
            if daemon is not None:
                pool.ips = _narrow(opts.paths, existing, kept)
        if opts.command == "init":
            result = platform.provision(request, record)
        else:
            result = platform.adopt(request)
        if not result.ips:
            raise CocoonError(f"{platform_name} returned no addresses for {opts.subnet}")
        _apply_result(pool, result, opts)
        # The pool is durable before the kernel is touched: a failing host setup can be
        # retried by running the same command again, and teardown knows every resource.
        state.save(opts.paths.pool_file, pool)
        changes = reconcile_host(
            pool,
            opts.paths,
            manage_firewall=opts.manage_iptables,
            bridge_mac=opts.bridge_mac,
        )
        if pool.extra.pop("incomplete", None) is not None:
            state.save(opts.paths.pool_file, pool)
    lines = replaced + [f"  {c}" for c in changes]
    if opts.command == "init":
        lines.append(
            f"cocoon-net init complete: {len(pool.ips)} IPs provisioned on {pool.subnet} "
            f"({platform_name})"
        )
    else:
        lines.append(
            f"cocoon-net adopt complete: {len(pool.ips)} IPs registered on {pool.subnet} "
            f"({platform_name}, cloud preserved)"
        )
    # After the state lock is released: a daemon that restarted meanwhile waits for it
    # before it reads pool.json, and answers only once it serves the new pool.
    if lock.holder(opts.paths.daemon_lock) is not None:
        lines.append(_tell_daemon(opts.paths, len(pool.ips)))
    return lines


def _claim_subnet(
    opts: NodeOptions,
    existing: PoolState | None,
    platform: Platform,
    record: ResourceRecorder,
) -> NodeOptions:
    """--subnet auto: the subnet this node already has (pool.json), else the block the
    platform claims in the cloud, which guarantees no other node holds it."""
    if existing is not None and existing.subnet:
        subnet = existing.network
        log.info("--subnet auto: this node already holds %s (%s)", subnet, opts.paths.pool_file)
    else:
        request = NodeRequest(
            node_name=opts.node_name,
            subnet=opts.subnet,
            gateway=opts.gateway,
            pool_size=opts.pool_size,
            primary_nic="",
            options=dict(opts.platform_options),
        )
        subnet = platform.claim_subnet(request, record)
        log.info("--subnet auto: claimed %s", subnet)
    record({"subnetAuto": True})
    return dataclasses.replace(opts, subnet=subnet, gateway=subnet.network_address + 1)


def _replace_incomplete(
    existing: PoolState | None, opts: NodeOptions, platform: str, env: Mapping[str, str]
) -> list[str]:
    """A failed init must not block an init with other arguments: pool.json of an init that
    never completed, for another node, platform or subnet, is torn down (what it records,
    nothing else), and the operator is told."""
    if opts.command != "init" or existing is None or "incomplete" not in existing.extra:
        return []
    same_subnet = opts.subnet_auto or existing.network == opts.subnet
    if existing.node_name == opts.node_name and existing.platform in ("", platform) and same_subnet:
        return []
    log.warning(
        "%s holds an init of node %r (%s, %s) that never completed: undoing what it records "
        "before this init",
        opts.paths.pool_file,
        existing.node_name,
        existing.platform,
        existing.subnet,
    )
    lines = teardown_node(opts.paths, dry_run=False, environ=env)
    return [
        f"replaced the incomplete init of node {existing.node_name!r} on {existing.subnet}:",
        *lines[:-1],
    ]


def _state_lock(paths: config.Paths, command: str) -> lock.StateLock:
    # The daemon holds the state lock only for its host setup: waited for, not refused.
    return lock.StateLock(paths.lock_file, command, wait=DAEMON_HOLD_WAIT, wait_for="daemon")


def _check_online(
    opts: NodeOptions, pool: PoolState, existing: PoolState, daemon: lock.Holder
) -> None:
    """Refuse (before any change) what the running daemon could not take without a restart."""
    given = [name for name in ("primary_nic", "mtu", "vpc_cidrs") if getattr(opts, name)]
    poolchange.keep_unset(pool, existing, given=given)
    refused = poolchange.offline_changes(existing, pool)
    if opts.bridge_mac:
        refused.append(f"bridge-mac -> {opts.bridge_mac}")
    if refused:
        raise StateError(
            f"the running daemon ({daemon}) can change only --pool-size and --dns; this "
            f"{opts.command} would also change {'; '.join(refused)}: stop the daemon first, "
            "or repeat the current values"
        )


def _check_shrink(
    paths: config.Paths, existing: PoolState, kept: set[IPv4Address], daemon: lock.Holder | None
) -> None:
    """Refuse a shrink that would take leased addresses away (before any cloud call)."""
    from cocoon_net import control, status

    if daemon is not None:
        answer = control.request(paths.control_socket, {"cmd": "leases"})
        leased = [IPv4Address(str(row["ip"])) for row in answer.get("leases") or ()]
    else:
        found = status.stored_leases(paths.lease_file_for(existing.lease_file), time.time())
        leased = [lease.ip for lease in found]
    busy = poolchange.leased_in_removed(existing.pool_ips, kept, leased)
    if busy:
        shown = ", ".join(map(str, busy[:5])) + (f" and {len(busy) - 5} more" if busy[5:] else "")
        raise StateError(
            f"cannot shrink the pool to {len(kept)} addresses: {len(busy)} of the addresses "
            f"it would remove are leased ({shown}); release them first "
            "('cocoon-net release --ip ...') or keep a larger --pool-size"
        )


def _narrow(paths: config.Paths, existing: PoolState, kept: set[IPv4Address]) -> list[str]:
    """A shrink under a running daemon goes the other way round from a growth: the daemon
    stops serving the removed addresses before the cloud takes them away. It refuses if one
    was leased since _check_shrink looked; pool.json is then put back as it was."""
    from cocoon_net import control

    before = paths.pool_file.read_bytes()
    narrowed = copy.deepcopy(existing)
    narrowed.ips = [str(ip) for ip in sorted(ip for ip in existing.pool_ips if ip in kept)]
    state.save(paths.pool_file, narrowed)
    try:
        control.request(paths.control_socket, {"cmd": "reload", "keep_leases": True})
    except CocoonError as exc:
        atomic_write(paths.pool_file, before, mode=0o644, dir_mode=0o750)
        raise StateError(f"pool unchanged: {exc}") from None
    return narrowed.ips


def _tell_daemon(paths: config.Paths, expected: int) -> str:
    """Ask the running daemon to serve pool.json's pool; the line that says it does."""
    from cocoon_net import control

    deadline = time.monotonic() + DAEMON_ANSWER_WAIT
    while True:
        try:
            answer = control.request(paths.control_socket, {"cmd": "reload"})
            break
        except StateError as exc:
            daemon = lock.holder(paths.daemon_lock)
            if daemon is None:
                return f"no daemon runs now: it serves {expected} addresses when it starts"
            if time.monotonic() >= deadline:
                raise StateError(
                    f"pool.json lists {expected} addresses, but the daemon ({daemon}) did "
                    f"not take them: {exc}; restart it or send it SIGHUP"
                ) from None
            time.sleep(lock.POLL_SECONDS)
    served = int(answer.get("addresses", -1))
    if served != expected:
        raise StateError(
            f"pool.json lists {expected} addresses, but the daemon serves {served} "
            "(did another init or adopt change the pool meanwhile?)"
        )
    return f"daemon now serves {expected} addresses"


def reconcile_host(
    pool: PoolState,
    paths: config.Paths,
    *,
    manage_firewall: bool,
    bridge_mac: str | None = None,
) -> list[str]:
    """Bring the host in line with pool; every step's record lands in pool.json at once, so
    teardown after a half-applied setup still knows what was created."""
    from cocoon_net.node import hostsetup

    spec = host_spec(pool, paths, manage_firewall=manage_firewall, bridge_mac=bridge_mac)

    def save_record(record: HostRecord) -> None:
        pool.host = record
        state.save(paths.pool_file, pool)

    record, changes = hostsetup.reconcile(spec, pool.host, on_progress=save_record)
    if record != pool.host:
        save_record(record)
    return list(changes)


def _dry_run(opts: NodeOptions, platform_name: str) -> list[str]:
    from cocoon_net.node import hostsetup

    existing = read_pool(opts.paths)
    if opts.subnet_auto:
        if existing is None or not existing.subnet:
            return describe_options(opts, platform_name)
        net = existing.network
        opts = dataclasses.replace(
            opts, subnet=net, gateway=net.network_address + 1, subnet_auto=False
        )
    lines = describe_options(opts, platform_name)
    pool = _pending_state(opts, platform_name, existing)
    pool.ips = [str(ip) for ip in config.first_hosts(opts.subnet, opts.gateway, opts.pool_size)]
    spec = host_spec(
        pool, opts.paths, manage_firewall=opts.manage_iptables, bridge_mac=opts.bridge_mac
    )
    _, changes = hostsetup.reconcile(spec, pool.host, dry_run=True)
    lines.append("")
    lines.append("would write:")
    lines += [f"  {opts.paths.conflist}", f"  {opts.paths.pool_file}"]
    lines.append("would change on the host:" if changes else "host already as desired")
    lines += [f"  {c}" for c in changes]
    if opts.command == "adopt":
        lines.append("would NOT touch: cloud alias IP range / ENIs (preserved as-is)")
    return lines


def _remove_guard(*, dry_run: bool) -> list[str]:
    """The VM guard's tables, which the daemon installed and recorded (it leaves them in
    place when it stops, so VMs stay guarded across a restart)."""
    from cocoon_net.node import guard
    from cocoon_net.node.nft import Nft

    nft = Nft()
    try:
        return guard.remove(nft, dry_run=dry_run)
    finally:
        nft.close()


def lease_files(lease_file: Path) -> list[Path]:
    """The lease snapshot and every companion file the store keeps beside it."""
    if not lease_file.parent.is_dir():
        return []
    return sorted(p for p in lease_file.parent.glob(lease_file.name + "*") if p.is_file())


def teardown_node(
    paths: config.Paths,
    *,
    dry_run: bool,
    environ: Mapping[str, str],
    remove_range: bool = False,
) -> list[str]:
    if read_pool(paths) is None:
        return [f"nothing to tear down: no pool state at {paths.pool_file}"]
    from cocoon_net.node import hostsetup

    with _state_lock(paths, "teardown"):
        daemon = lock.holder(paths.daemon_lock)
        if daemon is not None and not dry_run:
            raise StateError(
                f"the daemon is running ({daemon}): stop it first "
                "('systemctl stop cocoon-net'), then run teardown"
            )
        pool = read_pool(paths)
        if pool is None:
            return [f"nothing to tear down: no pool state at {paths.pool_file}"]
        platform = get_platform(pool.platform or "static", environ)
        if remove_range:  # the operator's word that the shared range is cocoon-net's
            pool.cloud["removeRange"] = True
        lease_file = paths.lease_file_for(pool.lease_file)
        conflist = paths.conflist_for(pool.cni_conflist)
        manage = pool.manage_iptables
        if dry_run:
            lines = [
                f"[dry-run] would teardown {pool.platform} networking for node "
                f"{pool.node_name} (subnet {pool.subnet}):"
            ]
            actions = platform.plan_teardown(pool)
            actions += hostsetup.plan_teardown(
                pool.host, pool.bridge, pool.network, conflist, manage
            )
            if pool.guard.installed:
                actions += _remove_guard(dry_run=True)
            actions += [f"remove {p}" for p in lease_files(lease_file)]
            actions.append(f"remove {paths.pool_file}")
            return lines + [f"  {a}" for a in actions]

        def record(resources: Mapping[str, Any]) -> None:
            pool.cloud.update(resources)
            state.save(paths.pool_file, pool)

        errors: list[str] = []
        done: list[str] = []
        try:
            platform.teardown(pool, record)
        except CocoonError as exc:
            errors.append(str(exc))
        try:
            if pool.guard.installed:
                done += _remove_guard(dry_run=False)
                pool.guard = replace(pool.guard, installed=False)
                state.save(paths.pool_file, pool)
            done += hostsetup.teardown(pool.host, pool.bridge, pool.network, conflist, manage)
            pool.host = HostRecord()
            state.save(paths.pool_file, pool)
        except CocoonError as exc:
            errors.append(str(exc))
        if errors:
            raise CocoonError(
                "teardown incomplete (pool.json kept; run teardown again): " + "; ".join(errors)
            )
        for path in lease_files(lease_file):
            remove_file(path)
            done.append(f"removed {path}")
        remove_file(paths.pool_file)
        done.append(f"removed {paths.pool_file}")
        for directory in {paths.state_dir, lease_file.parent}:
            # rmdir only succeeds on an empty directory: what others keep there stays.
            with contextlib.suppress(OSError):
                directory.rmdir()
    return [f"  {d}" for d in done] + [f"cocoon-net teardown complete ({pool.platform})"]
