"""A lease store that cannot write: the daemon stops answering, says so in one line, stops
feeding the watchdog and exits non-zero, so that systemd's restart replays what is on disk.

The disk is a tiny tmpfs the test mounts on its own temporary directory (unmounted after);
the leases are taken by hand-made DHCP exchanges from one VM port, each from a MAC of its
own, so that the journal grows until the disk refuses it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net.dhcp.model import DhcpMessage, MessageType, Opt
from cocoon_net.errors import HostSetupError
from cocoon_net.sandbox import Udhcpc, Vm
from tests.support.daemon import NodeDaemon, node_with_daemon
from tests.support.netns import Netns, is_root
from tests.support.rawclient import exchange, random_mac, request

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

EXIT_BOUND = 10.0  # seconds from the failing write to the process gone
MAX_LEASES = 400  # far more than a 64 KiB disk holds journal lines for


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "cocoon-test", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def ask(vm: Vm, mac: str, mtype: MessageType, **kw: IPv4Address) -> DhcpMessage | None:
    """One message from mac behind vm's port; the server's reply, if any."""
    replies = Netns(vm.netns).call(
        exchange, vm.ifname, mac, [request(mtype, mac, **kw)], listen=0.5
    )
    return replies[0] if replies else None


def reply_type(reply: DhcpMessage | None) -> MessageType | None:
    return None if reply is None else MessageType(reply.options[Opt.MESSAGE_TYPE.value][0])


def lease_one(vm: Vm, gateway: IPv4Address) -> tuple[str, IPv4Address] | None:
    """DISCOVER and REQUEST for a new MAC behind vm's port: (mac, address) when ACKed."""
    mac = random_mac()
    offer = ask(vm, mac, MessageType.DISCOVER)
    if offer is None or reply_type(offer) != MessageType.OFFER:
        return None
    ack = ask(vm, mac, MessageType.REQUEST, requested=offer.yiaddr, server_id=gateway)
    return (mac, offer.yiaddr) if reply_type(ack) == MessageType.ACK else None


def fill(disk: Path) -> None:
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={disk / 'fill'}", "bs=4k"], capture_output=True, check=False
    )


def exit_after_failure(
    daemon: NodeDaemon, sandbox_vm: Vm, gateway: IPv4Address
) -> tuple[dict[str, IPv4Address], int, float]:
    """Lease until a REQUEST goes unanswered; the ACKed leases, the exit code and the seconds
    from the first unanswered REQUEST to the exit."""
    acked: dict[str, IPv4Address] = {}
    for _ in range(MAX_LEASES):
        got = lease_one(sandbox_vm, gateway)
        if got is None:
            break
        acked[got[0]] = got[1]
    else:
        raise AssertionError(f"{MAX_LEASES} leases ACKed on a full disk")
    failed_at = time.monotonic()
    assert daemon.proc is not None
    code = daemon.proc.wait(timeout=EXIT_BOUND + 5)
    took = time.monotonic() - failed_at
    daemon.proc = None
    return acked, code, took


def restart_on_full_disk(daemon: NodeDaemon, vm: Vm, gateway: IPv4Address) -> int:
    """Start the daemon on the full disk; its exit code, at start or at its first write."""
    try:
        daemon.start()
    except HostSetupError:
        assert daemon.proc is None or daemon.proc.returncode is not None
        return 1 if daemon.proc is None else daemon.proc.returncode
    acked, code, _took = exit_after_failure(daemon, vm, gateway)
    assert not acked, "a lease was ACKed on a full disk"
    return code


def test_full_disk_exits_and_the_restart_recovers_every_ack(
    tmp_path: Path, tiny_disk: Path
) -> None:
    lease_file = tiny_disk / "leases.json"
    with node_with_daemon(2, tmp_path, extra=("--lease-file", str(lease_file))) as (
        sandbox,
        daemon,
    ):
        first = Udhcpc(sandbox, sandbox.vms[0])
        ip = first.start()
        fill(tiny_disk)

        acked, code, took = exit_after_failure(daemon, sandbox.vms[1], sandbox.gateway)
        acked[sandbox.vms[0].mac] = ip
        assert code != 0
        assert took < EXIT_BOUND, f"exited {took:.1f} s after the failure"
        # leases.json's rewrite may fail first (an error, retried: the journal still holds
        # every lease); the journal's failure is the one line that ends the daemon.
        errors = daemon.errors()
        failed = [line for line in errors if "store.failed" in line]
        assert len(failed) == 1 and failed[0] == errors[-1], errors
        assert "No space left on device" in failed[0]

        # Restarted while the disk is still full: it fails again, loudly.
        lines = len(daemon.log().splitlines())
        code = restart_on_full_disk(daemon, sandbox.vms[1], sandbox.gateway)
        again = [line for line in daemon.log().splitlines()[lines:] if "No space left" in line]
        assert code != 0 and again, daemon.log().splitlines()[lines:]

        # The disk is fixed: the restart brings back every lease that was ACKed, routed.
        (tiny_disk / "fill").unlink()
        daemon.start()
        leases = {mac: row.ip for mac, row in daemon.leases().items()}
        assert leases == acked
        assert daemon.routes_equal_leases() == set(acked.values())


def test_removed_journal_exits(tmp_path: Path) -> None:
    with node_with_daemon(2, tmp_path) as (sandbox, daemon):
        ip = Udhcpc(sandbox, sandbox.vms[0]).start()
        for path in daemon.paths.state_dir.glob("leases.json*"):
            path.unlink()
        acked, code, took = exit_after_failure(daemon, sandbox.vms[1], sandbox.gateway)
        assert not acked, "a lease was ACKed after its journal was removed"
        assert code != 0
        assert took < EXIT_BOUND
        failed = daemon.errors()
        assert len(failed) == 1 and "deleted while in use" in failed[0], failed
        # The restart holds the routed address for its VM (the lease records are gone).
        daemon.start()
        assert daemon.routes() == {ip}
