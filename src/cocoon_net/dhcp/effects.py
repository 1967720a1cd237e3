"""What a batch of lease-table changes means for the disk and the kernel, as pure code.

Routes and guard elements are not derived change by change: after any change the daemon
makes the kernel's /32 routes and the guard's `MAC . address` elements for the touched
addresses match the table (an address that someone still holds keeps its route, whatever
happened to the lease that ended), see DhcpServer.sync_routes and sync_guard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address

from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.leases import (
    Change,
    Expire,
    Grant,
    Hold,
    LeaseTable,
    Quarantine,
    Release,
    Renew,
    Revoke,
    Withdraw,
)


def durable(changes: Iterable[Change]) -> tuple[list[Record], set[IPv4Address]]:
    """The journal records that make changes durable (offers are not: clients retry), and
    the addresses whose route may have to be added or removed: both in one pass, as the
    server needs them for every decision that changes something."""
    out: list[Record] = []
    ips: set[IPv4Address] = set()
    for change in changes:
        match change:
            case Grant(lease) | Renew(lease):
                out.append(Record.grant(lease))
                ips.add(lease.ip)
            case Release(lease) | Revoke(lease, _):
                out.append(Record.release(lease))
                ips.add(lease.ip)
            case Expire(lease):
                out.append(Record.expire(lease))
                ips.add(lease.ip)
            case Quarantine(ip, until, lease):
                if lease is not None:
                    out.append(Record.release(lease))
                out.append(Record.quarantine(ip, until, lease.mac if lease else ""))
                ips.add(ip)
            case Hold(ip, until):
                out.append(Record.hold(ip, until))
                ips.add(ip)
            case Withdraw():
                pass
    return out, ips


def records(changes: Iterable[Change]) -> list[Record]:
    """The journal records that make changes durable (see durable)."""
    return durable(changes)[0]


def touched(changes: Iterable[Change]) -> set[IPv4Address]:
    """Addresses whose route may have to be added or removed (see durable)."""
    return durable(changes)[1]


def grants(changes: Iterable[Change]) -> set[IPv4Address]:
    """Addresses newly bound: their route must exist before the ACK leaves."""
    return {c.lease.ip for c in changes if isinstance(c, Grant)}


def guard_elements(
    table: LeaseTable, current: Mapping[IPv4Address, str], ips: Iterable[IPv4Address], now: float
) -> dict[IPv4Address, str | None]:
    """Which MAC may send from each address (None: nobody). A lease's MAC; for an address
    held after the lease file was lost (a route, no lease yet), the MAC the guard already
    allows, which the previous daemon set from a lease: that VM keeps working until it
    renews, and every other VM is kept off the address."""
    out: dict[IPv4Address, str | None] = {}
    for ip in ips:
        lease = table.lease_at(ip, now)
        if lease is not None:
            out[ip] = lease.mac
        elif table.needs_route(ip, now):
            out[ip] = current.get(ip)
        else:
            out[ip] = None
    return out


def guarded(
    table: LeaseTable,
    current: Mapping[IPv4Address, str],
    now: float,
    unsettled: Iterable[IPv4Address] = (),
) -> dict[IPv4Address, str]:
    """Every element the guard should hold now (see guard_elements). An `unsettled` address
    (its lease changed in the table, the change not on disk yet) keeps the element in
    `current`, or none: the guard follows a lease only once it is durable."""
    out = {lease.ip: lease.mac for lease in table.leases(now)}
    for ip in table.recovered_addresses(now):
        if ip in current:
            out[ip] = current[ip]
    for ip in unsettled:
        mac = current.get(ip)
        if mac is None:
            out.pop(ip, None)
        else:
            out[ip] = mac
    return out
