"""The daemon's netlink client against the real kernel, inside a test namespace."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cocoon_net.node import rtnl
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

NET = "10.55.0."


def _bridge() -> int:
    subprocess.run(["ip", "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", "br0", "up"], check=True)
    index = rtnl.ifindex("br0")
    assert index is not None
    return index


def _routes() -> list[dict[str, Any]]:
    show = ["ip", "-json", "route", "show", "table", "main"]
    out = subprocess.run(show, capture_output=True, text=True, check=True).stdout
    return list(json.loads(out or "[]"))


def _apply_and_list() -> tuple[dict[str, str], list[dict[str, Any]], list[dict[str, Any]]]:
    index = _bridge()
    sock = rtnl.RouteSocket()
    ips = [IPv4Address(NET + str(i)) for i in range(2, 202)]
    subprocess.run(
        ["ip", "route", "add", NET + "9/32", "dev", "br0", "proto", "static"], check=False
    )
    failed = sock.apply([rtnl.RouteOp(True, ip) for ip in ips], index)
    added = _routes()
    gone = [rtnl.RouteOp(False, ip) for ip in ips[:100] if ip != IPv4Address(NET + "9")]
    failed |= sock.apply([*gone, *gone], index)  # deleting twice is harmless
    failed |= sock.apply([rtnl.RouteOp(True, ips[0])], 999_999)  # no such device
    subprocess.run(
        ["ip", "route", "add", NET + "250/32", "dev", "br0", "proto", "boot"], check=True
    )
    dumped = sock.dump(index, (203, 3))
    assert dumped[203] == {IPv4Address(NET + str(i)) for i in [9, *range(102, 202)]}
    assert dumped[3] == {IPv4Address(NET + "250")}
    sock.close()
    return {str(op.ip): why for op, why in failed.items()}, added, _routes()


def test_bulk_add_delete_and_errors(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("rtnl")
    failed, added, left = ns.call(_apply_and_list)
    assert failed == {NET + "2": "No such device"}
    # `replace` takes over a same-destination route, whoever made it (here the operator's
    # static .9); a delete names proto 203 and so only ever removes ours.
    assert {r["dst"] for r in added if r.get("protocol") == "203"} == {
        NET + str(i) for i in range(2, 202)
    }
    assert {r["dst"] for r in left if r.get("protocol") == "203"} == {  # and dump() agrees
        NET + str(i) for i in [9, *range(102, 202)]
    }


def _failures_inside_a_batch() -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Only a batch's last request asks for an ACK: errors of the others must still come back,
    each for its own address, and a batch that ends in a failure must not wait for more."""
    index = _bridge()
    sock = rtnl.RouteSocket()
    a, b, c = (IPv4Address(NET + str(i)) for i in (3, 4, 5))
    assert sock.apply([rtnl.RouteOp(True, c)], index) == {}
    subprocess.run(["ip", "link", "set", "br0", "down"], check=True)  # takes c's route along
    # Adds fail on a device that is down; deletes of what is gone succeed.
    ops = [rtnl.RouteOp(True, a), rtnl.RouteOp(False, b), rtnl.RouteOp(True, c),
           rtnl.RouteOp(False, a)]  # fmt: skip
    middle = sock.apply(ops, index)
    last = sock.apply([rtnl.RouteOp(False, b), rtnl.RouteOp(True, a)], index)
    subprocess.run(["ip", "link", "set", "br0", "up"], check=True)
    assert sock.apply([rtnl.RouteOp(True, b)], index) == {}  # nothing left over in the queue
    routed = [r["dst"] for r in _routes() if r.get("protocol") == "203"]
    sock.close()
    named = {str(op.ip) + (" add" if op.add else " del"): why for op, why in middle.items()}
    return named, {str(op.ip): why for op, why in last.items()}, routed


