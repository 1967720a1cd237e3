"""The daemon end to end on what its operators and VMs rely on, each read back by a real
client or by the operator's own command:

- a VM that holds an address DECLINEs it (RFC 2131 4.3.3): the address is quarantined, its
  route goes, it is offered to nobody, the holder included, not even after a restart; once the
  quarantine ends it is offered again;
- `status` and `status --json` list the live leases (IP, MAC, expiry, route) from the daemon;
- SIGHUP with a grown pool.json: a VM refused for lack of addresses gets one of the new ones;
- every daemon flag on a running daemon, each read by a real client (udhcpc's options) or by
  what it changes (reservation, relay, metrics, iptables).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net import state
from cocoon_net.dhcp.model import DhcpMessage, MessageType
from cocoon_net.sandbox import Sandbox, Udhcpc
from cocoon_net.sandbox.topology import Vm
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import Netns, is_root
from tests.support.optclient import OptionsUdhcpc
from tests.support.rawclient import exchange, random_mac, request

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

LEASE_S = 300
REPLY_WAIT_S = 3.0  # a generous bound for one reply; an early reply ends the wait


def send(vm: Vm, mac: str, *messages: DhcpMessage, expect: int = 0) -> list[DhcpMessage]:
    """Frames from vm's eth0 with source MAC `mac` (a VM speaks only for its own MAC); the
    replies, `expect` of them at most."""
    replies: list[DhcpMessage] = Netns(vm.netns).call(
        exchange, vm.ifname, mac, list(messages), listen=REPLY_WAIT_S, enough=expect
    )
    return replies


def offer_to(vm: Vm, mac: str | None = None) -> IPv4Address | None:
    """The address offered to a DISCOVER from vm (as chaddr `mac`, default its own)."""
    who = mac or vm.mac
    replies = send(vm, who, request(MessageType.DISCOVER, who), expect=1)
    offers = [r.yiaddr for r in replies if r.message_type is MessageType.OFFER]
    return offers[0] if offers else None


# -- DECLINE ------------------------------------------------------------------------------


def test_a_holders_decline_quarantines_its_address_even_across_a_restart(
    tmp_path: Path,
) -> None:
    with node_with_daemon(3, tmp_path, lease_time=str(LEASE_S)) as (sandbox, daemon):
        holder_vm, other_vm = sandbox.vms[0], sandbox.vms[1]
        client = Udhcpc(sandbox, holder_vm)
        ip = client.start()
        client.stop()  # the VM found the address in use; it DECLINEs it (RFC 5227 probe)
        assert daemon.routes_equal_leases() == {ip}
        send(holder_vm, holder_vm.mac, request(
            MessageType.DECLINE, holder_vm.mac, requested=ip, server_id=sandbox.gateway
        ))  # fmt: skip
        wait_for(lambda: daemon.pool_counts()["quarantined"] == 1 or None, "the quarantine")
        assert holder_vm.mac not in daemon.leases()
        assert daemon.routes_equal_leases() == set()

        def never_offered() -> None:
            # The holder (sticky allocation would give it the same address) and others.
            assert offer_to(holder_vm) not in (None, ip)
            assert offer_to(other_vm) not in (None, ip)
            assert offer_to(other_vm, random_mac()) not in (None, ip)

        never_offered()
        daemon.stop()
        daemon.start()
        assert daemon.pool_counts()["quarantined"] == 1
        never_offered()
        assert "1 quarantined" in daemon.status()


def test_a_decline_from_someone_else_changes_nothing(tmp_path: Path) -> None:
    with node_with_daemon(2, tmp_path) as (sandbox, daemon):
        ip = Udhcpc(sandbox, sandbox.vms[0]).start()
        intruder = sandbox.vms[1]
        send(intruder, intruder.mac, request(
            MessageType.DECLINE, intruder.mac, requested=ip, server_id=sandbox.gateway
        ))  # fmt: skip
        # The daemon has read it once the next request is answered (one socket, in order).
        assert offer_to(intruder) is not None
        assert daemon.pool_counts()["quarantined"] == 0
        assert daemon.leases()[sandbox.vms[0].mac].ip == ip


# -- status ------------------------------------------------------------------------------


def test_status_lists_the_live_leases_from_the_daemon(tmp_path: Path) -> None:
    with node_with_daemon(3, tmp_path, lease_time=str(LEASE_S)) as (sandbox, daemon):
        clients = [Udhcpc(sandbox, vm) for vm in sandbox.vms[:2]]
        started = time.time()
        held = {c.vm.mac: c.start() for c in clients}
        daemon.routes_equal_leases()

        doc = json.loads(daemon.cocoon("status", "--json", *daemon._path_flags()))
        live = doc["leases"]
        assert live["source"] == "daemon"
        rows = {row["mac"]: row for row in live["leases"]}
        assert {mac: IPv4Address(row["ip"]) for mac, row in rows.items()} == held
        for row in rows.values():
            assert row["route"] is True
            assert started + LEASE_S - 5 <= row["expires"] <= time.time() + LEASE_S + 1

        text = daemon.status()
        assert "Leases:     2 active (from daemon)" in text
        for mac, ip in held.items():
            line = next(x for x in text.splitlines() if mac in x)
            assert re.fullmatch(rf"  {ip}\s+{mac}\s+[45]m\d\ds\s+yes\s*", line), line

        clients[0].release()
        wait_for(lambda: clients[0].vm.mac not in daemon.leases() or None, "the release")
        text = daemon.status()
        assert clients[0].vm.mac not in text and clients[1].vm.mac in text
        assert "Leases:     1 active (from daemon)" in text


# -- SIGHUP with a grown pool ------------------------------------------------------------


def test_sighup_with_a_grown_pool_serves_the_new_addresses(tmp_path: Path) -> None:
    with node_with_daemon(3, tmp_path, start=False) as (sandbox, daemon):
        pool = state.load(daemon.paths.pool_file)
        everything = list(pool.ips)
        pool.ips = everything[:2]
        state.save(daemon.paths.pool_file, pool)
        daemon.start()
        clients = [Udhcpc(sandbox, vm) for vm in sandbox.vms]
        held = {c.vm.mac: c.start() for c in clients[:2]}
        assert {str(ip) for ip in held.values()} == set(everything[:2])
        assert offer_to(sandbox.vms[2]) is None  # exhausted

        pool.ips = everything[:4]
        state.save(daemon.paths.pool_file, pool)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.pool_counts()["size"] == 4 or None, "the reload")
        new = clients[2].start()
        assert str(new) in everything[2:4]
        assert {c.renew() for c in clients[:2]} == set(held.values())  # nobody moved
        assert daemon.routes_equal_leases() == {*held.values(), new}


# -- every daemon flag, read back --------------------------------------------------------

RELAY = IPv4Address("172.20.100.250")
RESERVED = "172.20.100.77"
FLAGS = (
    "--domain", "vms.example.test",
    "--search", "a.example.test,b.example.test",
    "--ntp", "10.99.0.123,10.99.0.124",
    "--classless-route", "10.250.0.0/16=172.20.100.1",
    "--decline-quarantine", "10s",
    "--read-interval", "50ms",
    "--relay-from", str(RELAY),
    "--skip-iptables",
    # The relay agent of these tests sends from a VM's port, which the guard rightly refuses
    # (no VM may send from UDP port 67); the VM guard has its own tests.
    "--no-guard",
)  # fmt: skip


FLUSH = "for t in filter nat mangle raw; do iptables -t $t -F; iptables -t $t -X; done"


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    root = tmp_path_factory.mktemp("flags")
    with Sandbox(3, tmpdir=root) as sandbox:
        reserve = ("--reservation", f"{sandbox.vms[2].mac}={RESERVED}")
        daemon = NodeDaemon(
            sandbox, root / "node", lease_time=str(LEASE_S), extra=(*FLAGS, *reserve)
        )
        try:
            daemon.adopt()
            # adopt installed the node's rules; gone now, a daemon that manages the firewall
            # would put them back at start.
            Netns(sandbox.node).sh(FLUSH)
            daemon.start()
            yield sandbox, daemon
        finally:
            daemon.close()


@pytest.fixture(scope="module")
def options(flagged: tuple[Sandbox, NodeDaemon]) -> dict[str, str]:
    sandbox, _ = flagged
    client = OptionsUdhcpc(sandbox, sandbox.vms[0])
    client.start()
    return client.options()


def test_lease_time_reaches_the_client(options: dict[str, str]) -> None:
    assert options["lease"] == str(LEASE_S)


def test_domain_search_and_ntp_reach_the_client(options: dict[str, str]) -> None:
    assert options["domain"] == "vms.example.test"
    assert options["search"].split() == ["a.example.test", "b.example.test"]
    assert options["ntpsrv"].split() == ["10.99.0.123", "10.99.0.124"]


def test_classless_routes_reach_the_client_with_the_default_route(
    options: dict[str, str],
) -> None:
    # RFC 3442: with option 121 the client ignores option 3, so the default route rides along.
    routes = options["staticroutes"].split()
    pairs = set(zip(routes[::2], routes[1::2], strict=True))
    assert ("10.250.0.0/16", "172.20.100.1") in pairs
    assert ("0.0.0.0/0", "172.20.100.1") in pairs
    assert options["msstaticroutes"] == options["staticroutes"]


def test_a_reservation_gives_its_mac_its_address(flagged: tuple[Sandbox, NodeDaemon]) -> None:
    sandbox, daemon = flagged
    assert str(Udhcpc(sandbox, sandbox.vms[2]).start()) == RESERVED
    assert daemon.leases()[sandbox.vms[2].mac].ip == IPv4Address(RESERVED)
    assert offer_to(sandbox.vms[1], random_mac()) != IPv4Address(RESERVED)


def test_relayed_requests_are_answered_only_from_the_named_relay(
    flagged: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, _ = flagged
    vm = sandbox.vms[1]
    ns = Netns(vm.netns)
    ns.ip("addr", "add", f"{RELAY}/24", "dev", vm.ifname)
    ns.ip("addr", "add", "172.20.100.251/24", "dev", vm.ifname)
    try:
        for relay, answered in ((RELAY, True), (IPv4Address("172.20.100.251"), False)):
            relayed = request(MessageType.DISCOVER, random_mac(), giaddr=relay)
            got = ns.call(_relay_exchange, vm.ifname, vm.mac, relayed, relay)
            assert got == answered, relay
    finally:
        ns.ip("addr", "flush", "dev", vm.ifname)


def _relay_exchange(ifname: str, mac: str, message: DhcpMessage, relay: IPv4Address) -> bool:
    """Send a relayed DISCOVER from relay:67; whether an OFFER came back to relay:67."""
    import socket

    from cocoon_net.dhcp import packet

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(relay), 67))
        sock.settimeout(REPLY_WAIT_S)
        sock.sendto(packet.encode(message), ("172.20.100.1", 67))
        try:
            while True:
                reply = packet.decode(sock.recv(2048))
                if reply.xid == message.xid:
                    return reply.message_type is MessageType.OFFER
        except TimeoutError:
            return False


def test_a_short_decline_quarantine_ends_when_the_flag_says(
    flagged: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, daemon = flagged
    vm = sandbox.vms[1]
    mac = random_mac()
    ip = offer_to(vm, mac)
    assert ip is not None
    declined = time.monotonic()
    send(vm, mac, request(MessageType.DECLINE, mac, requested=ip, server_id=sandbox.gateway))
    wait_for(lambda: daemon.pool_counts()["quarantined"] == 1 or None, "the quarantine")
    assert offer_to(vm, mac) != ip
    # 10 s, not the default 10 min: over within a generous 40 s, and not before 10 s.
    wait_for(lambda: daemon.pool_counts()["quarantined"] == 0 or None, "its end", timeout=40)
    assert time.monotonic() - declined >= 10


def test_requests_that_come_within_the_read_interval_are_read_together(
    flagged: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, daemon = flagged
    vm, mac = sandbox.vms[1], random_mac()
    before = daemon.metric("cocoon_net_dhcp_reads_total")
    # Six DISCOVERs 5 ms apart: read one by one with the default 4 ms, but the first at once
    # and the rest within one or two 50 ms intervals with the flag.
    discovers = [request(MessageType.DISCOVER, mac) for _ in range(6)]
    replies = Netns(vm.netns).call(
        exchange, vm.ifname, mac, discovers, listen=REPLY_WAIT_S, enough=6, gap=0.005
    )
    assert [r.message_type for r in replies] == [MessageType.OFFER] * 6
    assert daemon.metric("cocoon_net_dhcp_reads_total") - before <= 3


def test_metrics_listen_where_told(flagged: tuple[Sandbox, NodeDaemon]) -> None:
    _, daemon = flagged
    assert "cocoon_net" in daemon.metrics()


def test_skip_iptables_leaves_the_firewall_alone(flagged: tuple[Sandbox, NodeDaemon]) -> None:
    sandbox, daemon = flagged
    assert daemon.running
    assert "-A " not in Netns(sandbox.node).iptables_save()
