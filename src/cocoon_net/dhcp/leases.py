"""The lease table: the one in-memory owner of who holds which address.

One writer. The server calls this from its event loop only, and every check-and-act is one
method call (`offer`, `grant`, `release`, `decline`, `expire`), so nothing can happen between
"is it free?" and "take it" (the Go tool's races cannot be written here). No I/O,
no clock, no randomness: `now` is an argument and every change is returned as a Change record
that the store makes durable and the route reconciler applies.

What it holds, all keyed by MAC (chaddr) — option 61 is recorded, never an identity:
- the pool, in ascending order; nothing outside it is ever offered or granted;
- active leases (by MAC and by address) and offers (held `offer_hold` seconds);
- quarantined addresses (after a DECLINE, until a time);
- reservations (MAC -> address, honoured while the address is in the pool);
- history: for each address, its last binding (a Lease whose `expires` is when it ended, or
  will end). A returning MAC gets its last address back whenever it is free, also after a
  restart: the store persists history and `load` takes it back;
- recovered addresses: in use according to the kernel (our /32 routes) but unknown to the
  lease records after a lost lease file; never offered, only confirmed to the VM that uses it.

Allocation order for a MAC (`offer`): its reservation; its active lease; its unexpired offer;
its last address if free; the address it asks for (option 50) if free and nobody else's; then
the free address unused for the longest time: never-used ones first in ascending order, then
by when they were last released, so a just-freed address is the last one handed to a new VM
(an address offered and not taken, or free again after a reservation, quarantine or recovered
hold, goes to the back of its group). Held addresses are kept out of that order, so a DISCOVER
takes its first address in O(1), whatever number of addresses is held.
"""

from __future__ import annotations

import enum
import math
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from itertools import chain
from typing import ClassVar

from cocoon_net.dhcp.model import Lease

# ---------------------------------------------------------------------------- changes


@dataclass(frozen=True)
class Grant:
    """A MAC was bound to an address: persist it, add the /32 route."""

    op: ClassVar[str] = "grant"
    lease: Lease


@dataclass(frozen=True)
class Renew:
    """A MAC's binding was extended (same address): persist the new expiry."""

    op: ClassVar[str] = "renew"
    lease: Lease


@dataclass(frozen=True)
class Release:
    """The client gave the address back. `lease.expires` is when it ended; the route goes."""

    op: ClassVar[str] = "release"
    lease: Lease


@dataclass(frozen=True)
class Expire:
    """The lease ran out without renewal; the route goes."""

    op: ClassVar[str] = "expire"
    lease: Lease


@dataclass(frozen=True)
class Quarantine:
    """A DECLINE: `ip` is kept out of allocation until `until`; `lease`, if any, ended."""

    op: ClassVar[str] = "quarantine"
    ip: IPv4Address
    until: float
    lease: Lease | None


@dataclass(frozen=True)
class Revoke:
    """We ended a lease: pool change, duplicate at load, or the MAC moved to a new address."""

    op: ClassVar[str] = "revoke"
    lease: Lease
    reason: str


@dataclass(frozen=True)
class Withdraw:
    """An offer was dropped before it expired (the client chose another server)."""

    op: ClassVar[str] = "withdraw"
    mac: str
    ip: IPv4Address


@dataclass(frozen=True)
class Hold:
    """An address in use per the kernel with no lease, held for its VM until `until` (a
    deadline written down once, so that a restart does not push it back)."""

    op: ClassVar[str] = "hold"
    ip: IPv4Address
    until: float


Change = Grant | Renew | Release | Expire | Quarantine | Revoke | Withdraw | Hold


# ---------------------------------------------------------------------------- records


class Standing(enum.Enum):
    """Where an address stands for one MAC (see LeaseTable.standing)."""

    # Members hash by identity (C) rather than by name (Enum.__hash__, Python code): the
    # policy's rule table and the sets below are looked up per packet. Enum members compare
    # by identity, so the two agree.
    __hash__ = object.__hash__

    # The address is this MAC's.
    LEASED = "leased"
    OFFERED = "offered"
    RESERVED = "reserved"
    REMEMBERED = "remembered"  # its last address, free now
    RECOVERED_MINE = "recovered_mine"  # in use per the kernel, and the MAC is known to be this one
    # Free, no claim by anyone.
    UNKNOWN = "unknown"  # never bound
    RECOVERED = "recovered"  # in use per the kernel, owner unknown (lease file lost)
    # Someone else's, or not ours to give.
    USED = "used"  # free, but last bound to another binding
    HELD_BY_OTHER = "held_by_other"
    RESERVED_FOR_OTHER = "reserved_for_other"
    QUARANTINED = "quarantined"
    OUTSIDE_POOL = "outside_pool"

    @property
    def mine(self) -> bool:
        return self in _MINE


