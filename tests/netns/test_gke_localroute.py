"""The guest agent's `local <cidr> table local` route, removed for real inside a namespace."""

from __future__ import annotations

import json
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.platform.base import NodeRequest
from cocoon_net.platform.gke import GkePlatform
from cocoon_net.platform.localroute import remove_guest_agent_routes
from tests.emulators.gce import GceEmulator
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

CIDR = "172.20.100.0/24"


def _node(make_netns: Callable[[str], Netns]) -> Netns:
    ns = make_netns("gar")
    # no dummy module on every kernel: a veth pair whose peer stays unused
    ns.ip("link", "add", "ens4", "type", "veth", "peer", "name", "ens4p")
    ns.ip("link", "set", "ens4", "up")
    ns.ip("addr", "add", "10.128.0.2/32", "dev", "ens4")
    # what the guest agent installs for an alias range
    ns.ip("route", "add", "local", CIDR, "dev", "ens4", "table", "local", "proto", "66")
    # a local route for another range (not ours): must stay
    ns.ip("route", "add", "local", "192.0.2.0/24", "dev", "ens4", "table", "local")
    return ns


def _local_routes(ns: Netns) -> list[str]:
    routes = json.loads(ns.ip("-json", "route", "show", "table", "local", "type", "local"))
    return sorted(f"{r['dst']} {r['dev']}" for r in routes)


def test_route_is_removed_again_each_time_it_reappears(
    make_netns: Callable[[str], Netns],
) -> None:
    ns = _node(make_netns)
    before = _local_routes(ns)
    assert f"{CIDR} ens4" in before

    assert ns.call(remove_guest_agent_routes, CIDR) == [f"local {CIDR} dev ens4 table local"]
    assert _local_routes(ns) == [r for r in before if r != f"{CIDR} ens4"]
    assert "10.128.0.2 ens4" in _local_routes(ns)  # the host's own address is untouched
    assert "192.0.2.0/24 ens4" in _local_routes(ns)

    # the agent puts it back (resync, restart): the reconciler's next pass removes it again
    ns.ip("route", "add", "local", CIDR, "dev", "ens4", "table", "local", "proto", "66")
    assert ns.call(remove_guest_agent_routes, IPv4Network(CIDR)) == [
        f"local {CIDR} dev ens4 table local"
    ]
    assert ns.call(remove_guest_agent_routes, CIDR) == []  # nothing left: a no-op
    assert f"{CIDR} ens4" not in _local_routes(ns)


def _provision_inside(agent_config: str) -> dict[str, Any]:
    """init's cloud step with the emulator inside the namespace (its own loopback)."""
    gce = GceEmulator().start()
    try:
        cloud: dict[str, Any] = {}
        env = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=agent_config)
        platform = GkePlatform(env, timeout=2.0, sleep=lambda s: None)
        subnet = IPv4Network(CIDR)
        request = NodeRequest("node-1", subnet, subnet.network_address + 1, 10, "ens4")
        platform.provision(request, cloud.update)
        return {
            "cloud": cloud,
            "primary": platform.primary_nic(),
            "aliases": gce.nic0["aliasIpRanges"],
        }
    finally:
        gce.stop()


def test_init_removes_the_route_and_turns_the_agent_off(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = _node(make_netns)
    ns.ip("link", "set", "ens4", "address", "42:01:0a:80:00:02")  # the emulated nic0 MAC
    # ens4p, its peer, is a decoy with another MAC
    cfg = tmp_path / "instance_configs.cfg"
    cfg.write_text("[IpForwarding]\nethernet_proto_id = 66\nip_aliases = true\n")

    out = ns.call(_provision_inside, str(cfg))

    assert f"{CIDR} ens4" not in _local_routes(ns)
    assert "192.0.2.0/24 ens4" in _local_routes(ns)
    assert out["primary"] == "ens4"  # found by the metadata MAC, not by name
    assert out["aliases"] == [{"subnetworkRangeName": "cocoon-pods", "ipCidrRange": CIDR}]
    assert cfg.read_text() == "[IpForwarding]\nethernet_proto_id = 66\nip_aliases = false\n"
    assert out["cloud"]["agentIpAliasesBefore"] == "true"
