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
(an address offered and not taken, or stepped over while it was held, goes to the back of its
group: each DISCOVER then costs O(1) amortized, whatever number of addresses is held).
"""

from __future__ import annotations

import enum
import math
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import ClassVar, TypeVar

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


@dataclass(frozen=True)
class Offer:
    mac: str
    ip: IPv4Address
    until: float


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

_T = TypeVar("_T")


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


class _Queue:
    """Pool addresses in allocation order, each removed or moved to the back in O(1).

    The order it was built in is kept as a run of ints read from a cursor, with a flag per
    address of the pool's span saying which of them are still queued there; an address moved
    to the back leaves the run for good and joins the tail, a dict kept in the order of the
    moves. A dict keeps a hole for each key taken from it until it is copied, and finding its
    first key steps over them all: compact() copies the tail afresh.
    """

    __slots__ = ("_pos", "_queued", "_run", "_tail")

    def __init__(self, run: Iterable[int], span: _Span) -> None:
        self._run = array("I", run)
        self._pos = 0  # every queued address of the run is at this index or after it
        self._queued = _Span(span.base, len(span.flags))
        for value in self._run:
            self._queued.put(value, True)
        self._tail: dict[int, None] = {}

    def __iter__(self) -> Iterator[int]:
        run, queued = self._run, self._queued
        yield from (run[i] for i in range(self._pos, len(run)) if queued.has(run[i]))
        yield from self._tail

    def discard(self, value: int) -> bool:
        """Take `value` out of the queue; whether it was in it."""
        if self._queued.has(value):
            self._queued.put(value, False)
            return True
        return self._tail.pop(value, 0) is None

    def to_back(self, value: int) -> None:
        """Move `value` to the back, if it is queued."""
        if self.discard(value):
            self._tail[value] = None

    def push(self, value: int) -> None:
        """Put `value` at the back, whether it was queued or not."""
        self.discard(value)
        self._tail[value] = None

    def first(self, take: Callable[[int], _T | None]) -> tuple[_T | None, int]:
        """What `take` makes of the first address it does not refuse (None), and how many
        were refused on the way: those go to the back, in the order they were met, so that
        the next call does not meet them first."""
        run, queued = self._run, self._queued
        skipped: list[int] = []
        found = None
        pos = self._pos
        while pos < len(run):
            value = run[pos]
            if queued.has(value):
                found = take(value)
                if found is not None:
                    break
                skipped.append(value)
            pos += 1
        self._pos = pos
        if found is None:
            for value in self._tail:
                found = take(value)
                if found is not None:
                    break
                skipped.append(value)
        for value in skipped:
            self.to_back(value)
        return found, len(skipped)

    def compact(self) -> None:
        self._tail = dict(self._tail)


# ---------------------------------------------------------------------------- the table


class LeaseTable:
    # Addresses moved in the reuse order (offered, or stepped over) before its tails are
    # copied afresh (_Queue.compact). A dict keeps a hole for each key taken from it, and
    # finding its first key steps over all of them: ~20 us per DISCOVER after 20,000 grants
    # on a /16. Copying 65,000 entries every 4,096 takes ~0.5 us per DISCOVER.
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
        # never-bound addresses in ascending order, then unleased ones oldest-ended first.
        self._fresh = _Queue((), self._in_pool)
        self._idle = _Queue((), self._in_pool)
        self._holes = 0  # moved in _fresh or _idle since their tails were copied
        # The earliest time anything above can expire: expire() is free before it.
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
        """The address the table would give this MAC without being asked, if it has one."""
        return next(iter(self._own_candidates(mac, now)), None)

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
        for ip in asked:
            self._unprobed.discard(ip)
            mac = answers.get(ip)
            if mac is not None and self._has(ip) and self.holder(ip, now) is None:
                self._set_recovered(ip, _Recovered(mac, now + hold))
                changes.append(Hold(ip, now + hold))
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

    def _own_candidates(self, mac: str, now: float) -> Iterable[IPv4Address]:
        """This MAC's own addresses in allocation order, each only if usable right now."""
        reserved = self._reserved.get(mac)
        # Reserved, or already leased/offered to it: not while someone else still holds it.
        if reserved is not None and self.standing(mac, reserved, now).mine:
            yield reserved
        lease = self.lease_of(mac, now)
        if lease is not None:
            yield lease.ip
        offer = self.offer_of(mac, now)
        if offer is not None:
            yield offer.ip
        last = self._last_ip.get(mac)
        if last is not None and self.standing(mac, last, now) is Standing.REMEMBERED:
            yield last
        for ip in sorted(self._recovered_of.get(mac, ()), key=int):
            if self.standing(mac, ip, now) is Standing.RECOVERED_MINE:
                yield ip

    def _free_for_new(self, ip: IPv4Address, now: float) -> bool:
        """Free to hand to a MAC that has no claim on it (step 6 of the allocation order)."""
        return (
            self.holder(ip, now) is None
            and not self.is_quarantined(ip, now)
            and ip not in self._reserved_for
            # Ended but not yet swept counts as held: expire() passes it on to the probe.
            and ip not in self._recovered
            and ip not in self._quarantine
            and ip not in self._unprobed
        )

    def _choose(self, mac: str, now: float, requested: IPv4Address | None) -> IPv4Address | None:
        own = self.known_address(mac, now)
        if own is not None:
            return own
        if requested is not None and self.standing(mac, requested, now) is Standing.UNKNOWN:
            return requested
        return self._first_free(now)

    def _first_free(self, now: float) -> IPv4Address | None:
        """The first free address in the reuse order. Those stepped over on the way are held
        (offered, quarantined, reserved, recovered) and go to the back of their queue: each
        is stepped over once, not by every DISCOVER, so allocation costs O(1) amortized
        however many addresses are held."""

        def free(value: int) -> IPv4Address | None:
            ip = IPv4Address(value)
            return ip if self._free_for_new(ip, now) else None

        for queue in (self._fresh, self._idle):
            found, skipped = queue.first(free)
            self._holes += skipped
            if found is not None:
                return found
        return None

    # ------------------------------------------------------------------ mutations

    def offer(
        self, mac: str, now: float, requested: IPv4Address | None = None
    ) -> tuple[IPv4Address | None, list[Change]]:
        """Choose an address for `mac` and hold it for offer_hold seconds; None: pool exhausted."""
        changes = self.expire(now)
        ip = self._choose(mac, now, requested)
        if ip is None:
            return None, changes
        self._drop_offer(mac)
        # An offered address goes to the back of its queue, so the next DISCOVER finds a
        # free one at the front instead of stepping over every offer still outstanding (a
        # burst of clients that never REQUEST would otherwise make each DISCOVER O(offers)).
        value = int(ip)
        self._fresh.to_back(value)
        self._idle.to_back(value)
        self._holes += 1
        if self._holes > self.compact_after:
            self._fresh.compact()
            self._idle.compact()
            self._holes = 0
        offer = Offer(mac, ip, now + self.offer_hold)
        self._offers[mac] = offer
        self._offer_at[ip] = offer
        self._next_deadline = min(self._next_deadline, offer.until)
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
        self._drop_offer(mac)
        recovered = self._recovered.pop(ip, None)
        if recovered is not None:
            self._recovered_of.get(recovered.mac, set()).discard(ip)
        self._leases[mac] = lease
        self._lease_at[ip] = lease
        self._remember(lease)
        value = int(ip)
        self._fresh.discard(value)
        self._idle.discard(value)
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
        self._idle_last(ip)
        already = any(q.mac == mac and q.until > now for q in self._quarantine.values())
        if already:
            if ended is not None:
                changes.append(Release(ended))
            return changes
        until = now + hold
        self._quarantine[ip] = _Quarantined(until, mac)
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
            return []
        changes: list[Change] = []
        ended = sorted((le for le in self._leases.values() if le.expires <= now), key=_end_key)
        for lease in ended:
            self._end_lease(lease, lease.expires)
            changes.append(Expire(lease))
        for offer in [o for o in self._offers.values() if o.until <= now]:
            self._drop_offer(offer.mac)
        self._unprobed.update(ip for ip, q in self._quarantine.items() if q.until <= now)
        self._unprobed.update(
            ip for ip, r in self._recovered.items() if r.until <= now and ip not in self._lease_at
        )
        self._quarantine = {ip: q for ip, q in self._quarantine.items() if q.until > now}
        self._recovered = {ip: r for ip, r in self._recovered.items() if r.until > now}
        self._index_recovered()
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
        self._reserved = dict(reservations)
        self._reserved_for = {ip: mac for mac, ip in reservations.items()}

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
        used = {int(ip) for ip in self._history}
        self._fresh = _Queue((v for v in self._pool if v not in used), self._in_pool)
        idle = [le for ip, le in self._history.items() if ip not in self._lease_at]
        self._idle = _Queue((int(le.ip) for le in sorted(idle, key=_end_key)), self._in_pool)

    def _set_recovered(self, ip: IPv4Address, held: _Recovered) -> None:
        """Hold ip for held.mac, keeping the per-MAC index in step."""
        old = self._recovered.get(ip)
        if old is not None and old.mac:
            self._recovered_of.get(old.mac, set()).discard(ip)
        self._recovered[ip] = held
        if held.mac:
            self._recovered_of.setdefault(held.mac, set()).add(ip)

    def _index_recovered(self) -> None:
        self._recovered_of = {}
        for ip, rec in self._recovered.items():
            if rec.mac:
                self._recovered_of.setdefault(rec.mac, set()).add(ip)

    def _idle_last(self, ip: IPv4Address) -> None:
        """`ip` just became free after use: the last to go to a new client."""
        self._fresh.discard(int(ip))
        self._idle.push(int(ip))

    def _reset_deadline(self) -> None:
        self._next_deadline = min(
            [le.expires for le in self._leases.values()]
            + [o.until for o in self._offers.values()]
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
        self._idle_last(lease.ip)
        return ended

    def _drop_offer(self, mac: str) -> None:
        offer = self._offers.pop(mac, None)
        if offer is not None and self._offer_at.get(offer.ip) is offer:
            del self._offer_at[offer.ip]

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
