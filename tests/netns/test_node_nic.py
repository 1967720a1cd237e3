from __future__ import annotations

from collections.abc import Callable

import pytest

from cocoon_net.node import nic
from tests.support.netns import Netns

pytestmark = pytest.mark.netns


def test_primary_nic_mtu_and_mac_lookup(make_netns: Callable[[str], Netns]) -> None:
    ns = make_netns("nic")
    assert ns.call(nic.primary_nic) is None
    for name, mac in (("eth0", "0a:00:00:00:00:01"), ("eth1", "0a:00:00:00:00:02")):
        ns.ip(
            "link",
            "add",
            name,
            "address",
            mac,
            "mtu",
            "1460",
            "type",
            "veth",
            "peer",
            "name",
            name + "p",
        )
        ns.ip("link", "set", name, "up")
        ns.ip("link", "set", name + "p", "up")
    ns.ip("addr", "add", "10.9.0.2/24", "dev", "eth0")
    ns.ip("addr", "add", "10.9.1.2/24", "dev", "eth1")
    ns.ip("route", "add", "default", "via", "10.9.1.1", "dev", "eth1", "metric", "200")
    ns.ip("route", "add", "default", "via", "10.9.0.1", "dev", "eth0", "metric", "100")
    assert ns.call(nic.primary_nic) == "eth0"
    assert ns.call(nic.link_mtu, "eth0") == 1460
    assert ns.call(nic.link_mtu, "nope0") is None
    assert ns.call(nic.link_exists, "eth1")
    assert not ns.call(nic.link_exists, "nope0")
    assert ns.call(nic.link_by_mac, "0A:00:00:00:00:02") == "eth1"
    assert ns.call(nic.link_by_mac, "0a:00:00:00:00:99") is None
    # a bridge that copied eth1's MAC does not hide eth1
    ns.ip("link", "add", "br0", "address", "0a:00:00:00:00:02", "type", "bridge")
    assert ns.call(nic.link_by_mac, "0a:00:00:00:00:02") == "eth1"
    assert ns.call(nic.addresses, "eth1")[0].compressed == "10.9.1.2/24"
    assert ns.call(nic.addresses, "nope0") == ()
