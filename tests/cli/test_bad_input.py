"""Bad input of every kind: one line on stderr, a non-zero exit, and nothing changed.

Each case runs the real command inside a fresh namespace (via the global --netns), next to a
good pool.json in the Go tool's format, and compares the namespace's links, addresses, routes,
firewall and sysctls and every file under the test's directories before and after.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cli import NodePaths, cocoon, kernel_snapshot, run_args, tree_digest
from tests.support.netns import Netns

GOOD_POOL = {
    "platform": "static",
    "nodeName": "good-node",
    "subnet": "10.77.0.0/24",
    "gateway": "10.77.0.1",
    "primaryNIC": "eth0",
    "ips": ["10.77.0.2", "10.77.0.3"],
    "dnsServers": ["8.8.8.8"],
    "updatedAt": "2026-04-05T06:00:00.123456789Z",
}
NODE = ["--platform", "static", "--node-name", "node-a", "--subnet", "10.88.0.0/24"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # after the subcommand's path flags
    exit_code: int
    command: str = "adopt"
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[NodePaths], object] | None = None
    user: int | None = None
    expect: str = ""  # a fragment the error line must contain


def _write_pool(text: str) -> Callable[[NodePaths], object]:
    return lambda p: p.pool.write_text(text)


def _state_dir_is_a_file(p: NodePaths) -> None:
    p.pool.unlink()
    p.state.rmdir()
    p.state.write_text("not a directory\n")


CASES = [
    # Flags: usage errors, exit 2.
    Case("missing-node-name", ["--platform", "static", "--subnet", "10.88.0.0/24"], 2),
    Case("missing-subnet", ["--platform", "static", "--node-name", "a"], 2),
    Case("subnet-no-prefix", [*NODE[:4], "--subnet", "10.88.0.0"], 2, expect="--subnet"),
    Case("subnet-prefix-33", [*NODE[:4], "--subnet", "10.88.0.0/33"], 2),
    Case("subnet-ipv6", [*NODE[:4], "--subnet", "fd00::/64"], 2, expect="IPv4"),
    Case("subnet-too-small", [*NODE[:4], "--subnet", "10.88.0.0/31"], 2),
    Case("subnet-garbage", [*NODE[:4], "--subnet", "banana/24"], 2),
    Case("gateway-outside", [*NODE, "--gateway", "10.1.1.1"], 2, expect="not inside"),
    Case("gateway-network", [*NODE, "--gateway", "10.88.0.0"], 2),
    Case("gateway-broadcast", [*NODE, "--gateway", "10.88.0.255"], 2),
    Case("gateway-garbage", [*NODE, "--gateway", "gw"], 2),
    Case("pool-size-zero", [*NODE, "--pool-size", "0"], 2),
    Case("pool-size-negative", [*NODE, "--pool-size", "-5"], 2),
    Case("pool-size-too-big", [*NODE, "--pool-size", "300"], 2, expect="room for 253"),
    Case("pool-size-text", [*NODE, "--pool-size", "many"], 2),
    Case("dns-garbage", [*NODE, "--dns", "8.8.8.8,dns.google"], 2, expect="--dns"),
    Case("dns-ipv6", [*NODE, "--dns", "2001:4860:4860::8888"], 2),
    Case("drop-cidr-garbage", [*NODE, "--drop-cidr", "10.0.0.0/40"], 2, expect="--drop-cidr"),
    Case("drop-cidr-ipv6", [*NODE, "--drop-cidr", "fd00::/8"], 2),
    Case("vpc-cidr-garbage", [*NODE, "--vpc-cidr", "vpc"], 2),
    Case("node-name-uppercase", [*NODE[:2], "--node-name", "Bad_Name", *NODE[4:]], 2),
    Case("node-name-too-long", [*NODE[:2], "--node-name", "n" * 60, *NODE[4:]], 2),
    Case("platform-unknown", ["--platform", "azure", *NODE[2:]], 2, expect="azure"),
    Case("primary-nic-bad", [*NODE, "--primary-nic", "eth0/../x"], 2),
    Case("mtu-too-small", [*NODE, "--mtu", "100"], 2),
    Case("bridge-name-too-long", [*NODE, "--bridge", "a-very-long-bridge"], 2),
    Case("bridge-mac-multicast", [*NODE, "--bridge-mac", "01:00:5e:00:00:01"], 2),
    Case("unknown-flag", [*NODE, "--frobnicate"], 2),
    Case("lease-time-too-short", ["--lease-time", "5s"], 2, command="daemon"),
    Case("lease-time-garbage", ["--lease-time", "soon"], 2, command="daemon"),
    Case("read-interval-long", ["--read-interval", "60ms"], 2, command="daemon", expect="50ms"),
    Case("read-interval-bad", ["--read-interval", "fast"], 2, command="daemon", expect="--read"),
    # Checked before host setup and the DHCP socket, not when the metrics server starts.
    Case(
        "metrics-addr-no-port",
        ["--metrics-addr", "127.0.0.1"],
        2,
        command="daemon",
        expect="--metrics-addr",
    ),
    Case(
        "metrics-addr-not-an-ip",
        ["--metrics-addr", "nohost:9092"],
        2,
        command="daemon",
        expect="--metrics-addr",
    ),
    Case(
        "metrics-addr-port-range",
        ["--metrics-addr", ":70000"],
        2,
        command="daemon",
        expect="--metrics-addr",
    ),
    Case("log-level-env", NODE, 2, env={"COCOON_NET_LOG_LEVEL": "loud"}, expect="loud"),
    Case("log-format", [*NODE, "--log-format", "xml"], 2),
    # Files, locks and permissions: failures, exit 1.
    Case("pool-corrupt-status", [], 1, "status", prepare=_write_pool("{"), expect="corrupt"),
    Case("pool-corrupt-adopt", NODE, 1, prepare=_write_pool('{"ips": [1'), expect="pool.json"),
    Case("pool-corrupt-teardown", [], 1, "teardown", prepare=_write_pool("\0\0\0")),
    Case("pool-not-object", [], 1, "status", prepare=_write_pool("[]"), expect="JSON object"),
    Case(
        "pool-ips-outside-subnet",
        [],
        1,
        "daemon",
        prepare=_write_pool(json.dumps({**GOOD_POOL, "ips": ["192.168.9.9"]})),
        expect="192.168.9.9",
    ),
    Case(
        "pool-unknown-platform",
        [],
        1,
        "teardown",
        prepare=_write_pool(json.dumps({**GOOD_POOL, "platform": "azure"})),
    ),
    Case("pool-other-node", NODE, 1, expect="belongs to node"),
    Case("state-dir-is-a-file", NODE, 1, prepare=_state_dir_is_a_file),
    Case("no-permission", NODE, 1, user=65534),
]


@pytest.mark.netns
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_changes_nothing(
    case: Case, make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = make_netns("bad")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.ip("link", "set", "eth0", "up")
    paths = NodePaths(tmp_path)
    paths.state.mkdir(mode=0o750)
    paths.pool.write_text(json.dumps(GOOD_POOL, indent=2))
    if case.prepare is not None:
        case.prepare(paths)
    os.chmod(tmp_path, 0o755)  # the unprivileged case must reach our code, not fail in Python
    files_before = tree_digest(tmp_path)
    kernel_before = kernel_snapshot(ns)

    proc = cocoon(
        *run_args(paths, case.command, *case.argv, netns=ns.name), env=case.env, user=case.user
    )

    assert proc.returncode == case.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cocoon-net"), lines[0]
    assert case.expect in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert tree_digest(tmp_path) == files_before
    assert kernel_snapshot(ns) == kernel_before


@pytest.mark.netns
def test_held_lock_names_the_holder(make_netns: Callable[[str], Netns], tmp_path: Path) -> None:
    ns = make_netns("lock")
    paths = NodePaths(tmp_path)
    paths.run.mkdir()
    lock = paths.run / "cocoon-net.lock"
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("4242 init\n")  # another init: refused at once
        fh.flush()
        files_before = tree_digest(tmp_path)
        kernel_before = kernel_snapshot(ns)
        proc = cocoon(*run_args(paths, "adopt", *NODE, netns=ns.name))
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1
        assert "pid 4242, init" in proc.stderr
        assert tree_digest(tmp_path) == files_before
        assert kernel_snapshot(ns) == kernel_before


def test_missing_netns_is_a_usage_error(tmp_path: Path) -> None:
    proc = cocoon(*run_args(NodePaths(tmp_path), "status", netns="cnt-does-not-exist"))
    assert proc.returncode == 2
    assert "not found" in proc.stderr
    assert proc.stderr.count("\n") == 1
