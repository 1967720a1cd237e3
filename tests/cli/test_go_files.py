"""Every command reads the Go tool's pool.json and leases.json as they are.

Its pool.json has none of our keys (lease file, conflist, bridge, MTU, firewall and host
records, cloud records) and may have `"ips": null`; each missing key means the default,
taken from the flags, never an empty path. The daemon on such a node is covered by
tests/netns/test_upgrade_from_go.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import NodePaths, cocoon, run_args
from tests.support.netns import Netns

pytestmark = pytest.mark.netns

# As the Go tool's `init --platform volcengine` writes it: no trailing newline, keys in order.
GO_POOL: dict[str, Any] = {
    "platform": "volcengine",
    "nodeName": "go-node",
    "subnet": "172.20.100.0/24",
    "gateway": "172.20.100.1",
    "primaryNIC": "eth0",
    "secondaryNICs": [f"eth{i}" for i in range(1, 8)],
    "ips": ["172.20.100.5", "172.20.100.6", "172.20.100.7"],
    "dnsServers": ["8.8.8.8", "1.1.1.1"],
    "updatedAt": "2026-04-05T06:00:00.123456789Z",
}
MAC = "02:cc:00:00:00:01"


def write_go_files(paths: NodePaths, pool: dict[str, Any]) -> None:
    paths.state.mkdir(parents=True)
    paths.pool.write_text(json.dumps(pool, indent=2))
    # expiry in the Go daemon's local zone, here UTC+8, second precision
    local = timezone(timedelta(hours=8))
    expiry = (datetime.now(local) + timedelta(hours=20)).strftime("%Y-%m-%dT%H:%M:%S+08:00")
    leases = [{"mac": MAC, "ip": "172.20.100.6", "expiry": expiry}]
    (paths.state / "leases.json").write_text(json.dumps(leases, indent=2))


def _ok(*argv: str) -> str:
    proc = cocoon(*argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_status_dry_runs_read_go_files_and_change_nothing(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = make_netns("go")
    paths = NodePaths(tmp_path)
    write_go_files(paths, GO_POOL)
    before = {p: p.read_bytes() for p in paths.state.iterdir()}

    status = _ok(*run_args(paths, "status", "--no-cloud", netns=ns.name))
    assert "Platform:   volcengine" in status
    assert "IPs:        3" in status
    assert "Bridge:     cni0" in status
    assert f"  172.20.100.6    {MAC}" in status
    doc = json.loads(_ok(*run_args(paths, "status", "--json", "--no-cloud", netns=ns.name)))
    assert doc["leases"]["source"] == f"{paths.state / 'leases.json'} (daemon not running)"

    init = ["--platform", "volcengine", "--node-name", "go-node", "--subnet", "172.20.100.0/24"]
    for command in ("init", "adopt"):
        dry = _ok(*run_args(paths, command, *init, "--dry-run", netns=ns.name))
        assert f"  {paths.cni / '30-cocoon-dhcp.conflist'}" in dry

    dry = _ok(*run_args(paths, "teardown", "--dry-run", netns=ns.name))
    assert f"remove {paths.state / 'leases.json'}" in dry
    assert f"remove {paths.pool}" in dry
    assert {p: p.read_bytes() for p in paths.state.iterdir()} == before
    assert not paths.cni.exists()


def test_a_null_pool_is_an_empty_pool(make_netns: Callable[[str], Netns], tmp_path: Path) -> None:
    ns = make_netns("go")
    paths = NodePaths(tmp_path)
    write_go_files(paths, {**GO_POOL, "ips": None})
    status = _ok(*run_args(paths, "status", "--no-cloud", netns=ns.name))
    assert "IPs:        0" in status