_MINE = frozenset(
    {
        Standing.LEASED,
        Standing.OFFERED,
        Standing.RESERVED,
        Standing.REMEMBERED,
        Standing.RECOVERED_MINE,
    }
)
# What grant() accepts; anything else means the caller skipped its checks.
_GRANTABLE = _MINE | {Standing.UNKNOWN, Standing.RECOVERED, Standing.USED}


@dataclass(frozen=True, init=False)
class Offer:
    mac: str
    ip: IPv4Address
    until: float

    def __init__(self, mac: str, ip: IPv4Address, until: float) -> None:
        # Built for every DISCOVER: one update of the instance dict instead of the generated
        # frozen __init__'s object.__setattr__ per field.
        self.__dict__.update(mac=mac, ip=ip, until=until)


@dataclass(frozen=True)
class _Recovered:
    mac: str  # "" when the kernel only told us the address
    until: float


@dataclass(frozen=True)
class _Quarantined:
    until: float
    mac: str  # who declined it ("" after a reload)


@dataclass(frozen=True)
class TableSnapshot:
    """Everything the store needs to write (offers and recovered addresses are not durable)."""

    leases: tuple[Lease, ...]
    history: tuple[Lease, ...]
    quarantine: Mapping[IPv4Address, float]


@dataclass(frozen=True)
class PoolStats:
    total: int
    leased: int
    offered: int
    quarantined: int
    free: int


# ---------------------------------------------------------------------------- pool layout


class _Span:
    """A set of addresses (as ints) within [base, base + size): one byte each, 64 KB for a
    /16 (a frozenset of 65,000 IPv4Address objects takes several megabytes)."""

    __slots__ = ("base", "flags")

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.flags = bytearray(size)

    def has(self, value: int) -> bool:
        i = value - self.base
        return 0 <= i < len(self.flags) and self.flags[i] == 1

    def put(self, value: int, present: bool) -> None:
        self.flags[value - self.base] = present


class _ReuseOrder:
    """The addresses free for a new client, in the order they are handed out: the
    never-bound ones, then those bound before. Taking any address out, putting one at the
    back of its group and finding the first are each O(1), however many are held.

    Each group keeps the order it was built in as a run of ints read from a cursor, with a
    byte per position saying whether that address is still queued there: the first one is
    found by bytearray.find (C, not a Python loop over the addresses taken out before it), and
    an address is found in its run by a slot per address of the pool's span. An address put
    at the back leaves the run for good and joins its group's tail, a dict kept in the order
    of the moves. A dict keeps a hole for each key taken from it until it is copied, and
    finding its first key steps over them all: compact() copies the tails afresh.
    """

    __slots__ = ("_base", "_cursor", "_end", "_live", "_run", "_slot", "_tails", "holes")

    def __init__(self, fresh: Iterable[int], used: Iterable[int], span: _Span) -> None:
        self._run = array("I", fresh)
        split = len(self._run)
        self._run.extend(used)
        self._live = bytearray(b"\x01") * len(self._run)
        # Where each group's run ends and where its cursor stands: every queued address of
        # a run is at its cursor or after it.
        self._end = (split, len(self._run))
        self._cursor = [0, split]
        self._base = span.base
        self._slot = array("I", bytes(4 * len(span.flags)))  # run position + 1; 0: not there
        base, slot = self._base, self._slot
        for position, value in enumerate(self._run, 1):
            slot[value - base] = position
        self._tails: tuple[dict[int, None], dict[int, None]] = ({}, {})
        self.holes = 0  # keys taken from the tails since they were copied

    def __iter__(self) -> Iterator[int]:
        for group in (0, 1):
            start, end = self._cursor[group], self._end[group]
            yield from (self._run[i] for i in range(start, end) if self._live[i])
            yield from self._tails[group]

    def first(self) -> int | None:
        for group in (0, 1):
            position = self._live.find(1, self._cursor[group], self._end[group])
            if position >= 0:
                self._cursor[group] = position
                return self._run[position]
            self._cursor[group] = self._end[group]
            for value in self._tails[group]:
                return value
        return None

    def discard(self, value: int) -> None:
        """Take `value` out of the order, if it is in it."""
        i = value - self._base
        position = self._slot[i] if 0 <= i < len(self._slot) else 0
        if position:
            self._slot[i] = 0
            self._live[position - 1] = 0
            return
        for tail in self._tails:
            if tail.pop(value, 0) is None:
                self.holes += 1
                return

    def push(self, value: int, used: bool) -> None:
        """Put `value` at the back of its group (bound before or not), wherever it was."""
        self.discard(value)
        self._tails[used][value] = None

    def compact(self) -> None:
        self._tails = (dict(self._tails[0]), dict(self._tails[1]))
        self.holes = 0


