"""The lease table: allocation order, stickiness, quarantine, reload, and its invariants."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cocoon_net.dhcp.leases import (
    Expire,
    Grant,
    Hold,
    LeaseTable,
    Quarantine,
    Release,
    Renew,
    Revoke,
    Standing,
    Withdraw,
    _ReuseOrder,
    _Span,
)
from cocoon_net.dhcp.model import Lease

A = IPv4Address
NET = "172.20.100."
POOL = [A(NET + str(i)) for i in range(2, 8)]  # .2 .. .7
DAY = 86400.0


def mac(n: int) -> str:
    return f"02:00:00:00:00:{n:02x}"


def ip(n: int) -> IPv4Address:
    return A(NET + str(n))


def dora(table: LeaseTable, m: str, now: float, requested: IPv4Address | None = None) -> Lease:
    addr, _ = table.offer(m, now, requested)
    assert addr is not None
    table.grant(m, addr, now, DAY)
    lease = table.lease_of(m, now)
    assert lease is not None
    return lease


def test_new_clients_get_never_used_addresses_in_ascending_order() -> None:
    table = LeaseTable(reversed(POOL))
    got = [table.offer(mac(i), 0.0)[0] for i in range(len(POOL))]
    assert got == POOL
    assert table.offer(mac(99), 0.0) == (None, [])  # exhausted


def test_least_recently_used_address_is_reused_first() -> None:
    table = LeaseTable(POOL[:3])
    for i, when in ((1, 10.0), (2, 20.0), (3, 30.0)):
        dora(table, mac(i), when)
    table.release(mac(3), ip(4), 40.0)
    table.release(mac(1), ip(2), 50.0)
    table.release(mac(2), ip(3), 60.0)
    # A stranger gets the address freed longest ago, .4 (released at 40).
    assert table.offer(mac(9), 70.0)[0] == ip(4)


def test_sticky_after_expiry() -> None:
    table = LeaseTable(POOL)
    first = dora(table, mac(1), 0.0).ip
    changes = table.expire(DAY + 1)
    assert changes == [Expire(Lease(mac(1), first, DAY))]
    assert table.expire(DAY + 2) == []  # reported once
    other = dora(table, mac(2), DAY + 5).ip
    assert other != first  # a never-used address before someone's old one
    assert dora(table, mac(1), DAY + 10).ip == first


def test_a_returning_mac_waits_while_its_last_address_is_offered_to_another() -> None:
    table = LeaseTable(POOL[:1])
    dora(table, mac(1), 0.0)
    table.release(mac(1), ip(2), 10.0)
    assert table.offer(mac(2), 20.0)[0] == ip(2)  # the only address, free
    assert table.known_address(mac(1), 30.0) is None
    assert table.offer(mac(1), 30.0)[0] is None  # mac(2)'s offer holds it
    # That offer lapses at 80: the address is mac(1)'s last one again.
    assert table.known_address(mac(1), 81.0) == ip(2)
    assert table.offer(mac(1), 81.0)[0] == ip(2)


def test_sticky_after_reload_from_snapshot() -> None:
    table = LeaseTable(POOL)
    dora(table, mac(1), 0.0)
    gone = dora(table, mac(2), 0.0).ip
    table.release(mac(2), gone, 10.0)
    snap = table.snapshot()
    fresh = LeaseTable(POOL)
    assert fresh.load(snap.leases, snap.history, snap.quarantine, 20.0) == []
    assert fresh.snapshot() == snap
    assert fresh.lease_of(mac(1), 20.0) == table.lease_of(mac(1), 20.0)
    assert fresh.offer(mac(3), 30.0)[0] not in {ip(2), gone}
    assert fresh.offer(mac(2), 30.0)[0] == gone


def test_requested_address_only_when_nobody_else_claims_it() -> None:
    table = LeaseTable(POOL, reservations={mac(8): ip(5)})
    assert table.offer(mac(1), 0.0, ip(4))[0] == ip(4)
    assert table.offer(mac(2), 0.0, ip(5))[0] == ip(2)  # reserved for mac 8
    assert table.offer(mac(3), 0.0, ip(4))[0] == ip(3)  # offered to mac 1
    assert table.offer(mac(4), 0.0, A("10.9.9.9"))[0] == ip(6)  # not in the pool
    table.withdraw(mac(1), 1.0)
    table.grant(mac(5), ip(4), 1.0, 10.0)
    table.expire(20.0)  # .4 is now free but remembered for mac 5
    assert table.offer(mac(6), 20.0, ip(4))[0] == ip(7)


def test_reservation_first_and_waits_while_someone_else_holds_it() -> None:
    table = LeaseTable(POOL)
    dora(table, mac(1), 0.0)  # takes .2
    table.set_reservations({mac(2): ip(2), mac(3): ip(6)})
    assert table.offer(mac(3), 1.0)[0] == ip(6)
    assert table.offer(mac(2), 1.0)[0] == ip(3)  # .2 is leased to mac 1 until it ends
    table.release(mac(1), ip(2), 2.0)
    assert table.offer(mac(2), 3.0)[0] == ip(2)


def test_a_new_reservation_moves_a_leased_client_and_stays_put() -> None:
    table = LeaseTable(POOL)
    dora(table, mac(1), 0.0)  # .2
    table.set_reservations({mac(1): ip(6)})
    assert table.offer(mac(1), 1.0)[0] == ip(6)
    assert table.offer(mac(1), 2.0)[0] == ip(6)  # a second DISCOVER: still the reservation
    changes = table.grant(mac(1), ip(6), 3.0, DAY)
    assert [type(c) for c in changes] == [Revoke, Grant]
    assert table.offer(mac(1), 4.0)[0] == ip(6)


def test_offer_holds_an_address_for_offer_hold_seconds() -> None:
    table = LeaseTable(POOL[:1], offer_hold=60.0)
    assert table.offer(mac(1), 0.0)[0] == ip(2)
    assert table.offer(mac(2), 59.0)[0] is None
    assert table.offer(mac(1), 59.0)[0] == ip(2)  # re-DISCOVER refreshes it
    assert table.offer(mac(2), 100.0)[0] is None
    assert table.offer(mac(2), 119.0)[0] == ip(2)


def test_grant_renew_and_move() -> None:
    table = LeaseTable(POOL)
    [grant] = table.grant(mac(1), ip(3), 0.0, 100.0, hostname="vm1", client_id="01ab")
    assert grant == Grant(Lease(mac(1), ip(3), 100.0, "vm1", "01ab"))
    [renew] = table.grant(mac(1), ip(3), 50.0, 100.0)
    assert renew == Renew(Lease(mac(1), ip(3), 150.0, "vm1", "01ab"))  # names kept
    moved = table.grant(mac(1), ip(4), 60.0, 100.0)
    assert moved == [
        Revoke(Lease(mac(1), ip(3), 60.0, "vm1", "01ab"), "moved"),
        Grant(Lease(mac(1), ip(4), 160.0, "vm1", "01ab")),
    ]
    assert table.holder(ip(3), 61.0) is None


def test_grant_refuses_what_is_not_grantable() -> None:
    table = LeaseTable(POOL, reservations={mac(9): ip(7)})
    table.grant(mac(1), ip(2), 0.0, 100.0)
    table.offer(mac(2), 0.0)
    for addr in (ip(2), ip(3), ip(7), A("10.0.0.1")):
        with pytest.raises(ValueError, match="cannot grant"):
            table.grant(mac(5), addr, 1.0, 100.0)


def test_release_only_by_the_holder_of_that_address() -> None:
    table = LeaseTable(POOL)
    lease = dora(table, mac(1), 0.0)
    assert table.release(mac(2), lease.ip, 1.0) == []
    assert table.release(mac(1), ip(7), 1.0) == []
    assert table.lease_of(mac(1), 1.0) == lease
    [rel] = table.release(mac(1), lease.ip, 2.0)
    assert rel == Release(Lease(mac(1), lease.ip, 2.0))
    assert table.lease_of(mac(1), 2.0) is None


def test_decline_quarantines_and_the_address_comes_back_last() -> None:
    table = LeaseTable(POOL[:2])
    lease = dora(table, mac(1), 0.0)
    assert table.decline(mac(2), lease.ip, 1.0, 600.0) == []  # not the holder
    [q] = table.decline(mac(1), lease.ip, 1.0, 600.0)
    assert q == Quarantine(lease.ip, 601.0, Lease(mac(1), lease.ip, 1.0))
    assert table.standing(mac(1), lease.ip, 2.0) is Standing.QUARANTINED
    assert dora(table, mac(1), 2.0).ip == ip(3)  # not its old address
    assert table.offer(mac(2), 3.0)[0] is None  # .2 quarantined, .3 offered
    assert table.snapshot().quarantine == {lease.ip: 601.0}
    # Probation over: nobody gets it before the bridge was asked whether someone uses it.
    assert table.offer(mac(2), 602.0)[0] is None
    table.expire(602.0)
    assert table.unprobed() == {lease.ip}
    assert table.offer(mac(2), 602.0)[0] is None
    assert table.probed({lease.ip}, {}, 603.0, 600.0) == []
    assert table.offer(mac(2), 603.0)[0] == lease.ip


def test_an_ended_hold_that_still_answers_arp_is_held_again() -> None:
    table = LeaseTable(POOL[:1])
    assert table.load([], [], {}, 0.0, in_use={ip(2): ""}, recovery_hold=10.0) == [
        Hold(ip(2), 10.0)
    ]
    table.expire(11.0)
    assert table.offer(mac(1), 11.0)[0] is None
    assert table.probed({ip(2)}, {ip(2): mac(9)}, 12.0, 10.0) == [Hold(ip(2), 22.0)]
    assert table.standing(mac(9), ip(2), 13.0) is Standing.RECOVERED_MINE
    assert table.offer(mac(1), 13.0)[0] is None


def test_one_quarantine_per_mac_so_a_decline_loop_cannot_drain_the_pool() -> None:
    table = LeaseTable(POOL)
    first = dora(table, mac(1), 0.0)
    table.decline(mac(1), first.ip, 1.0, 600.0)
    second = dora(table, mac(1), 2.0)
    assert table.decline(mac(1), second.ip, 3.0, 600.0) == [Release(Lease(mac(1), second.ip, 3.0))]
    assert table.stats(4.0).quarantined == 1
    assert table.standing(mac(2), second.ip, 4.0) is Standing.USED


def test_declining_an_offer() -> None:
    table = LeaseTable(POOL)
    addr, _ = table.offer(mac(1), 0.0)
    assert addr is not None
    assert table.decline(mac(1), addr, 1.0, 60.0) == [Quarantine(addr, 61.0, None)]
    assert table.offer_of(mac(1), 1.0) is None


def test_withdraw_drops_the_offer() -> None:
    table = LeaseTable(POOL[:1])
    addr, _ = table.offer(mac(1), 0.0)
    assert table.withdraw(mac(1), 1.0) == [Withdraw(mac(1), ip(2))]
    assert table.withdraw(mac(1), 1.0) == []
    assert table.offer(mac(2), 1.0)[0] == addr


def test_set_pool_revokes_leases_outside_and_forgets_the_rest() -> None:
    table = LeaseTable(POOL)
    inside = dora(table, mac(1), 0.0)
    outside = dora(table, mac(2), 0.0)
    table.offer(mac(3), 0.0)  # .4
    changes = table.set_pool([inside.ip, ip(7)], 10.0)
    assert changes == [
        Revoke(Lease(mac(2), outside.ip, 10.0), "outside_pool"),
        Withdraw(mac(3), ip(4)),
    ]
    assert table.pool == (inside.ip, ip(7))
    assert all(le.ip in table.pool for le in table.snapshot().history)
    assert table.offer(mac(2), 11.0)[0] == ip(7)


def test_load_reports_duplicates_outside_and_expired() -> None:
    table = LeaseTable(POOL)
    early = Lease(mac(1), ip(2), 500.0)
    late = Lease(mac(2), ip(2), 900.0)
    twice_old = Lease(mac(3), ip(3), 400.0)
    twice_new = Lease(mac(3), ip(4), 800.0)
    foreign = Lease(mac(4), A("10.0.0.9"), 900.0)
    stale = Lease(mac(5), ip(5), 50.0)
    changes = table.load([early, late, twice_old, twice_new, foreign, stale], [], {}, 100.0)
    assert set(changes) == {
        Revoke(early, "duplicate_ip"),
        Revoke(twice_old, "duplicate_mac"),
        Revoke(foreign, "outside_pool"),
        Expire(stale),
    }
    assert table.leases(100.0) == [late, twice_new]
    assert table.standing(mac(5), ip(5), 100.0) is Standing.REMEMBERED
    assert table.holder(ip(3), 100.0) is None


def test_load_keeps_running_quarantine_only() -> None:
    table = LeaseTable(POOL)
    table.load([], [], {ip(2): 200.0, ip(3): 50.0, A("10.0.0.1"): 900.0}, 100.0)
    assert table.snapshot().quarantine == {ip(2): 200.0}


def test_recovered_addresses_are_never_offered_but_can_be_confirmed() -> None:
    table = LeaseTable(POOL)
    table.load([], [], {}, 0.0, in_use={ip(2): "", ip(3): mac(7)}, recovery_hold=1000.0)
    assert table.standing(mac(1), ip(2), 1.0) is Standing.RECOVERED
    assert table.standing(mac(7), ip(3), 1.0) is Standing.RECOVERED_MINE
    assert table.standing(mac(1), ip(3), 1.0) is Standing.HELD_BY_OTHER
    assert table.offer(mac(1), 1.0)[0] == ip(4)
    assert table.offer(mac(7), 1.0)[0] == ip(3)  # its own, known from the neighbour table
    assert table.recovered_addresses(1.0) == {ip(2), ip(3)}
    table.grant(mac(8), ip(2), 2.0, DAY)
    assert table.lease_of(mac(8), 2.0) is not None
    assert table.recovered_addresses(2.0) == {ip(3)}  # confirmed: a lease now, not a hold
    # The hold is over: .3 is an ordinary never-used address again; offered once (to mac 7,
    # which never took it), it waits behind the never-offered ones.
    assert table.standing(mac(1), ip(3), 1001.0) is Standing.UNKNOWN
    assert table.offer(mac(9), 1001.0)[0] == ip(5)
    assert table.recovered_addresses(1001.0) == set()


def test_routes_follow_leases_and_recovered_holds() -> None:
    table = LeaseTable(POOL)
    table.load([], [], {}, 0.0, in_use={ip(2): ""}, recovery_hold=100.0)
    dora(table, mac(1), 0.0)  # takes .3, the lowest free address
    assert table.routed_addresses(1.0) == {ip(2), ip(3)}
    assert table.needs_route(ip(2), 1.0) and table.needs_route(ip(3), 1.0)
    assert not table.needs_route(ip(4), 1.0)
    table.release(mac(1), ip(3), 2.0)
    assert not table.needs_route(ip(3), 2.0)
    assert not table.needs_route(ip(2), 101.0)  # the hold ended unconfirmed
    assert table.routed_addresses(101.0) == set()


def test_a_lease_past_its_end_needs_no_route_before_the_sweep() -> None:
    table = LeaseTable(POOL)
    first, second = dora(table, mac(1), 0.0), dora(table, mac(2), DAY / 2)
    # Nothing swept yet: the first lease is still in the table, but over.
    assert table.leased_addresses(DAY + 1) == table.routed_addresses(DAY + 1) == {second.ip}
    assert table.leased_addresses(DAY - 1) == {first.ip, second.ip}


def test_an_untaken_offer_goes_behind_the_other_free_addresses() -> None:
    table = LeaseTable(POOL)
    offered = [table.offer(mac(i), 0.0)[0] for i in (1, 2, 3)]
    assert offered == [ip(2), ip(3), ip(4)]
    # Their offers lapse unclaimed: the next client starts at the first never-offered one,
    # and the lapsed ones come after it, in the order they were offered.
    assert [table.offer(mac(i), 61.0)[0] for i in (4, 5, 6, 7)] == [ip(5), ip(6), ip(7), ip(2)]


def test_a_lapsed_offer_of_a_never_used_address_comes_before_a_used_one() -> None:
    table = LeaseTable(POOL)
    assert table.offer(mac(1), 0.0)[0] == ip(2)  # lapses at 60
    dora(table, mac(2), 1.0)  # .3
    table.release(mac(2), ip(3), 10.0)
    got = [table.offer(mac(i), 61.0)[0] for i in range(3, 9)]
    assert got == [ip(4), ip(5), ip(6), ip(7), ip(2), ip(3)]


def test_a_held_address_stepped_over_goes_behind_the_free_ones() -> None:
    # Held addresses at the front of the order are stepped over once and moved back, so
    # allocation does not walk all of them again for every DISCOVER.
    table = LeaseTable(POOL, reservations={mac(9): ip(2)})
    assert table.offer(mac(1), 0.0)[0] == ip(3)
    table.set_reservations({})  # .2 is free now, but was stepped over while held
    assert [table.offer(mac(i), 0.0)[0] for i in (2, 3, 4, 5)] == [ip(4), ip(5), ip(6), ip(7)]
    assert table.offer(mac(6), 0.0)[0] == ip(2)


@pytest.mark.parametrize("compact_after", [0, 1, 3])
def test_the_reuse_order_is_the_same_when_it_is_copied_afresh(compact_after: int) -> None:
    def history(table: LeaseTable) -> list[IPv4Address | None]:
        got = [table.offer(mac(i), 0.0)[0] for i in (1, 2, 3)]  # lapse at 60
        dora(table, mac(4), 61.0)
        dora(table, mac(5), 62.0)
        table.release(mac(4), ip(5), 70.0)
        table.decline(mac(5), ip(6), 71.0, 10.0)
        got += [table.offer(mac(i), 90.0)[0] for i in range(10, 17)]
        return got

    reference = LeaseTable(POOL)
    copied = LeaseTable(POOL)
    copied.compact_after = compact_after
    assert history(copied) == history(reference)


def test_each_mac_finds_its_own_among_many_recovered_addresses() -> None:
    pool = [A(f"172.20.{i // 250}.{i % 250 + 2}") for i in range(2000)]
    in_use = {addr: (mac(n % 200) if n % 2 else "") for n, addr in enumerate(pool[:1500])}
    table = LeaseTable(pool)
    table.load([], [], {}, 0.0, in_use=in_use, recovery_hold=1000.0)
    # mac(1) used .. every 200th address from pool[1]: it gets the lowest of them back.
    assert table.offer(mac(1), 1.0)[0] == pool[1]
    table.grant(mac(1), pool[1], 1.0, DAY)
    # Confirmed, that one is a lease: its next own recovered address is the one after it.
    table.release(mac(1), pool[1], 2.0)
    assert table.offer(mac(1), 3.0)[0] == pool[1]  # its last address, free again
    assert table.offer(mac(2), 3.0)[0] == pool[1500]  # even MACs' entries are in the "" half
    assert table.offer(mac(3), 3.0)[0] == pool[3]
    assert table.offer(mac(199), 3.0)[0] == pool[199]


def test_a_discover_after_a_lost_lease_file_looks_at_no_held_address() -> None:
    # A daemon that handed addresses out in ascending order leaves the front of the pool
    # routed; after its lease file is lost all of it is held. The held addresses are not in
    # the reuse order at all, so the first DISCOVER takes the order's first address instead
    # of stepping over 20,000, and none of them is ever looked at again.
    pool = [A(f"172.20.{i // 250}.{i % 250 + 2}") for i in range(22000)]
    table = LeaseTable(pool, reservations={mac(9): pool[20001]})
    table.load([], [], {}, 0.0, in_use=dict.fromkeys(pool[:20000], ""), recovery_hold=1000.0)
    assert next(iter(table._order)) == int(pool[20000])
    assert table.offer(mac(1), 1.0)[0] == pool[20000]
    assert table.offer(mac(2), 1.0)[0] == pool[20002]  # .. and not the reserved one
    assert next(iter(table._order)) == int(pool[20003])
    # Held addresses come back only when free: at the back, after the probe found nobody.
    table.expire(1000.0)
    table.probed(table.unprobed(), {pool[5]: mac(5)}, 1000.0, 1000.0)
    order = list(table._order)
    assert order[-19999:] == [int(a) for a in pool[:20000] if a != pool[5]]
    assert int(pool[5]) not in order


def test_an_address_a_vm_answers_for_is_held_for_it_also_when_it_was_free() -> None:
    # Free when the probe was sent (asked while it was leased, say): held once answered.
    table = LeaseTable(POOL)
    assert table.probed([ip(2)], {ip(2): mac(5)}, 0.0, 100.0) == [Hold(ip(2), 100.0)]
    assert table.offer(mac(1), 1.0)[0] == ip(3)
    assert table.offer(mac(5), 1.0)[0] == ip(2)


def test_a_declined_address_stays_last_after_a_reload() -> None:
    table = LeaseTable(POOL)
    dora(table, mac(1), 0.0)  # .2
    table.decline(mac(1), ip(2), 1.0, 100.0)
    snap = table.snapshot()
    # The store keeps history per MAC: the declined address's mark (no MAC) is not in it.
    stored_history = [h for h in snap.history if h.mac]
    reloaded = LeaseTable(POOL)
    reloaded.load(snap.leases, stored_history, snap.quarantine, 2.0)
    # After the quarantine (and the probe), the never-used addresses still come first, the
    # declined one last.
    reloaded.expire(200.0)
    reloaded.probed(reloaded.unprobed(), {}, 200.0, 100.0)
    offers = [reloaded.offer(mac(i), 200.0)[0] for i in range(10, 16)]
    assert offers == [ip(3), ip(4), ip(5), ip(6), ip(7), ip(2)]


def test_stats() -> None:
    table = LeaseTable(POOL, reservations={mac(9): ip(7)})
    dora(table, mac(1), 0.0)
    table.offer(mac(2), 0.0)
    stats = table.stats(1.0)
    assert (stats.total, stats.leased, stats.offered, stats.free) == (6, 1, 1, 3)


def test_stats_count_held_addresses_as_not_free() -> None:
    table = LeaseTable(POOL)
    table.load([], [], {ip(3): 50.0, ip(4): 0.5}, 1.0, in_use={ip(5): "", A("10.0.0.1"): ""})
    # .3 quarantined, .4 waiting for its probe, .5 held for recovery; 10.0.0.1 is no pool's.
    stats = table.stats(1.0)
    assert (stats.total, stats.quarantined, stats.free) == (6, 1, 3)


# ---------------------------------------------------------------------------- invariants

MACS = st.integers(1, 8).map(mac)
ADDRS = st.sampled_from([*POOL, ip(9), A("10.0.0.1")])


class TableMachine(RuleBasedStateMachine):
    """Random sequences of everything the server and the store can do to the table."""

    def __init__(self) -> None:
        super().__init__()
        self.reservations = {mac(8): ip(7), mac(7): ip(9)}  # .9 is outside the pool
        self.table = LeaseTable(POOL, reservations=self.reservations, offer_hold=60.0)
        self.now = 0.0
        self.held_before_reserved: dict[IPv4Address, str] = {}

    @rule(dt=st.sampled_from([0.0, 1.0, 30.0, 61.0, 500.0, 3600.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(m=MACS, requested=st.none() | ADDRS)
    def offer(self, m: str, requested: IPv4Address | None) -> None:
        addr, _ = self.table.offer(m, self.now, requested)
        if addr is None:
            return
        assert addr in POOL
        assert not self.table.is_quarantined(addr, self.now)
        owner = self.table._reserved_for.get(addr)
        if self.held_before_reserved.get(addr) != m:
            assert owner in (None, m), f"{addr} reserved for {owner} offered to {m}"
        assert self.table.offer_of(m, self.now) is not None

    @rule(m=MACS, addr=ADDRS, lease_time=st.sampled_from([10.0, 600.0, DAY]))
    def grant(self, m: str, addr: IPv4Address, lease_time: float) -> None:
        standing = self.table.standing(m, addr, self.now)
        refused = {
            Standing.HELD_BY_OTHER,
            Standing.RESERVED_FOR_OTHER,
            Standing.QUARANTINED,
            Standing.OUTSIDE_POOL,
        }
        if standing in refused:
            with pytest.raises(ValueError):
                self.table.grant(m, addr, self.now, lease_time)
        else:
            self.table.grant(m, addr, self.now, lease_time)
            lease = self.table.lease_of(m, self.now)
            assert lease is not None
            assert lease.ip == addr

    @rule(m=MACS, addr=ADDRS)
    def release(self, m: str, addr: IPv4Address) -> None:
        before = self.table.lease_of(m, self.now)
        self.table.release(m, addr, self.now)
        if before is not None and before.ip == addr:
            assert self.table.lease_of(m, self.now) is None

    @rule(m=MACS, addr=ADDRS)
    def decline(self, m: str, addr: IPv4Address) -> None:
        holder = self.table.holder(addr, self.now)
        changes = self.table.decline(m, addr, self.now, 600.0)
        if holder != m:
            assert all(isinstance(c, Expire) for c in changes)
        else:
            assert self.table.holder(addr, self.now) is None

    @rule(m=MACS)
    def withdraw(self, m: str) -> None:
        self.table.withdraw(m, self.now)
        assert self.table.offer_of(m, self.now) is None

    @rule(keep=st.sets(st.sampled_from(POOL)))
    def set_pool(self, keep: set[IPv4Address]) -> None:
        self.table.set_pool(keep | set(POOL[:2]), self.now)
        self.table.set_pool(POOL, self.now)

    @rule()
    def reload(self) -> None:
        snap = self.table.snapshot()
        before = self.table.leases(self.now)
        fresh = LeaseTable(POOL, reservations=self.reservations)
        changes = fresh.load(snap.leases, snap.history, snap.quarantine, self.now)
        assert all(isinstance(c, Expire) for c in changes)
        assert fresh.leases(self.now) == before
        self.table = fresh

    @rule(
        pairs=st.lists(
            st.tuples(MACS, ADDRS), max_size=3, unique_by=(lambda p: p[0], lambda p: p[1])
        )
    )
    def reserve(self, pairs: list[tuple[str, IPv4Address]]) -> None:
        self.reservations = dict(pairs)
        self.table.set_reservations(self.reservations)
        # Whoever holds a newly reserved address keeps it until it is free.
        self.held_before_reserved = {
            addr: holder
            for addr in self.reservations.values()
            if (holder := self.table.holder(addr, self.now)) is not None
        }

    @rule(in_use=st.dictionaries(st.sampled_from(POOL), st.sampled_from(["", mac(1), mac(2)])))
    def reload_after_lost_leases(self, in_use: dict[IPv4Address, str]) -> None:
        # The lease records are gone; the kernel's routes name the addresses in use.
        snap = self.table.snapshot()
        fresh = LeaseTable(POOL, reservations=self.reservations)
        fresh.load([], snap.history, snap.quarantine, self.now, in_use=in_use, recovery_hold=600)
        self.table = fresh

    @rule(answered=st.sets(st.sampled_from(POOL)), m=MACS)
    def probe(self, answered: set[IPv4Address], m: str) -> None:
        self.table.expire(self.now)
        asked = self.table.unprobed()
        self.table.probed(asked, dict.fromkeys(asked & answered, m), self.now, 600.0)
        assert not self.table.unprobed()

    @rule(addr=st.sampled_from(POOL), m=MACS)
    def identify(self, addr: IPv4Address, m: str) -> None:
        self.table.identify({addr: m})

    @invariant()
    def one_holder_per_address_and_all_in_pool(self) -> None:
        t, now = self.table, self.now
        held: dict[IPv4Address, set[str]] = {}
        for lease in t.leases(now):
            held.setdefault(lease.ip, set()).add(lease.mac)
        for m in map(mac, range(1, 9)):
            offer = t.offer_of(m, now)
            if offer is not None:
                held.setdefault(offer.ip, set()).add(m)
        for addr, macs in held.items():
            assert len(macs) == 1, f"{addr} held by {macs}"
            assert addr in POOL
            assert not t.is_quarantined(addr, now)
            owner = t._reserved_for.get(addr)
            if {self.held_before_reserved.get(addr)} != macs:
                assert owner in (None, *macs), f"{addr} reserved for {owner} held by {macs}"

    @invariant()
    def indexes_agree(self) -> None:
        t = self.table
        assert {le.ip: le for le in t._leases.values()} == t._lease_at
        assert {o.ip: o for o in t._offers.values()} == t._offer_at
        for m, addr in t._last_ip.items():
            assert t._history[addr].mac == m
        by_mac = {m: addrs for m, addrs in t._recovered_of.items() if addrs}
        assert by_mac == {
            m: {a for a, r in t._recovered.items() if r.mac == m}
            for m in {r.mac for r in t._recovered.values() if r.mac}
        }
        # The reuse order holds every pool address nothing holds, once, and no other:
        # allocation takes its first address without looking at any held one.
        order = list(map(IPv4Address, t._order))
        assert len(order) == len(set(order))
        # An ended lease or offer holds its address until the next change sweeps it.
        held = {a for a in POOL if a in t._lease_at or a in t._offer_at or t._kept(a)}
        assert set(order) == set(POOL) - held
        # Never-bound addresses first, then those bound before.
        used = [a in t._history for a in order]
        assert used == sorted(used)
        # The free count, taken from the indexes, is the pool's addresses free one by one.
        assert t.stats(self.now).free == sum(t._free_for_new(a, self.now) for a in POOL)


TableMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_table_invariants = TableMachine.TestCase


def test_every_hold_ends_at_its_exact_instant() -> None:
    # A lease, an offer and a quarantine all end at `until`: at that instant they are over.
    t = LeaseTable(POOL, offer_hold=60)
    t.grant(mac(1), POOL[0], 0.0, 100)
    assert t.standing(mac(1), POOL[0], 100.0) is not Standing.LEASED
    assert not t.needs_route(POOL[0], 100.0)
    offered, _ = t.offer(mac(2), 0.0)
    assert offered is not None
    assert t.standing(mac(2), offered, 60.0) is not Standing.OFFERED
    t.grant(mac(3), POOL[5], 0.0, 1000)
    t.decline(mac(3), POOL[5], 0.0, 50)
    assert not t.is_quarantined(POOL[5], 50.0)
    t.expire(50.0)
    assert t.stats(50.0).quarantined == 0 and POOL[5] not in t.snapshot().quarantine


def test_the_sweep_ends_leases_offers_and_quarantines_due_at_its_very_instant() -> None:
    """One expire() at the instant a lease, an offer and a quarantine all end: the lease is
    returned, the offered address is free again (before the used one, never bound), and the
    quarantined one waits for its probe."""
    t = LeaseTable(POOL[:3], offer_hold=60)
    t.grant(mac(1), POOL[1], 0.0, 60)
    t.grant(mac(2), POOL[2], 0.0, 1000)
    t.decline(mac(2), POOL[2], 0.0, 60)
    assert t.offer(mac(3), 0.0)[0] == POOL[0]
    got, changes = t.offer(mac(4), 60.0)
    assert changes == [Expire(Lease(mac(1), POOL[1], 60.0))]
    assert got == POOL[0]
    assert t.unprobed() == {POOL[2]}


def test_two_leases_ending_in_one_sweep_are_returned_in_the_order_they_ended() -> None:
    t = LeaseTable(POOL)
    t.grant(mac(9), POOL[0], 0.0, 20)
    t.grant(mac(1), POOL[1], 0.0, 10)
    assert [c.lease.mac for c in t.expire(30.0) if isinstance(c, Expire)] == [mac(1), mac(9)]


def test_an_offer_that_lapsed_before_a_sweep_is_free_again_after_it() -> None:
    t = LeaseTable(POOL[:2], offer_hold=60)
    t.grant(mac(2), POOL[1], 0.0, 100)
    assert t.offer(mac(1), 0.0)[0] == POOL[0]
    assert t.offer(mac(3), 150.0)[0] == POOL[0]  # never bound: before the one leased till 100


def test_a_new_offer_on_another_address_frees_the_one_offered_before() -> None:
    t = LeaseTable(POOL[:2])
    assert t.offer(mac(1), 0.0)[0] == POOL[0]
    t.set_reservations({mac(1): POOL[1]})
    assert t.offer(mac(1), 1.0)[0] == POOL[1]
    assert t.offer(mac(2), 2.0)[0] == POOL[0]


def test_declining_an_offer_keeps_the_lease_held_on_another_address() -> None:
    t = LeaseTable(POOL)
    lease = dora(t, mac(1), 0.0)
    t.set_reservations({mac(1): POOL[3]})
    assert t.offer(mac(1), 1.0)[0] == POOL[3]
    changes = t.decline(mac(1), POOL[3], 2.0, 50)
    assert changes == [Quarantine(POOL[3], 52.0, None)]
    assert t.lease_of(mac(1), 2.0) == lease


def test_a_quarantine_of_one_mac_does_not_stop_another_macs_decline() -> None:
    t = LeaseTable(POOL)
    a, b = dora(t, mac(1), 0.0), dora(t, mac(2), 0.0)
    t.decline(mac(1), a.ip, 1.0, 50)
    assert t.decline(mac(2), b.ip, 1.0, 50) == [Quarantine(b.ip, 51.0, Lease(b.mac, b.ip, 1.0))]
    assert t.is_quarantined(b.ip, 2.0)
    # The declined address is remembered as nobody's, ended when it was declined.
    assert Lease("", b.ip, 1.0) in t.snapshot().history


def test_a_granted_recovered_address_is_held_by_its_lease_only() -> None:
    t = LeaseTable(POOL)
    t.load([], [], {}, 0.0, in_use={POOL[0]: mac(1)}, recovery_hold=1000)
    t.grant(mac(1), POOL[0], 1.0, 100)
    t.release(mac(1), POOL[0], 2.0)
    assert not t.needs_route(POOL[0], 3.0) and t.recovered_addresses(3.0) == set()


def test_a_recovered_hold_is_over_at_its_exact_end() -> None:
    t = LeaseTable(POOL)
    t.load([], [], {}, 0.0, in_use={POOL[0]: mac(1), POOL[1]: ""}, recovery_hold=100)
    assert t.standing(mac(1), POOL[0], 99.0) is Standing.RECOVERED_MINE
    assert t.standing(mac(2), POOL[1], 99.0) is Standing.RECOVERED
    assert t.standing(mac(1), POOL[0], 100.0) is Standing.UNKNOWN
    assert t.standing(mac(2), POOL[1], 100.0) is Standing.UNKNOWN
    assert not t.needs_route(POOL[0], 100.0)


def test_a_reservation_just_past_the_pool_is_never_offered() -> None:
    t = LeaseTable(POOL, reservations={mac(1): ip(8)})
    assert t.offer(mac(1), 0.0)[0] == POOL[0]


def test_a_lapsed_fresh_offer_comes_before_a_used_address_from_the_store() -> None:
    t = LeaseTable(POOL[:2])
    t.load([], [Lease(mac(9), POOL[1], 10.0)], {}, 20.0)
    assert t.offer(mac(1), 20.0)[0] == POOL[0]
    t.withdraw(mac(1), 21.0)
    assert t.offer(mac(2), 22.0)[0] == POOL[0]


def test_the_reuse_order_counts_what_it_takes_from_its_tails_until_copied_afresh() -> None:
    """The tails are dicts, which keep a hole for each key taken out until they are copied:
    the count is what tells the table to copy them (LeaseTable.compact_after), so that finding
    the first address never steps over more holes than that."""
    span = _Span(10, 4)
    for value in range(10, 14):
        span.put(value, True)
    order = _ReuseOrder([10, 11], [12, 13], span)
    order.discard(10)  # out of the run: no hole
    order.push(11, True)  # from the run to the used tail: no hole
    order.push(10, False)
    assert order.holes == 0 and list(order) == [10, 12, 13, 11]
    order.discard(10)  # out of a tail: a hole
    order.push(11, False)  # from one tail to the other: another
    order.discard(99)  # not in the order: nothing
    assert order.holes == 2 and list(order) == [11, 12, 13]
    assert order.first() == 11
    order.compact()
    assert order.holes == 0 and list(order) == [11, 12, 13]
