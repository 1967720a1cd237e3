"""What init and adopt may change on a node whose daemon runs, and what a shrink removes.

A running daemon re-reads pool.json on request and serves a new pool and new DNS servers at
once. Everything else it holds for its whole life (the subnet and gateway it answers for, the
bridge it listens on, the lease file it journals to, the platform whose agents it watches) or
set up on the host at start (bridge MTU, firewall, CNI conflist): a change there is refused
while it runs, so pool.json never says what the daemon does not do.

Decisions only; lifecycle.py does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

from cocoon_net.state import PoolState


def keep_unset(pending: PoolState, existing: PoolState, *, given: Iterable[str]) -> None:
    """Settings init fills in by itself when no flag names them (primary NIC, MTU, VPC
    CIDRs) keep their current value: a growth run needs to repeat only what it changes."""
    named = set(given)
    if "primary_nic" not in named:
        pending.primary_nic = existing.primary_nic
    if "mtu" not in named:
        pending.mtu = existing.mtu
    if "vpc_cidrs" not in named:
        pending.vpc_cidrs = list(existing.vpc_cidrs)


def offline_changes(existing: PoolState, wanted: PoolState) -> list[str]:
    """The settings wanted changes that a running daemon cannot take, 'name old -> new' each.
    No lease file or conflist path in existing means the default one (a pool.json the Go tool
    wrote has none of our keys), which is what wanted holds unless the operator named one."""
    fields: list[tuple[str, object, object]] = [
        ("platform", existing.platform, wanted.platform),
        ("node-name", existing.node_name, wanted.node_name),
        ("subnet", existing.network, wanted.network),
        ("gateway", existing.gateway_ip, wanted.gateway_ip),
        ("bridge", existing.bridge, wanted.bridge),
        ("primary-nic", existing.primary_nic, wanted.primary_nic),
        ("mtu", existing.mtu, wanted.mtu),
        ("drop-internal-access", existing.drop_internal_access, wanted.drop_internal_access),
        ("drop-cidr", sorted(existing.drop_cidrs), sorted(wanted.drop_cidrs)),
        ("vpc-cidr", sorted(existing.vpc_cidrs), sorted(wanted.vpc_cidrs)),
        ("manage-iptables", existing.manage_iptables, wanted.manage_iptables),
        ("allow-vm-to-vm", existing.guard.allow_vm_to_vm, wanted.guard.allow_vm_to_vm),
        ("allow-ipv6", existing.guard.allow_ipv6, wanted.guard.allow_ipv6),
        ("lease-file", existing.lease_file or wanted.lease_file, wanted.lease_file),
        ("cni-conflist", existing.cni_conflist or wanted.cni_conflist, wanted.cni_conflist),
    ]
    return [f"{name} {_text(old)} -> {_text(new)}" for name, old, new in fields if old != new]


def _text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value) if value not in ("", 0) else "(default)"


def leased_in_removed(
    current: Iterable[IPv4Address], kept: Iterable[IPv4Address], leased: Iterable[IPv4Address]
) -> list[IPv4Address]:
    """Leased addresses of the current pool that the new pool would no longer hold."""
    removed = set(current) - set(kept)
    return sorted(ip for ip in set(leased) if ip in removed)
