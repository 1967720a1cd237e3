"""Addresses held after the lease file was lost: for their own VM only, for one lease time
only (however often the daemon restarts), and never handed on while someone answers for them.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net.dhcp.model import DhcpMessage, MessageType, Opt
from cocoon_net.sandbox import Udhcpc, Vm
from tests.support.daemon import node_with_daemon, wait_for
from tests.support.netns import Netns, is_root
from tests.support.rawclient import exchange, request

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

LEASE = 30  # seconds: udhcpc renews on its own at half of it


def ask(vm: Vm, message: DhcpMessage, **kw: IPv4Address) -> list[MessageType]:
    replies = Netns(vm.netns).call(exchange, vm.ifname, vm.mac, [message], listen=1.0, **kw)
    return [MessageType(r.options[Opt.MESSAGE_TYPE.value][0]) for r in replies]


def test_lost_lease_file_holds_for_the_vm_that_answers_and_for_one_lease_time(
    tmp_path: Path,
) -> None:
    with node_with_daemon(4, tmp_path, lease_time=f"{LEASE}s") as (sandbox, daemon):
        live = [Udhcpc(sandbox, vm) for vm in sandbox.vms[:2]]
        gone = Udhcpc(sandbox, sandbox.vms[2])
        third = sandbox.vms[3]
        held = {c.vm.mac: c.start() for c in live}
        deleted_ip = gone.start()
        for client in live:
            client.stop()  # no renewal while the daemon is down
        gone.stop()
        sandbox.run(gone.vm.netns, ["ip", "addr", "flush", "dev", gone.vm.ifname])  # VM deleted
        daemon.stop()
        for path in daemon.paths.state_dir.glob("leases.json*"):
            path.unlink()

        daemon.start()
        lost_at = time.monotonic()
        assert daemon.routes() == {*held.values(), deleted_ip}
        free = daemon.pool_counts()["free"]

        # A VM that never held it names a held address in a RENEW: refused.
        renew = request(MessageType.REQUEST, third.mac, ciaddr=deleted_ip)
        assert ask(third, renew, src_ip=deleted_ip) == [MessageType.NAK]
        renew = request(MessageType.REQUEST, third.mac, ciaddr=next(iter(held.values())))
        assert ask(third, renew, src_ip=next(iter(held.values()))) == [MessageType.NAK]

        # Two restarts within the lease time do not push the hold's end back.
        for _ in range(2):
            time.sleep(LEASE / 3 - 2)
            daemon.stop()
            daemon.start()

        # The live VMs come back (their address still on eth0) and renew: the same address.
        for client in live:
            assert client.start() == held[client.vm.mac]
        leases = {mac: row.ip for mac, row in daemon.leases().items()}
        assert leases == held

        # One lease time after the loss (not after the last restart), the deleted VM's
        # address is free again and its route gone.
        wait_for(
            lambda: daemon.pool_counts()["free"] == free + 1 or None,
            "the deleted VM's address to return to the pool",
            timeout=LEASE + 10 - (time.monotonic() - lost_at),
        )
        assert time.monotonic() - lost_at < LEASE + 10
        fresh = Udhcpc(sandbox, third).start()
        assert fresh not in held.values()
        assert not daemon.errors()


def test_an_address_someone_answers_for_is_not_offered_when_its_quarantine_ends(
    tmp_path: Path,
) -> None:
    # Without the guard (which would drop the squatter's ARP answers and its traffic alike),
    # a VM may keep using an address it declined; the one-address pool makes any offer that
    # address.
    with node_with_daemon(
        2,
        tmp_path,
        adopt_flags=("--pool-size", "1"),
        extra=("--no-guard", "--decline-quarantine", "10s"),
    ) as (sandbox, daemon):
        squatter, newcomer = sandbox.vms
        client = Udhcpc(sandbox, squatter)
        ip = client.start()
        client.stop()  # the address stays on its eth0: it answers ARP
        decline = request(
            MessageType.DECLINE, squatter.mac, requested=ip, server_id=sandbox.gateway
        )
        assert ask(squatter, decline) == []  # no reply to a DECLINE
        wait_for(lambda: daemon.pool_counts()["quarantined"] == 1 or None, "the quarantine")

        # From the end of the quarantine on, and through the probe: no offer, ever.
        wait_for(lambda: daemon.pool_counts()["quarantined"] == 0 or None, "its end", timeout=15)
        discover = request(MessageType.DISCOVER, newcomer.mac)
        for _ in range(4):
            assert ask(newcomer, discover) == []
        assert " still answers ARP " in daemon.log()
        assert daemon.pool_counts()["free"] == 0
        assert not daemon.errors()
