"""Rolling back to the Go tool: what it reads after cocoon-net stops holds every lease.

Real DHCP clients get leases from the daemon; the test notes, on the client side, when each
ACK had arrived. The daemon is then stopped: with SIGKILL, the worst case (a crash, or an
operator who kills it), and with SIGTERM, as `systemctl stop` does. The files are read with
the Go tool's own rules (tests/support/golease.py, independent of our decoder):

- after SIGKILL, leases.json holds every lease ACKed more than ROLLBACK_LAG_S before the kill
  (the bound docs/operations.md gives), although nothing happened since: the write-behind
  runs by itself, not only when the next change comes;
- after SIGTERM, leases.json holds every lease, even one ACKed just before the stop;
- pool.json loads as the Go daemon loads it, and each leased address is in its pool;
- what cocoon-net leaves behind is harmless once the Go tool starts: its `route replace` for
  each lease it restores takes our proto-203 /32 over (one route per address, proto boot),
  its iptables rules go in after our chains, and every VM still reaches the VPC peer with its
  own address.
"""

from __future__ import annotations

import signal
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net import proc
from cocoon_net.dhcp import store
from cocoon_net.sandbox import Dhclient, DhcpClient, Udhcpc
from tests.support import golease
from tests.support.daemon import node_with_daemon
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

# docs/operations.md, "Rolling back": leases.json holds every lease ACKed more than this ago.
ROLLBACK_LAG_S = 3.0


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_go_tool_reads_every_lease_after_the_daemon_stops(
    tmp_path: Path, signum: signal.Signals
) -> None:
    with node_with_daemon(3, tmp_path) as (sandbox, daemon):
        lease_file = daemon.paths.default_lease_file()
        clients: list[DhcpClient] = [
            Udhcpc(sandbox, sandbox.vms[0]),
            Dhclient(sandbox, sandbox.vms[1]),
            Udhcpc(sandbox, sandbox.vms[2]),
        ]
        acked: dict[str, tuple[IPv4Address, float]] = {}

        def bind(client: DhcpClient) -> None:
            ip = client.start()
            # start() returns after the client was bound: the ACK came before this moment.
            acked[client.vm.mac] = (ip, time.monotonic())

        for client in clients[:2]:
            bind(client)
        time.sleep(max(0.0, acked[clients[1].vm.mac][1] + ROLLBACK_LAG_S - time.monotonic()))
        if signum == signal.SIGTERM:
            bind(clients[2])
        stopped = time.monotonic()
        code = daemon.stop(signum)
        assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL)

        now = time.time()
        go = golease.read(lease_file.read_bytes(), now)
        on_file = {x.mac: x.ip for x in go.leases}
        assert not go.skipped, f"entries the Go tool would skip: {go.skipped}"
        every = {mac: ip for mac, (ip, _) in acked.items()}
        old = {mac: ip for mac, (ip, at) in acked.items() if stopped - at > ROLLBACK_LAG_S}
        assert len(old) == 2, f"the clients took too long to bind: {acked}"
        want = old if signum == signal.SIGKILL else every
        assert {mac: on_file.get(mac) for mac in want} == want
        assert all(x.expiry > now for x in go.leases)
        # cocoon-net itself, started again, would read the same.
        held = store.load(lease_file).leases
        assert {mac: held[mac].ip for mac in acked} == every

        pool = golease.read_pool(daemon.paths.pool_file.read_bytes())
        assert {ip for ip, _ in acked.values()} <= set(pool.ips)
        # The Go tool ignores our other files, and its leases-*.json temps are not ours.
        beside = {p.name for p in lease_file.parent.iterdir()}
        assert beside >= {"leases.json", "leases.json.journal", "leases.json.meta"}

        # The Go tool's start-up on this host, as far as it touches what we left.
        node = sandbox.node
        for lease in go.leases:
            sandbox.run(node, ["ip", "route", "replace", f"{lease.ip}/32", "dev", "cni0",
                               "proto", "boot", "scope", "global"])  # fmt: skip
        subnet = str(sandbox.subnet)
        for table, rule in [
            ("filter", ["FORWARD", "-i", "cni0", "-o", "cni0", "-j", "ACCEPT"]),
            ("nat", ["POSTROUTING", "-s", subnet, "!", "-o", "cni0", "-j", "MASQUERADE"]),
        ]:
            check = sandbox.run(node, ["iptables", "-t", table, "-C", *rule], ok_codes=(0, 1))
            if check.returncode:
                sandbox.run(node, ["iptables", "-t", table, "-A", *rule])
        routes = proc.run_json(["ip", "-n", node, "-d", "-json", "route", "show", "dev", "cni0"])
        for lease in go.leases:
            mine = [r for r in routes if r["dst"] in (str(lease.ip), f"{lease.ip}/32")]
            assert [r.get("protocol") for r in mine] == ["boot"], mine
        for client in clients:
            if client.vm.mac in on_file:
                assert sandbox.source_seen_by_peer(client.vm.netns) == on_file[client.vm.mac]
