"""init and adopt on a node whose daemon runs: the pool grows (and shrinks) online.

Each test runs the real command (`python -m cocoon_net --netns NODE`) next to a running
daemon in a sandbox, with real DHCP clients in the VMs. What is asserted is what an operator
sees: the command's output and exit code, pool.json, which addresses the VMs get, and that
the daemon's PID never changed (no restart).
"""

from __future__ import annotations

import fcntl
import subprocess
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net import config, control, state
from cocoon_net.dhcp.model import DhcpMessage, MessageType, Opt
from cocoon_net.errors import CocoonError
from cocoon_net.sandbox import Sandbox, Udhcpc, Vm
from tests.emulators.gce import GceEmulator
from tests.emulators.volcengine import VolcEmulator
from tests.support.cli import cocoon, tree_digest
from tests.support.daemon import NodeDaemon, wait_for
from tests.support.netns import Netns, is_root
from tests.support.rawclient import exchange, request

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

CLOSED = "http://127.0.0.1:9"  # nothing listens there: the other platform's probe misses


def _static(node: NodeDaemon, *extra: str) -> subprocess.CompletedProcess[str]:
    """`adopt --platform static` with the sandbox's settings (as SandboxNode.adopt) + extra."""
    sb = node.sandbox
    return node.run(
        "adopt", "--platform", "static", "--node-name", "demo", "--subnet", str(sb.subnet),
        "--manage-iptables", "--vpc-cidr", str(sb.node_uplink.network),
        "--state-dir", str(node.paths.state_dir), "--run-dir", str(node.paths.run_dir),
        "--cni-conf-dir", str(node.paths.cni_conf_dir), *extra,
    )  # fmt: skip


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _refused(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 with one line on stderr, nothing on stdout; that line."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
    return proc.stderr


def _offers(vm: Vm) -> list[DhcpMessage]:
    """The OFFER a DISCOVER from vm's own MAC gets: the first ends the wait, and 3 s of
    silence (generous, for a loaded machine) means none."""
    replies: list[DhcpMessage] = Netns(vm.netns).call(
        exchange, vm.ifname, vm.mac, [request(MessageType.DISCOVER, vm.mac)], listen=3.0, enough=1
    )
    return replies


def _pool(node: NodeDaemon) -> set[IPv4Address]:
    return set(state.load(node.paths.pool_file).pool_ips)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    with Sandbox(3, tmpdir=tmp_path) as sb:
        yield sb


@pytest.fixture
def node(sandbox: Sandbox, tmp_path: Path) -> Iterator[NodeDaemon]:
    node = NodeDaemon(sandbox, tmp_path / "node")
    try:
        yield node
    finally:
        node.close()


def _command_files(node: NodeDaemon) -> dict[str, str]:
    """What init and adopt may write (pool.json, the conflist), without the lease files: a
    running daemon rewrites those behind its journal whenever a lease changes."""
    files = tree_digest(node.root / "state") | tree_digest(node.paths.cni_conf_dir)
    return {path: digest for path, digest in files.items() if "leases.json" not in path}


def _clients(sandbox: Sandbox) -> list[Udhcpc]:
    return [Udhcpc(sandbox, vm, hostname=f"vm{vm.index}") for vm in sandbox.vms]


def test_static_grow_then_shrink_while_the_daemon_serves(
    sandbox: Sandbox, node: NodeDaemon
) -> None:
    _ok(_static(node, "--pool-size", "2"))
    sandbox.attach_vms(config.DEFAULT_BRIDGE)
    node.start()
    assert node.proc is not None
    pid = node.proc.pid
    vm0, vm1, vm2 = _clients(sandbox)
    try:
        first = {vm0.start(), vm1.start()}
        assert first == _pool(node)  # both addresses taken
        assert _offers(sandbox.vms[2]) == []  # the pool is exhausted

        out = _ok(_static(node, "--pool-size", "4"))
        assert out.splitlines()[-1] == "daemon now serves 4 addresses"
        grown = _pool(node)
        assert len(grown) == 4 and first < grown
        new = vm2.start()  # a new VM gets an address from the new part, no restart
        assert new in grown - first
        assert node.running and node.proc.pid == pid
        assert node.pool_counts()["size"] == 4
        assert {row.ip for row in node.leases().values()} == first | {new}
        assert node.routes_equal_leases() == first | {new}

        # Shrinking to 2 would take vm2's address away: refused, nothing changed.
        files = _command_files(node)
        line = _refused(_static(node, "--pool-size", "2"))
        assert f"are leased ({new})" in line
        assert _command_files(node) == files
        assert node.pool_counts()["size"] == 4
        assert node.leases()[sandbox.vms[2].mac].ip == new

        # Had vm2 got its address after that check, the daemon itself refuses the narrower
        # pool init hands it before the cloud is called, and serves the old one on.
        before = node.paths.pool_file.read_bytes()
        shrunk = state.load(node.paths.pool_file)
        shrunk.ips = [str(ip) for ip in sorted(first)]
        state.save(node.paths.pool_file, shrunk)
        with pytest.raises(CocoonError, match=f"leaves out leased addresses \\({new}\\)"):
            control.request(node.paths.control_socket, {"cmd": "reload", "keep_leases": True})
        assert node.pool_counts()["size"] == 4
        assert node.leases()[sandbox.vms[2].mac].ip == new
        node.paths.pool_file.write_bytes(before)

        # Once vm2 is deleted (its lease released), the same shrink goes through online.
        vm2.stop()
        assert node.release(sandbox.vms[2].mac) == [str(new)]
        out = _ok(_static(node, "--pool-size", "2"))
        assert out.splitlines()[-1] == "daemon now serves 2 addresses"
        assert _pool(node) == first
        assert node.pool_counts()["size"] == 2
        assert node.running and node.proc.pid == pid
        assert {row.ip for row in node.leases().values()} == first  # vm0 and vm1 kept theirs
    finally:
        for client in (vm0, vm1, vm2):
            client.stop()
    assert not node.errors()


def test_shrink_without_a_daemon_reads_the_lease_store(sandbox: Sandbox, node: NodeDaemon) -> None:
    _ok(_static(node, "--pool-size", "3"))
    sandbox.attach_vms(config.DEFAULT_BRIDGE)
    node.start()
    vm0, vm1, _ = _clients(sandbox)
    try:
        leased = sorted([vm0.start(), vm1.start()])
    finally:
        vm0.stop()
        vm1.stop()
    node.stop()  # the leases live on in the lease files only

    files = tree_digest(node.paths.state_dir)
    line = _refused(_static(node, "--pool-size", "1"))
    assert f"are leased ({leased[1]})" in line
    assert tree_digest(node.paths.state_dir) == files
    # Nothing leased in the part that goes: accepted, and no daemon is asked.
    out = _ok(_static(node, "--pool-size", "2"))
    assert "daemon now serves" not in out
    assert _pool(node) == set(leased)


def test_changes_a_running_daemon_cannot_take_are_refused(
    sandbox: Sandbox, node: NodeDaemon
) -> None:
    _ok(_static(node, "--pool-size", "2"))
    sandbox.attach_vms(config.DEFAULT_BRIDGE)
    node.start()
    assert node.proc is not None
    pid = node.proc.pid
    files = _command_files(node)
    refused = {
        ("--mtu", "1400"): "mtu (default) -> 1400",
        ("--drop-internal-access",): "drop-internal-access false -> true",
        ("--bridge", "br-other"): "bridge cni0 -> br-other",
        ("--gateway", str(sandbox.subnet.network_address + 9)): "gateway",
        ("--bridge-mac", "02:00:00:00:00:01"): "bridge-mac",
    }
    for flags, what in refused.items():
        line = _refused(_static(node, "--pool-size", "3", *flags))
        assert f"the running daemon (pid {pid}, daemon)" in line
        assert what in line and "stop the daemon first" in line
    # A new subnet: the static pool follows it, so the same refusal comes before the cloud.
    line = _refused(_static(node, "--subnet", "172.20.200.0/24"))
    assert "subnet 172.20.100.0/24 -> 172.20.200.0/24" in line
    assert _command_files(node) == files
    assert node.pool_counts()["size"] == 2

    line = _refused(node.run("teardown", "--state-dir", str(node.paths.state_dir),
                             "--run-dir", str(node.paths.run_dir)))  # fmt: skip
    assert f"the daemon is running (pid {pid}, daemon): stop it first" in line
    assert node.paths.pool_file.exists()

    # A second daemon is refused and names the first.
    second = node.run("daemon", "--state-dir", str(node.paths.state_dir),
                      "--run-dir", str(node.paths.run_dir), "--metrics-addr", "")  # fmt: skip
    assert second.returncode == 1
    assert f"pid {pid}, daemon" in second.stderr.splitlines()[-1]
    assert node.running and node.proc.pid == pid

    # A dns change is taken online.
    out = _ok(_static(node, "--pool-size", "2", "--dns", "9.9.9.9"))
    assert out.splitlines()[-1] == "daemon now serves 2 addresses"
    assert state.load(node.paths.pool_file).dns_servers == ["9.9.9.9"]
    offers = _offers(sandbox.vms[0])
    assert [o.options[Opt.DNS.value] for o in offers] == [IPv4Address("9.9.9.9").packed]

    node.stop()
    out = _ok(_static(node, "--pool-size", "2", "--mtu", "1400"))  # no daemon: allowed
    assert state.load(node.paths.pool_file).mtu == 1400


def _grow_online(
    sandbox: Sandbox,
    node: NodeDaemon,
    env: dict[str, str],
    platform: str,
    sizes: tuple[int, int],
    between: Callable[[], None],
    expected_errors: str = "",
) -> None:
    """`init --pool-size small`, the daemon serving two VMs from it, `init --pool-size big`
    (calling between() before and after it): a third VM gets an address from the new part,
    and the daemon never restarted."""
    small, big = sizes
    init = [
        "--netns", sandbox.node, "init", "--platform", platform, "--node-name", "grow-node",
        "--subnet", str(sandbox.subnet), "--state-dir", str(node.paths.state_dir),
        "--run-dir", str(node.paths.run_dir), "--cni-conf-dir", str(node.paths.cni_conf_dir),
    ]  # fmt: skip
    vm0, vm1, vm2 = _clients(sandbox)
    try:
        out = _ok(cocoon(*init, "--pool-size", str(small), env=env))
        assert f"{small} IPs provisioned" in out
        sandbox.attach_vms(config.DEFAULT_BRIDGE)
        node.start()
        assert node.proc is not None
        pid = node.proc.pid
        first = {vm0.start(), vm1.start()}
        assert first == _pool(node)
        assert _offers(sandbox.vms[2]) == []

        between()
        out = _ok(cocoon(*init, "--pool-size", str(big), env=env))
        assert f"{big} IPs provisioned" in out
        assert out.splitlines()[-1] == f"daemon now serves {big} addresses"
        between()
        new = vm2.start()
        assert new in _pool(node) - first
        assert node.running and node.proc.pid == pid
        assert node.routes_equal_leases() == first | {new}
    finally:
        for client in (vm0, vm1, vm2):
            client.stop()
        node.stop()
    assert not [e for e in node.errors() if not (expected_errors and expected_errors in e)]


def test_gke_init_grows_the_pool_of_a_running_daemon(
    sandbox: Sandbox, node: NodeDaemon, tmp_path: Path
) -> None:
    gce = GceEmulator(netns=sandbox.node).start()
    env = gce.environ(
        COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "instance_configs.cfg"),
        COCOON_NET_VOLCENGINE_METADATA_URL=CLOSED,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=CLOSED,
    )
    alias = {"ipCidrRange": str(sandbox.subnet), "subnetworkRangeName": "cocoon-pods"}
    mutations: list[int] = []

    def no_cloud_change() -> None:
        # The alias already routes the whole subnet here: growing needs no cloud change.
        assert alias in gce.nic0["aliasIpRanges"]
        mutations.append(gce.state.mutations_applied)
        assert mutations[-1] == mutations[0]

    try:
        _grow_online(sandbox, node, env, "gke", (2, 4), no_cloud_change)
    finally:
        gce.stop()


