from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from cocoon_net.node.routes import RouteDiff, batch, plan_reconcile, plan_routes, unconfirmed

A, B, C = IPv4Address("172.20.100.2"), IPv4Address("172.20.100.3"), IPv4Address("172.20.100.10")


def test_plan_adds_missing_and_removes_stale_sorted() -> None:
    assert plan_routes([C, A, B], [B, IPv4Address("172.20.100.9")]) == RouteDiff(
        add=(A, C), remove=(IPv4Address("172.20.100.9"),)
    )


def test_plan_of_equal_sets_is_empty() -> None:
    diff = plan_routes([A, B], [B, A])
    assert diff == RouteDiff()
    assert not diff


def test_plan_from_nothing_and_to_nothing() -> None:
    assert plan_routes([A], []) == RouteDiff(add=(A,))
    assert plan_routes([], [A]) == RouteDiff(remove=(A,))


addresses = st.sets(
    st.integers(min_value=0, max_value=255).map(lambda i: IPv4Address(f"10.0.0.{i}"))
)


@given(addresses, addresses)
def test_applying_the_plan_yields_the_desired_set(
    desired: set[IPv4Address], present: set[IPv4Address]
) -> None:
    diff = plan_routes(desired, present)
    assert (present - set(diff.remove)) | set(diff.add) == desired
    assert not set(diff.add) & present
    assert set(diff.remove) <= present


def test_batch_text_names_our_protocol_on_every_line() -> None:
    text = batch(RouteDiff(add=(A,), remove=(B,)), "cni0")
    assert text == (
        "route del 172.20.100.3/32 dev cni0 proto 203 table main\n"
        "route replace 172.20.100.2/32 dev cni0 proto 203 scope link table main\n"
    )
    assert batch(RouteDiff(), "cni0") == ""


SUBNET = IPv4Network("172.20.100.0/24")
D, E = IPv4Address("172.20.100.20"), IPv4Address("172.20.100.21")
OPERATOR = IPv4Address("10.9.9.9")


def test_boot_routes_are_taken_over_for_leases_and_answers_only() -> None:
    # A, B leased (B via the Go tool's boot route); C, D, E held after recovery with boot
    # routes; D answered on the bridge. OPERATOR's boot route is outside the pool.
    diff = plan_reconcile(
        wanted={A, B, C, D, E},
        leased={A, B},
        ours=set(),
        boot={B, C, D, E, OPERATOR},
        subnet=SUBNET,
        answering={D},
    )
    assert diff == RouteDiff(add=(A, B, D))
    assert unconfirmed({A, B, C, D, E}, {A, B}, {B, C, D, E, OPERATOR}) == {C, D, E}


def test_held_boot_routes_stay_borrowed_on_later_reconciles() -> None:
    diff = plan_reconcile(
        wanted={A, C}, leased={A}, ours={A}, boot={C}, subnet=SUBNET, answering=()
    )
    assert diff == RouteDiff()
    # a held address without any route gets ours, as after a lost lease file
    assert plan_reconcile(wanted={C}, leased=(), ours=(), boot=(), subnet=SUBNET) == RouteDiff(
        add=(C,)
    )


def test_our_routes_outside_the_subnet_are_never_removed() -> None:
    stray = IPv4Address("10.9.9.8")
    diff = plan_reconcile(wanted={A}, leased={A}, ours={A, B, stray}, boot=(), subnet=SUBNET)
    assert diff == RouteDiff(remove=(B,))


def test_unsettled_addresses_keep_the_routes_they_have() -> None:
    # A granted (leased, no route yet) and B released (routed, no lease now), neither on disk
    # yet: their routes wait for that; C's missing route is a real repair.
    diff = plan_reconcile(
        wanted={A, C}, leased={A, C}, ours={B}, boot=(), subnet=SUBNET, unsettled={A, B}
    )
    assert diff == RouteDiff(add=(C,))
    assert plan_reconcile(wanted={A}, leased={A}, ours={B}, boot=(), subnet=SUBNET) == RouteDiff(
        add=(A,), remove=(B,)
    )


def test_a_diff_is_true_when_it_adds_or_removes_anything() -> None:
    a, b = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")
    assert not plan_routes([a], [a])
    assert plan_routes([a, b], [a])  # only an add
    assert plan_routes([a], [a, b])  # only a removal