def test_failures_inside_a_batch_are_each_reported(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("rtmid")
    middle, last, routed = ns.call(_failures_inside_a_batch)
    down = "Network is down"
    assert middle == {NET + "3 add": down, NET + "5 add": down}
    assert last == {NET + "3": down}
    assert routed == [NET + "4"]


class _CountingReads:
    """The route socket's netlink socket, counting the reads of its answers."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.reads = sock, 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        data: bytes = self.sock.recv(size)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _reads_per_batch() -> list[int]:
    index = _bridge()
    sock = rtnl.RouteSocket()
    counting = _CountingReads(sock._sock)
    sock._sock = counting  # type: ignore[assignment]
    reads = []
    for ops in (
        [rtnl.RouteOp(True, IPv4Address(NET + str(i))) for i in range(2, 40)],
        [rtnl.RouteOp(False, IPv4Address(NET + str(i))) for i in range(2, 40)],
        [rtnl.RouteOp(True, IPv4Address(NET + "2")), rtnl.RouteOp(False, IPv4Address(NET + "3"))],
    ):
        counting.reads = 0
        assert sock.apply(ops, index) == {}
        reads.append(counting.reads)
    sock.close()
    return reads


def test_a_batch_that_succeeds_is_answered_once(make_netns: Callable[[str], Netns]) -> None:
    """One ACK for the whole batch, not one per route to build, queue and read."""
    ns = make_netns("rtone")
    assert ns.call(_reads_per_batch) == [1, 1, 1]


def _events() -> list[rtnl.Event]:
    index = _bridge()
    events = rtnl.EventSocket()
    sock = rtnl.RouteSocket()
    sock.apply([rtnl.RouteOp(True, IPv4Address(NET + "7"))], index)
    subprocess.run(["ip", "route", "del", NET + "7/32", "dev", "br0"], check=True)
    subprocess.run(
        ["ip", "route", "add", NET + "8/32", "dev", "br0", "proto", "static"], check=True
    )
    out = events.drain()
    events.close()
    sock.close()
    return [e for e in out if e.kind in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE)]


def test_events_tell_our_lease_routes_from_others(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("rtev")
    events = ns.call(_events)
    ours = [(e.kind, str(e.dst)) for e in events if e.ours]
    assert ours == [(rtnl.RTM_NEWROUTE, NET + "7"), (rtnl.RTM_DELROUTE, NET + "7")]
    others = [e for e in events if not e.ours and e.dst == IPv4Address(NET + "8")]
    assert others and others[0].protocol == 4  # RTPROT_STATIC


def _rules() -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-json", "rule", "show"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return [r for r in json.loads(out or "[]") if r.get("priority") in (20000, 20001)]


def _rule_ops() -> tuple[list[dict[str, Any]], ...]:
    """A route that carries its rule, a batch of rules, a foreign rule, dump and events."""
    index = _bridge()
    events = rtnl.EventSocket()
    sock = rtnl.RouteSocket()
    with_rule, plain = IPv4Address(NET + "5"), IPv4Address(NET + "6")
    rule5 = rtnl.Rule(20001, 25344, src=IPv4Network(f"{with_rule}/32"))
    sock.rules = {with_rule: rule5}
    assert sock.apply([rtnl.RouteOp(True, with_rule), rtnl.RouteOp(True, plain)], index) == {}
    assert sock.apply([rtnl.RouteOp(True, with_rule)], index) == {}  # again: no twin rule
    after_grant = _rules()
    subnet = rtnl.Rule(20000, rtnl.RT_TABLE_MAIN, dst=IPv4Network(NET + "0/24"))
    prefix = rtnl.Rule(20001, 25345, src=IPv4Network(NET + "16/28"))
    assert sock.apply_rules([subnet, prefix, subnet], []) == {}
    subprocess.run(["ip", "rule", "add", "from", NET + "7", "lookup", "100", "priority",
                    "20001"], check=True)  # fmt: skip
    assert sock.dump_rules([20000, 20001]) == {rule5, subnet, prefix}  # the operator's not
    # A deleted route takes its rule along; deleting what is gone is no error; a delete
    # names our protocol and table, so the operator's rule at our priority stays.
    gone = [rtnl.RouteOp(False, with_rule)] * 2
    assert sock.apply(gone, index) == {}
    foreign = rtnl.Rule(20001, 100, src=IPv4Network(NET + "7/32"))
    assert sock.apply_rules([], [subnet, prefix, prefix, foreign]) == {}
    left = _rules()
    out = events.drain()
    events.close()
    sock.close()
    seen = [
        {"kind": e.kind, "rule": e.rule.spec() if e.rule else None}
        for e in out
        if e.kind in (rtnl.RTM_NEWRULE, rtnl.RTM_DELRULE)
    ]
    return after_grant, left, seen


def test_a_route_carries_its_rule_and_only_ours_are_touched(
    make_netns: Callable[[str], Netns],
) -> None:
    ns = make_netns("rtrule")
    after_grant, left, seen = ns.call(_rule_ops)
    assert after_grant == [
        {"priority": 20001, "src": NET + "5", "table": "25344", "protocol": "203"}
    ]
    assert left == [{"priority": 20001, "src": NET + "7", "table": "100"}]
    spec5 = f"from {NET}5/32 lookup 25344 priority 20001 protocol 203"
    ours = [(e["kind"], e["rule"]) for e in seen if e["rule"]]
    assert ours[0] == (rtnl.RTM_NEWRULE, spec5)
    assert (rtnl.RTM_DELRULE, spec5) in ours
    # The operator's rule is no rule of ours: its events carry none.
    assert len([e for e in seen if e["rule"] is None]) == 1


def _echoes() -> list[tuple[int, str]]:
    index = _bridge()
    sock, other = rtnl.RouteSocket(), rtnl.RouteSocket()
    events = rtnl.EventSocket(quiet=sock.portid)
    for ip in (NET + "7", NET + "8"):
        for add in (True, False):
            (sock if ip.endswith("7") else other).apply([rtnl.RouteOp(add, IPv4Address(ip))], index)
    subprocess.run(["ip", "route", "add", NET + "9/32", "dev", "br0"], check=True)
    out = events.drain()
    for s in (events, sock, other):
        s.close()
    kinds = (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE)
    return [(e.kind, str(e.dst)) for e in out if e.kind in kinds]


def test_the_kernel_drops_the_echo_of_our_own_route_changes(
    make_netns: Callable[[str], Netns],
) -> None:
    # The daemon's route socket adds a route per grant: its events never reach the event
    # socket. Another socket's changes (an operator's `ip route`, another program) still do.
    ns = make_netns("rtecho")
    assert ns.call(_echoes) == [
        (rtnl.RTM_NEWROUTE, NET + "8"),
        (rtnl.RTM_DELROUTE, NET + "8"),
        (rtnl.RTM_NEWROUTE, NET + "9"),
    ]
