"""What a batch of lease-table changes means for the disk: journal records, as pure code.

Routes are not derived change by change: after any change the daemon makes the kernel's
/32 routes for the touched addresses match the table (an address that someone still holds
keeps its route, whatever happened to the lease that ended), see Server._sync_routes.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.leases import (
    Change,
    Expire,
    Grant,
    Quarantine,
    Release,
    Renew,
    Revoke,
    Withdraw,
)


def records(changes: Iterable[Change]) -> list[Record]:
    """The journal records that make changes durable (offers are not: clients retry)."""
    out: list[Record] = []
    for change in changes:
        match change:
            case Grant(lease) | Renew(lease):
                out.append(Record.grant(lease))
            case Release(lease) | Revoke(lease, _):
                out.append(Record.release(lease))
            case Expire(lease):
                out.append(Record.expire(lease))
            case Quarantine(ip, until, lease):
                if lease is not None:
                    out.append(Record.release(lease))
                out.append(Record.quarantine(ip, until, lease.mac if lease else ""))
            case Withdraw():
                pass
    return out


def touched(changes: Iterable[Change]) -> set[IPv4Address]:
    """Addresses whose route may have to be added or removed."""
    out: set[IPv4Address] = set()
    for change in changes:
        match change:
            case Grant(lease) | Renew(lease) | Release(lease) | Expire(lease) | Revoke(lease, _):
                out.add(lease.ip)
            case Quarantine(ip, _, _):
                out.add(ip)
            case Withdraw():
                pass
    return out


def grants(changes: Iterable[Change]) -> set[IPv4Address]:
    """Addresses newly bound: their route must exist before the ACK leaves."""
    return {c.lease.ip for c in changes if isinstance(c, Grant)}