# ---------------------------------------------------------------------------- the table


class LeaseTable:
    # Addresses taken from the tails of the reuse order before they are copied afresh
    # (_ReuseOrder.compact). A dict keeps a hole for each key taken from it, and finding its
    # first key steps over all of them: ~20 us per DISCOVER after 20,000 grants on a /16.
    # Copying 65,000 entries every 4,096 takes ~0.5 us per DISCOVER.
    compact_after = 4096

    def __init__(
        self,
        pool: Iterable[IPv4Address | int],
        *,
        reservations: Mapping[str, IPv4Address] | None = None,
        offer_hold: float = 60.0,
    ) -> None:
        self.offer_hold = offer_hold
        # The pool as sorted ints and a flag per address of its span: no object per address.
        self._pool = array("I")
        self._in_pool = _Span(0, 0)
        self._reserved: dict[str, IPv4Address] = {}
        self._reserved_for: dict[IPv4Address, str] = {}
        self._leases: dict[str, Lease] = {}
        self._lease_at: dict[IPv4Address, Lease] = {}
        self._offers: dict[str, Offer] = {}
        self._offer_at: dict[IPv4Address, Offer] = {}
        self._quarantine: dict[IPv4Address, _Quarantined] = {}
        self._history: dict[IPv4Address, Lease] = {}
        self._last_ip: dict[str, IPv4Address] = {}
        self._recovered: dict[IPv4Address, _Recovered] = {}
        # The recovered addresses of each known MAC, so a DISCOVER finds its own without
        # walking every recovered address (thousands after a lost lease file).
        self._recovered_of: dict[str, set[IPv4Address]] = {}
        # A hold or quarantine that ended: kept from new VMs until an ARP probe on the bridge
        # showed that nobody uses the address (probed()).
        self._unprobed: set[IPv4Address] = set()
        # Step 6 of the allocation order, kept ready so a DISCOVER does not scan the pool:
        # the addresses nothing holds (_holds), never-bound ones first in ascending order,
        # then the others oldest-ended first. Every change of what holds an address puts it
        # in or out (_requeue), so the first address of the order is the one to offer.
        self._order = _ReuseOrder((), (), self._in_pool)
        # The earliest time a lease, quarantine or recovered hold can end: expire() sweeps
        # them all, and walks every one of them, only from then on. Offers are left out:
        # one lapses every few DISCOVERs when clients do not REQUEST, and _offers is in the
        # order they lapse in (each offer goes in last, with the same hold), so expire()
        # ends them from its front.
        self._next_deadline = math.inf
        self._set_pool(pool)
        self._rebuild_order()
        self.set_reservations(reservations or {})

    # ------------------------------------------------------------------ queries

    @property
    def pool(self) -> tuple[IPv4Address, ...]:
        return tuple(map(IPv4Address, self._pool))

    def lease_of(self, mac: str, now: float) -> Lease | None:
        lease = self._leases.get(mac)
        return lease if lease is not None and lease.expires > now else None

    def offer_of(self, mac: str, now: float) -> Offer | None:
        offer = self._offers.get(mac)
        return offer if offer is not None and offer.until > now else None

    def lease_at(self, ip: IPv4Address, now: float) -> Lease | None:
        lease = self._lease_at.get(ip)
        return lease if lease is not None and lease.expires > now else None

    def holder(self, ip: IPv4Address, now: float) -> str | None:
        """The MAC holding `ip` by an active lease or an unexpired offer."""
        lease = self._lease_at.get(ip)
        if lease is not None and lease.expires > now:
            return lease.mac
        offer = self._offer_at.get(ip)
        if offer is not None and offer.until > now:
            return offer.mac
        return None

    def is_quarantined(self, ip: IPv4Address, now: float) -> bool:
        q = self._quarantine.get(ip)
        return q is not None and q.until > now

    def known_address(self, mac: str, now: float) -> IPv4Address | None:
        """The address the table would give this MAC without being asked, if it has one: the
        first of its own addresses, in allocation order, that it can use right now."""
        reserved = self._reserved.get(mac)
        # Reserved, or already leased/offered to it: not while someone else still holds it.
        if reserved is not None and self.standing(mac, reserved, now).mine:
            return reserved
        lease = self.lease_of(mac, now)
        if lease is not None:
            return lease.ip
        offer = self.offer_of(mac, now)
        if offer is not None:
            return offer.ip
        last = self._last_ip.get(mac)
        if last is not None and self.standing(mac, last, now) is Standing.REMEMBERED:
            return last
        for ip in sorted(self._recovered_of.get(mac, ())):  # the lowest first
            if self.standing(mac, ip, now) is Standing.RECOVERED_MINE:
                return ip
        return None

    def standing(self, mac: str, ip: IPv4Address, now: float) -> Standing:
        """Where `ip` stands for `mac`, first match wins (the order is the precedence)."""
        if not self._has(ip):
            return Standing.OUTSIDE_POOL
        if self.is_quarantined(ip, now):
            return Standing.QUARANTINED
        lease = self._lease_at.get(ip)
        if lease is not None and lease.expires > now:
            return Standing.LEASED if lease.mac == mac else Standing.HELD_BY_OTHER
        offer = self._offer_at.get(ip)
        if offer is not None and offer.until > now:
            return Standing.OFFERED if offer.mac == mac else Standing.HELD_BY_OTHER
        reserved_for = self._reserved_for.get(ip)
        if reserved_for is not None:
            return Standing.RESERVED if reserved_for == mac else Standing.RESERVED_FOR_OTHER
        recovered = self._recovered.get(ip)
        if recovered is not None and recovered.until > now:
            if recovered.mac == mac:
                return Standing.RECOVERED_MINE
            if recovered.mac:
                return Standing.HELD_BY_OTHER
        last = self._history.get(ip)
        if last is not None:
            return Standing.REMEMBERED if self._last_ip.get(mac) == ip else Standing.USED
        if recovered is not None and recovered.until > now:
            return Standing.RECOVERED
        return Standing.UNKNOWN

    def needs_route(self, ip: IPv4Address, now: float) -> bool:
        """Whether ip must have its /32 route: an active lease, or a recovered hold."""
        lease = self._lease_at.get(ip)
        if lease is not None and lease.expires > now:
            return True
        recovered = self._recovered.get(ip)
        return recovered is not None and recovered.until > now

    def routed_addresses(self, now: float) -> set[IPv4Address]:
        """Every address that must have its /32 route (see needs_route)."""
        return self.leased_addresses(now) | self.recovered_addresses(now)

    def leased_addresses(self, now: float) -> set[IPv4Address]:
        """The addresses of the active leases."""
        # A set made from a dict takes the hashes the dict stored; a set comprehension
        # calls IPv4Address.__hash__ (Python code) for each of 60,000 leases.
        leased = set(self._lease_at)
        leased.difference_update([ip for ip, le in self._lease_at.items() if le.expires <= now])
        return leased

    def recovered_addresses(self, now: float) -> set[IPv4Address]:
        """Addresses the kernel showed in use at start that no lease covers yet: their VMs
        keep their routes until they confirm them or the hold ends."""
        return {
            ip for ip, r in self._recovered.items() if r.until > now and ip not in self._lease_at
        }

    def identify(self, macs: Mapping[IPv4Address, str]) -> None:
        """The MACs that answered for held addresses (ARP): each address is confirmed to that
        MAC only (Standing.RECOVERED_MINE); without one, no VM can claim it."""
        for ip, mac in macs.items():
            held = self._recovered.get(ip)
            if held is not None and not held.mac:
                self._set_recovered(ip, _Recovered(mac, held.until))

    def unprobed(self) -> set[IPv4Address]:
        """Addresses whose hold or quarantine ended, to be asked for on the bridge (ARP)."""
        return set(self._unprobed)

    def probed(
        self, asked: Iterable[IPv4Address], answers: Mapping[IPv4Address, str], now: float,
        hold: float,
    ) -> list[Change]:  # fmt: skip
        """After the ARP probe of `asked`: an address some VM answered for is held again for
        that MAC (Hold), for `hold` seconds; the others are free for new VMs."""
        changes: list[Change] = []
        asked = set(asked)
        # Those still unprobed, and those held again: what holds them changed. By set
        # operations, on the hashes the sets keep (see _requeue).
        changed = asked & self._unprobed
        self._unprobed -= asked
        for ip in sorted(asked.intersection(answers), key=int):
            if self._has(ip) and self.holder(ip, now) is None:
                self._set_recovered(ip, _Recovered(answers[ip], now + hold))
                changes.append(Hold(ip, now + hold))
                changed.add(ip)
        self._requeue(changed)
        self._reset_deadline()
        return changes

    def leases(self, now: float) -> list[Lease]:
        return sorted((le for le in self._leases.values() if le.expires > now), key=_ip_key)

    def stats(self, now: float) -> PoolStats:
        leased = sum(1 for le in self._leases.values() if le.expires > now)
        offered = sum(1 for o in self._offers.values() if o.until > now)
        quarantined = sum(1 for q in self._quarantine.values() if q.until > now)
        # Only an address some index names can be taken: the rest of the pool is free.
        named = (
            self._lease_at.keys() | self._offer_at.keys() | self._quarantine.keys()
            | self._reserved_for.keys() | self._recovered.keys() | self._unprobed
        )  # fmt: skip
        taken = sum(1 for ip in named if self._has(ip) and not self._free_for_new(ip, now))
        return PoolStats(len(self._pool), leased, offered, quarantined, len(self._pool) - taken)

    def snapshot(self) -> TableSnapshot:
        return TableSnapshot(
            leases=tuple(sorted(self._leases.values(), key=_ip_key)),
            history=tuple(sorted(self._history.values(), key=_ip_key)),
            quarantine={ip: q.until for ip, q in sorted(self._quarantine.items())},
        )

    # ------------------------------------------------------------------ allocation

    def _free_for_new(self, ip: IPv4Address, now: float) -> bool:
        """Free to hand to a MAC that has no claim on it (step 6 of the allocation order)."""
        return self.holder(ip, now) is None and not self._kept(ip)

    def _kept(self, ip: IPv4Address) -> bool:
        """Kept from new clients whether or not they ask: reserved, quarantined, recovered, or
        waiting for its probe. Ended but not yet swept counts as kept: expire() passes it on
        to the probe."""
        return (
            ip in self._reserved_for
            or ip in self._recovered
            or ip in self._quarantine
            or ip in self._unprobed
        )

    def _choose(self, mac: str, now: float, requested: IPv4Address | None) -> IPv4Address | None:
        own = self.known_address(mac, now)
        if own is not None:
            return own
        if requested is not None and self.standing(mac, requested, now) is Standing.UNKNOWN:
            return requested
        return self._first_free()

    def _first_free(self) -> IPv4Address | None:
        """The first free address in the reuse order: the order holds only free ones, so
        this costs the same however many addresses are held."""
        value = self._order.first()
        return None if value is None else IPv4Address(value)

    # ------------------------------------------------------------------ mutations

    def offer(
        self, mac: str, now: float, requested: IPv4Address | None = None
    ) -> tuple[IPv4Address | None, list[Change]]:
        """Choose an address for `mac` and hold it for offer_hold seconds; None: pool exhausted."""
        changes = self.expire(now)
        ip = self._choose(mac, now, requested)
        if ip is None:
            return None, changes
        offer = Offer(mac, ip, now + self.offer_hold)
        # Held before the MAC's earlier offer is dropped: when that was for the same address,
        # the address does not go back to the order only to be taken out again.
        self._offer_at[ip] = offer
        self._drop_offer(mac)
        self._offers[mac] = offer
        self._order.discard(int(ip))
        if self._order.holes > self.compact_after:
            self._order.compact()
        return ip, changes

    def grant(
        self,
        mac: str,
        ip: IPv4Address,
        now: float,
        lease_time: float,
        *,
        hostname: str = "",
        client_id: str = "",
    ) -> list[Change]:
        """Bind `ip` to `mac` until now + lease_time (a renewal when it already holds it).

        Raises ValueError if the address is someone else's or not in the pool: the policy
        checks standing() first, so that is a bug, never a client's doing.
        """
        changes = self.expire(now)
        standing = self.standing(mac, ip, now)
        if standing not in _GRANTABLE:
            raise ValueError(f"cannot grant {ip} to {mac}: address is {standing.value}")
        old = self._leases.get(mac)
        lease = Lease(
            mac,
            ip,
            now + lease_time,
            hostname or (old.hostname if old else ""),
            client_id or (old.client_id if old else ""),
        )
        if old is not None and old.ip == ip:
            changes.append(Renew(lease))
        else:
            if old is not None:
                changes.append(Revoke(self._end_lease(old, now), "moved"))
            changes.append(Grant(lease))
        self._leases[mac] = lease
        self._lease_at[ip] = lease  # before the offer is dropped: see offer()
        self._drop_offer(mac)
        self._unrecover(ip)
        self._remember(lease)
        self._order.discard(int(ip))
        self._next_deadline = min(self._next_deadline, lease.expires)
        return changes

    def release(self, mac: str, ip: IPv4Address, now: float) -> list[Change]:
        """End `mac`'s lease on `ip` (RFC 2131 §4.3.4); nothing happens for anyone else."""
        changes = self.expire(now)
        lease = self._leases.get(mac)
        if lease is not None and lease.ip == ip:
            changes.append(Release(self._end_lease(lease, now)))
        return changes

    def decline(self, mac: str, ip: IPv4Address, now: float, hold: float) -> list[Change]:
        """`mac` found `ip` in use (RFC 2131 §4.3.3): end its binding, keep the address out.

        Only the MAC holding `ip` (lease or offer) can decline it. Each MAC keeps at most one
        address in quarantine: a further DECLINE while one is running ends the binding but
        quarantines nothing, so a VM declining in a loop cannot drain the pool.
        """
        changes = self.expire(now)
        lease = self._leases.get(mac)
        holds_lease = lease is not None and lease.ip == ip
        offer = self._offers.get(mac)
        holds_offer = offer is not None and offer.ip == ip
        if not (holds_lease or holds_offer):
            return changes
        ended = self._end_lease(lease, now) if lease is not None and holds_lease else None
        if holds_offer:
            self._drop_offer(mac)
        # The address is nobody's to come back to; it goes last in the reuse order.
        self._remember(Lease("", ip, now))
        already = any(q.mac == mac and q.until > now for q in self._quarantine.values())
        if already:
            self._requeue({ip})
            if ended is not None:
                changes.append(Release(ended))
            return changes
        until = now + hold
        self._quarantine[ip] = _Quarantined(until, mac)
        self._requeue({ip})
        self._next_deadline = min(self._next_deadline, until)
        changes.append(Quarantine(ip, until, ended))
        return changes

    def withdraw(self, mac: str, now: float) -> list[Change]:
        """Drop `mac`'s offer: it chose another server (RFC 2131 §4.3.2)."""
        changes = self.expire(now)
        offer = self._offers.get(mac)
        if offer is not None:
            self._drop_offer(mac)
            changes.append(Withdraw(mac, offer.ip))
        return changes

    def expire(self, now: float) -> list[Change]:
        """End what ran out by `now`: leases (returned), offers, quarantines, recovered marks."""
        if now < self._next_deadline:
            while self._offers:
                offer = next(iter(self._offers.values()))
                if offer.until > now:
                    break
                self._drop_offer(offer.mac)
            return []
        changes: list[Change] = []
        ended = sorted((le for le in self._leases.values() if le.expires <= now), key=_end_key)
        for lease in ended:
            self._end_lease(lease, lease.expires)
            changes.append(Expire(lease))
        for offer in [o for o in self._offers.values() if o.until <= now]:
            self._drop_offer(offer.mac)
        self._unprobed.update(ip for ip, q in self._quarantine.items() if q.until <= now)
        self._quarantine = {ip: q for ip, q in self._quarantine.items() if q.until > now}
        # Only the holds that ended are taken out: rebuilding the dict and its per-MAC index
        # hashes every key again (Python code), 15 ms with 20,000 held, at every lease end.
        for ip in [ip for ip, r in self._recovered.items() if r.until <= now]:
            self._unrecover(ip)
            if ip not in self._lease_at:
                self._unprobed.add(ip)
        self._reset_deadline()
        return changes

    def set_pool(self, ips: Iterable[IPv4Address | int], now: float) -> list[Change]:
        """Replace the pool (SIGHUP): leases outside it end, the rest outside is forgotten."""
        changes = self.expire(now)
        self._set_pool(ips)
        for lease in [le for le in self._leases.values() if not self._has(le.ip)]:
            changes.append(Revoke(self._end_lease(lease, now), "outside_pool"))
        for offer in [o for o in self._offers.values() if not self._has(o.ip)]:
            self._drop_offer(offer.mac)
            changes.append(Withdraw(offer.mac, offer.ip))
        self._quarantine = {ip: q for ip, q in self._quarantine.items() if self._has(ip)}
        self._recovered = {ip: r for ip, r in self._recovered.items() if self._has(ip)}
        self._index_recovered()
        self._unprobed = {ip for ip in self._unprobed if self._has(ip)}
        for ip in [ip for ip in self._history if not self._has(ip)]:
            self._forget(ip)
        self._rebuild_order()
        return changes

    def set_reservations(self, reservations: Mapping[str, IPv4Address]) -> None:
        """Replace the reservations; one that is leased to another MAC waits until it is free."""
        before = self._reserved_for.keys()
        self._reserved = dict(reservations)
        self._reserved_for = {ip: mac for mac, ip in reservations.items()}
        self._requeue(before ^ self._reserved_for.keys())

    def load(
        self,
        leases: Iterable[Lease],
        history: Iterable[Lease],
        quarantine: Mapping[IPv4Address, float],
        now: float,
        *,
        in_use: Mapping[IPv4Address, str] | None = None,
        recovery_hold: float = 86400.0,
        holds: Mapping[IPv4Address, float] | None = None,
    ) -> list[Change]:
        """Rebuild from the store, replacing everything but the pool and reservations.

        Returns what was not taken as-is: leases outside the pool (Revoke "outside_pool"),
        an address or MAC listed twice (the later expiry wins, the other is Revoke
        "duplicate_ip" / "duplicate_mac"), leases that ran out while we were down (Expire).
        `in_use` maps addresses the kernel shows in use (our /32 routes) to a MAC if known
        (else ""); those without a lease are held out of allocation for `recovery_hold`
        seconds and confirmed only to a VM that asks for them (policy.py: lease-loss rules).
        `holds` are the deadlines an earlier start set (Hold): such an address is held until
        then and no longer, however often the daemon restarts; a new hold is returned as Hold.
        """
        self._leases.clear()
        self._lease_at.clear()
        self._offers.clear()
        self._offer_at.clear()
        self._history.clear()
        self._last_ip.clear()
        self._recovered.clear()
        self._unprobed = {ip for ip, until in quarantine.items() if until <= now and self._has(ip)}
        self._quarantine = {
            ip: _Quarantined(until, "")
            for ip, until in quarantine.items()
            if self._has(ip) and until > now
        }
        for past in sorted(history, key=lambda le: le.expires):
            if self._has(past.ip):
                self._remember(past)
        # A declined address is nobody's to come back to and goes last in the reuse order,
        # as decline() leaves it; the store keeps the quarantine, not that mark.
        for ip, declined in self._quarantine.items():
            if ip not in self._history:
                self._remember(Lease("", ip, declined.until))
        changes: list[Change] = []
        ended: list[IPv4Address] = []
        for lease in sorted(leases, key=lambda le: le.expires, reverse=True):
            if not self._has(lease.ip):
                changes.append(Revoke(lease, "outside_pool"))
            elif lease.ip in self._lease_at:
                changes.append(Revoke(lease, "duplicate_ip"))
            elif lease.mac in self._leases:
                changes.append(Revoke(lease, "duplicate_mac"))
            elif lease.expires <= now:
                self._lease_at[lease.ip] = lease  # claims the address against older duplicates
                ended.append(lease.ip)
                self._remember_if_newer(lease)
                changes.append(Expire(lease))
            else:
                self._leases[lease.mac] = lease
                self._lease_at[lease.ip] = lease
                self._remember_if_newer(lease)
        # Expired leases only blocked older duplicates above; they hold nothing now.
        for ip in ended:
            del self._lease_at[ip]
        for ip, mac in (in_use or {}).items():
            if self._has(ip) and ip not in self._lease_at:
                until = (holds or {}).get(ip)
                if until is None:
                    until = now + recovery_hold
                    changes.append(Hold(ip, until))
                if until > now:
                    self._recovered[ip] = _Recovered(mac, until)
                else:
                    self._unprobed.add(ip)
        self._index_recovered()
        self._rebuild_order()
        self._reset_deadline()
        return changes

    # ------------------------------------------------------------------ internals

    def _set_pool(self, ips: Iterable[IPv4Address | int]) -> None:
        self._pool = array("I", sorted({int(ip) for ip in ips}))
        low = self._pool[0] if self._pool else 0
        self._in_pool = _Span(low, self._pool[-1] - low + 1 if self._pool else 0)
        for value in self._pool:
            self._in_pool.put(value, True)

    def _has(self, ip: IPv4Address) -> bool:
        return self._in_pool.has(int(ip))

    def _rebuild_order(self) -> None:
        # Marks per address of the span, from ints: hashing 60,000 IPv4Address keys runs
        # Python code for each. 1: held (_holds), 2: free and bound before.
        span = self._in_pool
        marks = bytearray(len(span.flags))
        for ip in chain(*self._holds()):
            if span.has(int(ip)):
                marks[int(ip) - span.base] = 1
        idle = [le for le in self._history.values() if not marks[int(le.ip) - span.base]]
        for lease in idle:
            marks[int(lease.ip) - span.base] = 2
        self._order = _ReuseOrder(
            (v for v in self._pool if not marks[v - span.base]),
            (int(le.ip) for le in sorted(idle, key=_end_key)),
            span,
        )

    def _requeue(self, ips: set[IPv4Address]) -> None:
        """What holds `ips` changed: each one free now goes to the back of its group (a
        lapsed offer, a dropped reservation, a probed hold: the last to go to a new client),
        in ascending order; each one held leaves the order.

        By set operations, which use the hashes the sets and dicts keep: hashing an
        IPv4Address runs Python code, and a hold can end for 20,000 addresses at once."""
        free = ips
        for holds in self._holds():
            free = free.difference(holds)
        fresh = free.difference(self._history)
        for group, used in ((fresh, False), (free - fresh, True)):
            for value in sorted(map(int, group)):
                if self._in_pool.has(value):
                    self._order.push(value, used)
                else:
                    self._order.discard(value)
        for value in map(int, ips - free):
            self._order.discard(value)

    def _holds(self) -> tuple[Iterable[IPv4Address], ...]:
        """What keeps an address out of the reuse order. A lease or offer counts until
        expire() sweeps it, as every mutation does first."""
        return (
            self._lease_at, self._offer_at, self._reserved_for, self._recovered,
            self._quarantine, self._unprobed,
        )  # fmt: skip

    def _set_recovered(self, ip: IPv4Address, held: _Recovered) -> None:
        """Hold ip for held.mac, keeping the per-MAC index in step."""
        self._unrecover(ip)
        self._recovered[ip] = held
        if held.mac:
            self._recovered_of.setdefault(held.mac, set()).add(ip)

    def _unrecover(self, ip: IPv4Address) -> None:
        """End the recovered hold on ip, if any, keeping the per-MAC index in step."""
        held = self._recovered.pop(ip, None)
        if held is not None and held.mac:
            self._recovered_of.get(held.mac, set()).discard(ip)

    def _index_recovered(self) -> None:
        self._recovered_of = {}
        for ip, rec in self._recovered.items():
            if rec.mac:
                self._recovered_of.setdefault(rec.mac, set()).add(ip)

    def _reset_deadline(self) -> None:
        self._next_deadline = min(
            [le.expires for le in self._leases.values()]
            + [q.until for q in self._quarantine.values()]
            + [r.until for r in self._recovered.values()],
            default=math.inf,
        )

    def _end_lease(self, lease: Lease, at: float) -> Lease:
        """Remove `lease` from the active set; the returned record says when it ended."""
        ended = replace(lease, expires=min(lease.expires, at))
        del self._leases[lease.mac]
        if self._lease_at.get(lease.ip) is lease:
            del self._lease_at[lease.ip]
        self._remember(ended)
        self._requeue({lease.ip})
        return ended

    def _drop_offer(self, mac: str) -> None:
        offer = self._offers.pop(mac, None)
        if offer is not None and self._offer_at.get(offer.ip) is offer:
            del self._offer_at[offer.ip]
            # Taken by a REQUEST (grant() leases it first), it stays out of the order.
            if offer.ip not in self._lease_at:
                self._requeue({offer.ip})

    def _remember(self, lease: Lease) -> None:
        """Make `lease` the last binding of its address (and its MAC's last address)."""
        previous = self._history.get(lease.ip)
        if (
            previous is not None
            and previous.mac != lease.mac
            and self._last_ip.get(previous.mac) == lease.ip
        ):
            del self._last_ip[previous.mac]
        self._history[lease.ip] = lease
        if lease.mac:
            self._last_ip[lease.mac] = lease.ip

    def _remember_if_newer(self, lease: Lease) -> None:
        known = self._history.get(lease.ip)
        if known is None or known.expires <= lease.expires:
            self._remember(lease)

    def _forget(self, ip: IPv4Address) -> None:
        last = self._history.pop(ip)
        if self._last_ip.get(last.mac) == ip:
            del self._last_ip[last.mac]


def _ip_key(lease: Lease) -> int:
    return int(lease.ip)


def _end_key(lease: Lease) -> tuple[float, int]:
    return (lease.expires, int(lease.ip))
