from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from cocoon_net.node.routes import RouteDiff, batch, plan_routes

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
