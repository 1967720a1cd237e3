from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from cocoon_net.errors import HostSetupError, StateError
from cocoon_net.node import bridge
from cocoon_net.node.bridge import BridgeSpec, Step
from cocoon_net.node.nic import Link

ADDR = IPv4Interface("172.20.100.1/24")
SPEC = BridgeSpec("cni0", "02:c0:ac:14:64:01", 1460, ADDR)
GOOD = Link("cni0", 7, "bridge", 1460, "02:c0:ac:14:64:01", up=True)
FOREIGN = IPv4Interface("192.0.2.1/24")


def test_default_mac_is_local_unicast_from_gateway() -> None:
    mac = bridge.default_mac(IPv4Address("172.20.100.1"))
    assert mac == "02:c0:ac:14:64:01"
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b01


def test_absent_bridge_is_created_with_mac_and_mtu() -> None:
    plan = bridge.plan(SPEC, None, (), "")
    assert plan.creates
    assert plan.steps == (
        Step(
            (
                "ip",
                "link",
                "add",
                "cni0",
                "address",
                "02:c0:ac:14:64:01",
                "mtu",
                "1460",
                "type",
                "bridge",
            ),
            "create bridge cni0 (mac 02:c0:ac:14:64:01, mtu 1460)",
        ),
        Step(
            ("ip", "addr", "add", "172.20.100.1/24", "dev", "cni0"),
            "add address 172.20.100.1/24 to cni0",
        ),
        Step(("ip", "link", "set", "dev", "cni0", "up"), "set cni0 up"),
    )


def test_matching_bridge_needs_nothing_and_foreign_addresses_stay() -> None:
    plan = bridge.plan(SPEC, GOOD, (FOREIGN, ADDR), "172.20.100.1/24")
    assert plan.steps == ()
    assert not plan.creates


def test_drift_is_reported_with_the_old_value() -> None:
    link = Link("cni0", 7, "bridge", 1500, "aa:bb:cc:dd:ee:ff", up=False)
    assert bridge.changes(bridge.plan(SPEC, link, (ADDR,), "")) == [
        "set cni0 mac 02:c0:ac:14:64:01 (was aa:bb:cc:dd:ee:ff)",
        "set cni0 mtu 1460 (was 1500)",
        "set cni0 up",
    ]


def test_previous_address_is_removed_before_the_new_one_is_added() -> None:
    old = IPv4Interface("172.20.99.1/24")
    plan = bridge.plan(SPEC, GOOD, (old, FOREIGN), str(old))
    assert bridge.changes(plan) == [
        "remove old address 172.20.99.1/24 from cni0",
        "add address 172.20.100.1/24 to cni0",
    ]


def test_previous_address_already_gone_is_not_deleted() -> None:
    plan = bridge.plan(SPEC, GOOD, (ADDR,), "172.20.99.1/24")
    assert plan.steps == ()


def test_non_bridge_link_of_that_name_is_an_error() -> None:
    veth = Link("cni0", 3, "veth", 1500, "aa:bb:cc:dd:ee:ff", up=True)
    with pytest.raises(HostSetupError, match="cni0 exists but is a veth link, not a bridge"):
        bridge.plan(SPEC, veth, (), "")
    physical = Link("cni0", 3, "", 1500, "aa:bb:cc:dd:ee:ff", up=True)
    with pytest.raises(HostSetupError, match="physical link"):
        bridge.plan(SPEC, physical, (), "")


def test_corrupt_recorded_address_is_a_state_error() -> None:
    with pytest.raises(StateError, match="bridgeAddress"):
        bridge.plan(SPEC, GOOD, (ADDR,), "not-an-address")


def test_teardown_deletes_a_bridge_we_created() -> None:
    plan = bridge.plan_teardown("cni0", True, str(ADDR), GOOD, (ADDR, FOREIGN))
    assert bridge.changes(plan) == ["delete bridge cni0"]


def test_teardown_of_an_adopted_bridge_takes_back_only_our_address() -> None:
    plan = bridge.plan_teardown("cni0", False, str(ADDR), GOOD, (ADDR, FOREIGN))
    assert plan.steps == (
        Step(
            ("ip", "addr", "del", "172.20.100.1/24", "dev", "cni0"),
            "remove address 172.20.100.1/24 from cni0",
        ),
    )
    assert bridge.plan_teardown("cni0", False, str(ADDR), GOOD, (FOREIGN,)).steps == ()


def test_teardown_never_touches_a_non_bridge_or_missing_link() -> None:
    veth = Link("cni0", 3, "veth", 1500, "aa:bb:cc:dd:ee:ff", up=True)
    assert bridge.plan_teardown("cni0", True, str(ADDR), veth, (ADDR,)).steps == ()
    assert bridge.plan_teardown("cni0", True, str(ADDR), None, ()).steps == ()
