"""A VM cannot harm another VM or the pool, shown with hand-made frames.

The attacker is a VM of the sandbox sending from its own MAC through its own eth0 (the raw
client in tests/support/rawclient.py). Every attack is checked twice: nothing changed (the
daemon's leases and pool counts, the kernel's routes, the victim's renewal) and the daemon did
see the frames (its drop counters rose by exactly the number sent), so a frame that never
arrived cannot pass for a frame that was refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.dhcp.model import DhcpMessage, MessageType
from cocoon_net.sandbox import Udhcpc, Vm
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import Netns, is_root
from tests.support.rawclient import exchange, random_mac, request

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

DROPS = "cocoon_net_dhcp_drops_total"
FLOOD = 500
BURST = 100


def send(
    vm: Vm,
    messages: Sequence[DhcpMessage],
    *,
    src_ip: IPv4Address | None = None,
    listen: float = 1.0,
) -> list[DhcpMessage]:
    """Send from vm's own MAC and collect the replies for `listen` seconds."""
    kwargs: dict[str, Any] = {"listen": listen}
    if src_ip is not None:
        kwargs["src_ip"] = src_ip
    replies: list[DhcpMessage] = Netns(vm.netns).call(
        exchange, vm.ifname, vm.mac, list(messages), **kwargs
    )
    return replies


def picture(daemon: NodeDaemon) -> dict[str, Any]:
    """Everything an attack must leave as it was."""
    return {
        "leases": daemon.leases(),
        "pool": daemon.pool_counts(),
        "routes": daemon.routes(),
    }


def wait_drops(daemon: NodeDaemon, reason: str, expected: float) -> None:
    wait_for(
        lambda: daemon.metric(DROPS, reason=reason) == expected or None,
        f"{expected:g} drops for {reason} (now {daemon.metric(DROPS, reason=reason):g})",
        timeout=10,
    )


def test_another_vms_chaddr_or_address_changes_nothing(tmp_path: Path) -> None:
    with node_with_daemon(2, tmp_path) as (sandbox, daemon):
        victim_vm, attacker = sandbox.vms
        victim = Udhcpc(sandbox, victim_vm)
        ip = victim.start()
        gw = sandbox.gateway
        before = picture(daemon)

        # The victim's chaddr in every message that could end, refuse or take its lease.
        spoofed = [
            request(MessageType.RELEASE, victim_vm.mac, ciaddr=ip, server_id=gw),
            request(MessageType.DECLINE, victim_vm.mac, requested=ip, server_id=gw),
            request(MessageType.REQUEST, victim_vm.mac, requested=ip, server_id=gw),  # SELECTING
            request(MessageType.REQUEST, victim_vm.mac, requested=ip),  # INIT-REBOOT
            request(MessageType.REQUEST, victim_vm.mac, ciaddr=ip),  # RENEWING
            request(MessageType.DISCOVER, victim_vm.mac),
        ]
        assert send(attacker, spoofed, src_ip=ip) == []
        wait_drops(daemon, "chaddr_mismatch", len(spoofed))

        # Its own chaddr, the victim's address: only the holder may release or decline it.
        own = [
            request(MessageType.RELEASE, attacker.mac, ciaddr=ip, server_id=gw),
            request(MessageType.DECLINE, attacker.mac, requested=ip, server_id=gw),
        ]
        assert send(attacker, own) == []
        wait_drops(daemon, "not_holder", len(own))

        # Dressed up as a relay: giaddr set, no relay allowed.
        relayed = [request(MessageType.RELEASE, victim_vm.mac, ciaddr=ip, giaddr=gw)]
        assert send(attacker, relayed) == []
        wait_drops(daemon, "relay_not_allowed", len(relayed))

        # Asking for the victim's address in INIT-REBOOT is answered NAK, never ACK.
        replies = send(attacker, [request(MessageType.REQUEST, attacker.mac, requested=ip)])
        assert [r.message_type for r in replies] in ([], [MessageType.NAK])

        assert picture(daemon) == before
        assert victim.renew() == ip
        assert daemon.leases()[victim_vm.mac].ip == ip
        assert daemon.routes() == {ip}


def test_discover_flood_leaves_the_pool_to_others(tmp_path: Path) -> None:
    with node_with_daemon(2, tmp_path) as (sandbox, daemon):
        attacker, bystander = sandbox.vms
        before = daemon.pool_counts()

        # In bursts the server's socket buffer can hold, so that every frame is counted.
        for burst in range(1, FLOOD // BURST + 1):
            flood = [request(MessageType.DISCOVER, random_mac()) for _ in range(BURST)]
            assert send(attacker, flood, listen=0.2) == []
            wait_drops(daemon, "chaddr_mismatch", burst * BURST)
        assert daemon.pool_counts() == before

        # From its own chaddr the flood is one client: one offer held at most, then the
        # per-MAC rate limit.
        offers = send(attacker, [request(MessageType.DISCOVER, attacker.mac) for _ in range(FLOOD)])
        assert offers, "the attacker's own DISCOVER got no OFFER at all"
        assert {offer.yiaddr for offer in offers} == {offers[0].yiaddr}
        assert daemon.metric(DROPS, reason="rate_limited") > 0
        after = daemon.pool_counts()
        assert after["offered"] == before["offered"] + 1
        assert after["free"] == before["free"] - 1

        ip = Udhcpc(sandbox, bystander).start()
        assert ip != offers[0].yiaddr
        assert daemon.leases()[bystander.mac].ip == ip


def test_metrics_answer_on_the_node_and_refuse_vms(tmp_path: Path) -> None:
    with node_with_daemon(1, tmp_path) as (sandbox, daemon):
        vm = sandbox.vms[0]
        ip = Udhcpc(sandbox, vm).start()
        body = daemon.metrics()
        assert "cocoon_net_dhcp_pool_available" in body
        assert daemon.metric("cocoon_net_dhcp_lease_active") == 1
        # The VM reaches the node (its renewals do), and the metrics port listens on every
        # address; the server itself refuses peers from the VM subnet.
        sandbox.run(vm.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.gateway)])
        with pytest.raises(AssertionError, match="GET"):
            daemon.metrics(host=str(sandbox.gateway), netns=vm.netns)
        assert daemon.leases()[vm.mac].ip == ip
