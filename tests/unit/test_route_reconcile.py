from ipaddress import IPv4Address

from cocoon_net.node.route_reconcile import taken_over
from cocoon_net.node.routes import RouteDiff

A, B, C = (IPv4Address(f"10.0.0.{i}") for i in (3, 2, 1))


def test_taken_over_are_the_added_boot_routes_that_did_not_fail() -> None:
    diff = RouteDiff(add=(A, B, C), remove=(IPv4Address("10.0.0.9"),))
    assert taken_over(diff, boot={A, B, IPv4Address("10.0.0.9")}, failed={B}) == [A]
    assert taken_over(diff, boot={A, B, C}, failed=()) == [C, B, A]


def test_nothing_is_taken_over_without_a_boot_route() -> None:
    assert taken_over(RouteDiff(add=(A,)), boot=(), failed=()) == []
