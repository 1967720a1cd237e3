"""Lease-table changes to journal records and route work: what must reach the disk, and
which addresses must have their route checked, for each kind of change."""

from __future__ import annotations

from ipaddress import IPv4Address

from cocoon_net.dhcp.effects import grants, records, touched
from cocoon_net.dhcp.leasefile import LeaseState, Op, Record
from cocoon_net.dhcp.leases import (
    Change,
    Expire,
    Grant,
    Hold,
    Quarantine,
    Release,
    Renew,
    Revoke,
    Withdraw,
)
from cocoon_net.dhcp.model import Lease

A = IPv4Address
MAC = "02:00:00:00:00:01"
L1 = Lease(MAC, A("10.0.0.2"), 2000.0)
L2 = Lease("02:00:00:00:00:02", A("10.0.0.3"), 3000.0)


def test_grants_and_renewals_are_written_as_grants() -> None:
    assert records([Grant(L1), Renew(L2)]) == [Record.grant(L1), Record.grant(L2)]


def test_releases_revocations_and_expiries_end_the_lease_on_disk() -> None:
    assert records([Release(L1), Revoke(L2, "moved"), Expire(L1)]) == [
        Record.release(L1),
        Record.release(L2),
        Record.expire(L1),
    ]


def test_a_holders_decline_ends_its_lease_and_quarantines_the_address() -> None:
    out = records([Quarantine(L1.ip, 5000.0, L1)])
    assert out == [Record.release(L1), Record.quarantine(L1.ip, 5000.0, MAC)]
    # Replayed after a restart, the address is kept out and the holder no longer holds it.
    state = LeaseState()
    for record in [Record.grant(L1), *out]:
        state.apply(record)
    assert state.quarantine == {L1.ip: 5000.0}
    assert MAC not in state.leases


def test_a_decline_of_an_offer_quarantines_with_no_lease_to_end() -> None:
    assert records([Quarantine(L1.ip, 5000.0, None)]) == [Record.quarantine(L1.ip, 5000.0, "")]
    assert records([Quarantine(L1.ip, 5000.0, None)])[0].op is Op.QUARANTINE


def test_a_recovered_address_held_for_its_vm_keeps_its_deadline_on_disk() -> None:
    ip = A("10.0.0.9")
    out = records([Hold(ip, 7000.0)])
    assert [r.op for r in out] == [Op.HOLD]
    # Replayed after a restart, the address is held until the same deadline, not a later one.
    state = LeaseState()
    for record in out:
        state.apply(record)
    assert state.holds == {ip: 7000.0}
    assert touched([Hold(ip, 7000.0)]) == {ip}


def test_a_withdrawn_offer_writes_nothing_and_touches_no_route() -> None:
    change: list[Change] = [Withdraw(MAC, L1.ip)]
    assert records(change) == []
    assert touched(change) == set()
    assert grants(change) == set()


def test_every_change_to_a_bound_address_touches_its_route() -> None:
    changes: list[Change] = [
        Grant(L1),
        Renew(L2),
        Release(Lease("02:00:00:00:00:03", A("10.0.0.4"), 1.0)),
        Expire(Lease("02:00:00:00:00:04", A("10.0.0.5"), 1.0)),
        Revoke(Lease("02:00:00:00:00:05", A("10.0.0.6"), 1.0), "pool"),
        Quarantine(A("10.0.0.7"), 9.0, None),
        Withdraw(MAC, A("10.0.0.8")),
    ]
    assert touched(changes) == {A(f"10.0.0.{i}") for i in range(2, 8)}


def test_only_new_bindings_must_be_routed_before_the_ack() -> None:
    assert grants([Grant(L1), Renew(L2), Release(L1)]) == {L1.ip}
