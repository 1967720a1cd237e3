from __future__ import annotations

from typing import Any

from cocoon_net.node.nic import Link, pick_by_mac, pick_default_route_dev

MAC = "0a:1b:2c:3d:4e:5f"


def test_pick_by_mac_prefers_the_nic_over_links_that_copied_its_mac() -> None:
    links = [
        Link("eth1.100", 2, "vlan", 1500, MAC, up=True),
        Link("br0", 3, "bridge", 1500, MAC, up=True),
        Link("eth1", 9, "", 1500, MAC, up=True),
        Link("eth2", 4, "", 1500, "0a:00:00:00:00:01", up=True),
    ]
    assert pick_by_mac(links, MAC.upper()) == "eth1"
    assert pick_by_mac(links, "0A-00-00-00-00-01") == "eth2"
    assert pick_by_mac(links, "0a:00:00:00:00:99") is None


def test_pick_by_mac_among_equals_takes_the_lowest_index() -> None:
    links = [Link("b", 8, "veth", 1500, MAC, up=True), Link("a", 5, "veth", 1500, MAC, up=True)]
    assert pick_by_mac(links, MAC) == "a"


def test_default_route_with_lowest_metric_wins() -> None:
    routes: list[dict[str, Any]] = [
        {"dst": "10.0.0.0/8", "dev": "eth9"},
        {"dst": "default", "gateway": "10.0.0.1", "dev": "eth1", "metric": 200},
        {"dst": "default", "gateway": "10.0.0.1", "dev": "eth0", "metric": 100},
    ]
    assert pick_default_route_dev(routes) == "eth0"


def test_default_route_without_metric_counts_as_zero_and_multipath_takes_first_hop() -> None:
    assert (
        pick_default_route_dev(
            [{"dst": "default", "dev": "ens4"}, {"dst": "default", "dev": "eth0", "metric": 1}]
        )
        == "ens4"
    )
    multipath = [
        {
            "dst": "default",
            "nexthops": [
                {"gateway": "10.0.0.1", "dev": "eth3"},
                {"gateway": "10.0.1.1", "dev": "eth4"},
            ],
        }
    ]
    assert pick_default_route_dev(multipath) == "eth3"


def test_no_default_route_is_none() -> None:
    assert pick_default_route_dev([]) is None
    assert pick_default_route_dev([{"dst": "10.0.0.0/8", "dev": "eth0"}]) is None
