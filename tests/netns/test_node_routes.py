from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from cocoon_net import config
from cocoon_net.errors import HostSetupError
from cocoon_net.node import arp, routes
from cocoon_net.node.routes import RouteDiff
from tests.support.netns import Netns, link_pair

pytestmark = pytest.mark.netns


SUBNET = IPv4Network("172.20.100.0/24")


def ip(last: int) -> IPv4Address:
    return IPv4Address(f"172.20.100.{last}")


@pytest.fixture
def ns(make_netns: Callable[[str], Netns]) -> Netns:
    ns = make_netns("rt")
    ns.ip("link", "add", "cni0", "type", "bridge")
    ns.ip("link", "set", "cni0", "up")
    ns.ip("addr", "add", "172.20.100.1/24", "dev", "cni0")
    return ns


def show(ns: Netns) -> list[str]:
    return sorted(line.strip() for line in ns.ip("-4", "route", "show", "dev", "cni0").splitlines())


def test_reconcile_adds_and_removes_only_our_routes(ns: Netns) -> None:
    ns.ip("route", "add", "172.20.100.50/32", "dev", "cni0", "proto", "static")  # an operator's
    ns.call(routes.apply_routes, RouteDiff(add=(ip(2), ip(3), ip(4))), "cni0")
    assert ns.call(routes.list_routes, "cni0") == {ip(2), ip(3), ip(4)}
    assert "172.20.100.2 proto 203 scope link" in show(ns)

    present = ns.call(routes.list_routes, "cni0")
    diff = routes.plan_routes({ip(3), ip(4), ip(5)}, present)
    assert diff == RouteDiff(add=(ip(5),), remove=(ip(2),))
    ns.call(routes.apply_routes, diff, "cni0")
    assert ns.call(routes.list_routes, "cni0") == {ip(3), ip(4), ip(5)}

    # flushing ours never takes the operator's route, even for the same address
    ns.call(routes.flush_routes, "cni0", SUBNET)
    assert ns.call(routes.list_routes, "cni0") == set()
    assert show(ns) == ["172.20.100.0/24 proto kernel scope link src 172.20.100.1",
                        "172.20.100.50 proto static scope link"]  # fmt: skip
    ns.call(
        routes.apply_routes, RouteDiff(remove=(ip(50),)), "cni0"
    )  # proto 203 does not match a static route
    assert "172.20.100.50 proto static scope link" in show(ns)


def test_adds_are_idempotent_and_deletes_of_gone_routes_harmless(ns: Netns) -> None:
    ns.call(routes.apply_routes, RouteDiff(add=(ip(9),)), "cni0")
    ns.call(routes.apply_routes, RouteDiff(add=(ip(9),)), "cni0")
    ns.call(routes.apply_routes, RouteDiff(add=(ip(9),), remove=(ip(10), ip(11))), "cni0")
    ns.call(routes.apply_routes, RouteDiff(remove=(ip(9),)), "cni0")
    ns.call(routes.apply_routes, RouteDiff(remove=(ip(9),)), "cni0")
    assert ns.call(routes.list_routes, "cni0") == set()


def test_go_tool_routes_are_listed_by_their_protocol_and_taken_over(ns: Netns) -> None:
    ns.ip("route", "add", "172.20.100.20/32", "dev", "cni0", "proto", "boot", "scope", "global")
    assert ns.call(routes.list_routes, "cni0", config.GO_ROUTE_PROTO) == {ip(20)}
    assert ns.call(routes.list_routes, "cni0") == set()
    ns.call(routes.apply_routes, RouteDiff(add=(ip(20),)), "cni0")  # replace takes the entry over
    assert ns.call(routes.list_routes, "cni0") == {ip(20)}
    assert ns.call(routes.list_routes, "cni0", config.GO_ROUTE_PROTO) == set()


def test_missing_bridge_lists_nothing_and_a_real_failure_is_reported(ns: Netns) -> None:
    assert ns.call(routes.list_routes, "nobr0") == set()
    assert ns.call(routes.flush_routes, "nobr0", SUBNET) == []
    ns.ip("link", "set", "cni0", "down")
    with pytest.raises(HostSetupError, match=r"ip -batch on cni0 \(1 add, 0 del\)"):
        ns.call(routes.apply_routes, RouteDiff(add=(ip(30),)), "cni0")


def test_flush_keeps_every_route_outside_the_subnet(ns: Netns) -> None:
    ns.call(routes.apply_routes, RouteDiff(add=(ip(2),)), "cni0")
    # someone else's /32s on the bridge: one with our number, one proto boot like the Go tool's
    ns.ip("route", "add", "10.9.9.8/32", "dev", "cni0", "proto", str(config.ROUTE_PROTO))
    ns.ip("route", "add", "10.9.9.9/32", "dev", "cni0", "proto", "boot")
    assert ns.call(routes.plan_flush, "cni0", SUBNET) == [
        "remove 1 lease routes (proto 203) from cni0"
    ]
    ns.call(routes.flush_routes, "cni0", SUBNET)
    assert show(ns) == [
        "10.9.9.8 proto 203 scope link",
        "10.9.9.9 scope link",  # proto boot: the default, not shown
        "172.20.100.0/24 proto kernel scope link src 172.20.100.1",
    ]


def test_arp_probe_finds_the_addresses_that_answer_on_the_bridge(
    ns: Netns, make_netns: Callable[[str], Netns]
) -> None:
    vm = make_netns("vm")
    link_pair(ns, "tap0", vm, "eth0")
    ns.ip("link", "set", "tap0", "master", "cni0")
    vm.ip("addr", "add", "172.20.100.7/24", "dev", "eth0")
    answered = ns.call(arp.probe, "cni0", ip(1), [ip(7), ip(8)], rounds=2, wait=0.2)
    assert list(answered) == [ip(7)]
    assert ns.call(arp.probe, "cni0", ip(1), []) == {}
    with pytest.raises(OSError):
        ns.call(arp.probe, "nobr0", ip(1), [ip(7)])
