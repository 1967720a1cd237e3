"""--help of the root and every subcommand: complete (every flag of the spec) and accurate."""

from __future__ import annotations

import pytest

from tests.support.cli import cocoon

# Spec §1: every flag the Go tool had, per command, plus the ones we added.
FLAGS = {
    "init": [
        "--platform", "--node-name", "--subnet", "--pool-size", "--gateway", "--primary-nic",
        "--dns", "--state-dir", "--dry-run", "--drop-internal-access", "--drop-cidr",
        "--vpc-cidr", "--mtu", "--bridge", "--lease-file", "--cni-conf-dir", "--run-dir",
        "--netns", "--log-format", "--log-level",
    ],
    "adopt": ["--manage-iptables", "--node-name", "--subnet", "--pool-size", "--dry-run"],
    "daemon": [
        "--state-dir", "--lease-file", "--skip-iptables", "--metrics-addr", "--lease-time",
        "--cni-conf-dir", "--run-dir", "--read-interval",
    ],
    "status": ["--state-dir", "--json", "--no-cloud"],
    "teardown": ["--state-dir", "--dry-run", "--cni-conf-dir", "--run-dir"],
}  # fmt: skip


def test_root_help_lists_every_command() -> None:
    proc = cocoon("--help")
    assert proc.returncode == 0, proc.stderr
    for command in FLAGS:
        assert command in proc.stdout
    assert "COCOON_NET_NETNS" in proc.stdout


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_subcommand_help_is_complete(command: str) -> None:
    proc = cocoon(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for flag in FLAGS[command]:
        assert flag in proc.stdout, f"{command} --help does not mention {flag}"


def test_defaults_in_help_match_the_spec() -> None:
    init = cocoon("init", "--help").stdout
    adopt = cocoon("adopt", "--help").stdout
    daemon = cocoon("daemon", "--help").stdout
    assert "default 140" in init
    assert "default 253" in adopt
    assert "8.8.8.8,1.1.1.1" in init
    assert "/var/lib/cocoon/net" in init
    assert ":9092" in daemon
    assert "24h" in daemon


def test_version() -> None:
    proc = cocoon("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("cocoon-net version ")