def test_volcengine_init_grows_the_pool_of_a_running_daemon(
    sandbox: Sandbox, node: NodeDaemon
) -> None:
    emu = VolcEmulator()
    emu.hotplug_into(sandbox.node)
    emu.start(netns=sandbox.node)
    env = {**emu.environ(), "GCE_METADATA_HOST": "127.0.0.1:9"}
    seen: list[int] = []

    def cloud_grows_first() -> None:
        enis = [e for e in emu.enis.values() if e.type != "primary"]
        seen.append(sum(len(e.secondary) for e in enis))
        # Before the growth: 2 secondary IPs on one ENI; after: a full ENI and a second one.
        assert (seen, len(enis)) in (([2], 1), ([2, 22], 2))

    try:
        # The emulator's ENIs lead nowhere: no gateway answers ARP behind them, which the
        # daemon rightly reports as an egress error (egress has its own tests).
        _grow_online(
            sandbox, node, env, "volcengine", (2, 22), cloud_grows_first,
            expected_errors="egress: gateway",
        )  # fmt: skip
        assert len(state.load(node.paths.pool_file).secondary_nics) == 2
    finally:
        emu.stop()


def test_a_daemon_starting_during_an_init_waits_and_serves_its_pool(
    sandbox: Sandbox, node: NodeDaemon
) -> None:
    """The daemon restarts while an init holds the state lock: it reads pool.json only after
    the init is done, so it serves the pool the init wrote, not the one before."""
    _ok(_static(node, "--pool-size", "2"))
    sandbox.attach_vms(config.DEFAULT_BRIDGE)
    node.paths.run_dir.mkdir(parents=True, exist_ok=True)
    with node.paths.lock_file.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242 init\n")
        held.flush()
        starting = threading.Thread(target=node.start)
        starting.start()
        try:
            wait_for(
                lambda: "waiting for pid 4242, init" in node.log() or None,
                "the daemon to wait for the init",
            )
            # What the init writes before it lets go: a grown pool.
            pool = state.load(node.paths.pool_file)
            pool.ips = [str(ip) for ip in list(sandbox.subnet.hosts())[1:5]]
            state.save(node.paths.pool_file, pool)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            starting.join()
    assert node.running
    assert node.pool_counts()["size"] == 4
