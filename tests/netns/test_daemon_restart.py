"""Restarts, lost lease files, reloads and a lost bridge: no VM loses or shares an address.

- 50 udhcpc clients churn (start, renew, release, stop, from threads) while the daemon is
  stopped with SIGTERM and with SIGKILL and started again. Afterwards every VM holds the one
  address it always had (sticky allocation, durable grants), no address is on two VMs, the
  daemon's leases equal the kernel's proto-203 routes, and a crash at rest reloads every lease.
- The lease files are deleted while VMs hold leases: the daemon recovers the addresses from its
  own /32 routes, a new VM gets a free address, the old VMs keep theirs (RENEWING for udhcpc,
  INIT-REBOOT for dhclient, RFC 2131 §4.3.2).
- SIGHUP with a shrunk pool.json ends the leases outside the new pool and their routes; their
  VM is NAKed and starts over inside the pool.
- The bridge is deleted under the running daemon: it recreates cni0, binds to the new one and
  restores every lease's route.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net import proc, state
from cocoon_net.errors import HostSetupError
from cocoon_net.sandbox import Dhclient, DhcpClient, Sandbox, Udhcpc
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

CHURN_VMS = 50
CHURN_PHASE_S = 3.0  # churn before and between the restarts
INCOMPLETE = "lease state may be incomplete"
SHRUNK = 100


class Churn:
    """One thread per client: start, then renew / release / stop at random, until told to end.

    Every address a client is bound to is recorded per MAC. Client timeouts while the daemon
    is down are expected and only counted; the final checks are strict.
    """

    def __init__(self, clients: list[DhcpClient]) -> None:
        self.clients = clients
        self.seen: dict[str, set[IPv4Address]] = defaultdict(set)
        self.timeouts = 0
        self.bound = 0
        self._end = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(c, random.Random(i)), daemon=True)
            for i, c in enumerate(clients)
        ]

    def __enter__(self) -> Churn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a churn thread hangs"

    def _record(self, client: DhcpClient, ip: IPv4Address) -> None:
        with self._lock:
            self.seen[client.vm.mac].add(ip)
            self.bound += 1

    def _run(self, client: DhcpClient, rng: random.Random) -> None:
        while not self._end.is_set():
            try:
                if not client.running:
                    self._record(client, client.start())
                    continue
                action = rng.choice(("renew", "renew", "release", "stop"))
                if action == "renew":
                    self._record(client, client.renew())
                elif action == "release":
                    client.release()
                else:
                    client.stop()
            except HostSetupError:
                with self._lock:
                    self.timeouts += 1
                client.stop()


def settle(clients: list[DhcpClient]) -> dict[str, IPv4Address]:
    """Every client bound now (started or renewed), in parallel; MAC -> address."""

    def bind(client: DhcpClient) -> IPv4Address:
        return client.renew() if client.running else client.start()

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        held = list(pool.map(bind, clients))
    return {c.vm.mac: ip for c, ip in zip(clients, held, strict=True)}


def assert_one_vm_per_address(sandbox: Sandbox, clients: list[DhcpClient]) -> None:
    owners: dict[IPv4Address, list[str]] = defaultdict(list)
    for client in clients:
        ip = client.ip()
        if ip is not None:
            owners[ip].append(client.vm.netns)
    shared = {ip: vms for ip, vms in owners.items() if len(vms) > 1}
    assert not shared, f"addresses on two VMs: {shared}"


def assert_distinct_leases(daemon: NodeDaemon) -> None:
    leases = daemon.leases()
    ips = [row.ip for row in leases.values()]
    assert len(ips) == len(set(ips)), f"an address is leased twice: {sorted(ips)}"


@pytest.fixture
def churn_node(tmp_path: Path) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    with node_with_daemon(CHURN_VMS, tmp_path) as pair:
        yield pair


def test_sigterm_and_sigkill_under_churn_keep_every_address(
    churn_node: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, daemon = churn_node
    clients: list[DhcpClient] = [Udhcpc(sandbox, vm, timeout=20) for vm in sandbox.vms]

    with Churn(clients) as churn:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            time.sleep(CHURN_PHASE_S)
            code = daemon.stop(signum)
            assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
            daemon.start()
            assert_distinct_leases(daemon)
        time.sleep(CHURN_PHASE_S)
    assert churn.bound > CHURN_VMS, "the churn never got going"

    held = settle(clients)
    # Sticky and durable: each MAC was only ever given one address, before and after both
    # restarts, and it holds that address now.
    moved = {mac: sorted(ips) for mac, ips in churn.seen.items() if len(ips) > 1}
    assert not moved, f"clients whose address changed: {moved}"
    assert all(held[mac] in churn.seen[mac] for mac in churn.seen)
    assert len(set(held.values())) == CHURN_VMS
    assert_one_vm_per_address(sandbox, clients)
    assert {mac: row.ip for mac, row in daemon.leases().items()} == held
    assert daemon.routes_equal_leases() == set(held.values())

    # A crash at rest: the journal and snapshot bring back every lease, nothing more.
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert {mac: row.ip for mac, row in daemon.leases().items()} == held
    assert daemon.routes() == set(held.values())
    assert settle(clients) == held
    assert INCOMPLETE not in daemon.log()
    # SIGTERM is graceful: requests already decided and made durable still get their ACK.
    assert not daemon.errors()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("lost", ["leases.json*", "leases.json"], ids=["all-files", "snapshot"])
def test_lost_lease_file_never_gives_an_address_twice(
    tmp_path: Path, signum: signal.Signals, lost: str
) -> None:
    with node_with_daemon(3, tmp_path) as (sandbox, daemon):
        old = [Udhcpc(sandbox, sandbox.vms[0]), Dhclient(sandbox, sandbox.vms[1])]
        held = {c.vm.mac: c.start() for c in old}
        daemon.stop(signum)
        removed = list(daemon.paths.state_dir.glob(lost))
        assert removed, f"no {lost} in {daemon.paths.state_dir}"
        for path in removed:
            path.unlink()

        daemon.start()
        # The snapshot is gone, so the table starts without these leases: the routes hold them.
        assert daemon.routes() == set(held.values())
        newcomer = Udhcpc(sandbox, sandbox.vms[2])
        fresh = newcomer.start()
        assert fresh not in held.values()

        # The old VMs confirm their addresses: udhcpc renews (RENEWING), dhclient restarts on
        # its lease file (INIT-REBOOT). Both must be ACKed, not moved.
        assert {c.vm.mac: c.renew() for c in old} == held
        leases = {mac: row.ip for mac, row in daemon.leases().items()}
        assert leases == {**held, sandbox.vms[2].mac: fresh}
        assert daemon.routes_equal_leases() == set(leases.values())


def test_sighup_with_a_shrunk_pool_ends_the_leases_outside_it(tmp_path: Path) -> None:
    with node_with_daemon(3, tmp_path) as (sandbox, daemon):
        clients = [Udhcpc(sandbox, vm) for vm in sandbox.vms]
        held = {c.vm.mac: c.start() for c in clients}
        outside = clients[1]
        pool = state.load(daemon.paths.pool_file)
        pool.ips = [ip for ip in pool.ips if ip != str(held[outside.vm.mac])][:SHRUNK]
        state.save(daemon.paths.pool_file, pool)

        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.pool_counts()["size"] == SHRUNK or None, "the reload")
        kept = {mac: ip for mac, ip in held.items() if mac != outside.vm.mac}
        wait_for(
            lambda: {m: r.ip for m, r in daemon.leases().items()} == kept or None,
            "the lease outside the new pool to end",
        )
        assert daemon.routes_equal_leases() == set(kept.values())

        # Its VM is refused on renewal (NAK) and starts over inside the new pool.
        moved = outside.renew()
        assert str(moved) in pool.ips
        assert moved not in held.values()
        assert {c.renew() for c in clients} == {*kept.values(), moved}
        assert daemon.routes_equal_leases() == {*kept.values(), moved}


def test_recreated_bridge_is_rebound_and_its_routes_restored(tmp_path: Path) -> None:
    with node_with_daemon(2, tmp_path) as (sandbox, daemon):
        clients = [Udhcpc(sandbox, vm) for vm in sandbox.vms]
        held = {c.vm.mac: c.start() for c in clients}
        index = ifindex(sandbox.node, "cni0")

        # Deleting the bridge takes its routes with it; the daemon notices (netlink), sets the
        # bridge up again, binds to the new one and puts every lease's route back.
        sandbox.run(sandbox.node, ["ip", "link", "del", "cni0"])
        wait_for(
            lambda: (ifindex(sandbox.node, "cni0") not in (None, index)) or None,
            "cni0 to be recreated",
        )
        wait_for(lambda: daemon.routes() == set(held.values()) or None, "the routes to come back")
        sandbox.attach_vms("cni0")  # the CNI plugin's part: VM ports onto the new bridge

        assert {c.vm.mac: c.renew() for c in clients} == held
        for client in clients:
            assert sandbox.source_seen_by_peer(client.vm.netns) == held[client.vm.mac]
        assert daemon.routes_equal_leases() == set(held.values())
        assert not daemon.errors()


def ifindex(netns: str, name: str) -> int | None:
    links = proc.run_json(["ip", "-n", netns, "-json", "link", "show"])
    return next((int(link["ifindex"]) for link in links if link["ifname"] == name), None)
