"""Running the real `cocoon-net` command in a subprocess, with private paths."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import Netns


@dataclass(frozen=True)
class NodePaths:
    """Private state, run and CNI directories of one test (never the host's)."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def cni(self) -> Path:
        return self.root / "cni"

    @property
    def pool(self) -> Path:
        return self.state / "pool.json"

    def flags(self, command: str) -> list[str]:
        """The path flags the given subcommand accepts."""
        out = ["--state-dir", str(self.state), "--run-dir", str(self.run)]
        if command in ("init", "adopt", "daemon", "teardown"):
            out += ["--cni-conf-dir", str(self.cni)]
        return out


def cocoon(
    *argv: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    user: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m cocoon_net ARGV` and capture its output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_NET_")}
    full_env.update(env or {})
    prefix: list[str] = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "cocoon_net", *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its content (and every directory)."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel + "/"] = "dir"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def kernel_snapshot(ns: Netns) -> dict[str, str]:
    """What a test compares before and after: links, addresses, routes, firewall, sysctls."""
    # Bridge timers count down on their own; everything else in `ip -d link` is state we own.
    links = re.sub(r"\b\w+_timer\s+\S+", "", ns.ip("-d", "link", "show"))
    return {
        "links": links,
        "addrs": ns.ip("addr", "show"),
        "routes": ns.ip("route", "show", "table", "all"),
        "iptables": ns.iptables_save(),
        "ip_forward": ns.sysctl("net.ipv4.ip_forward"),
        "rp_filter_all": ns.sysctl("net.ipv4.conf.all.rp_filter"),
        "rp_filter_default": ns.sysctl("net.ipv4.conf.default.rp_filter"),
    }


def torn_down(before: dict[str, str]) -> dict[str, str]:
    """kernel_snapshot after teardown of a node that was as in before: the same, except
    that teardown leaves forwarding on (and says so)."""
    return {**before, "ip_forward": "1"}


def run_args(paths: NodePaths, command: str, *extra: str, netns: str | None = None) -> list[str]:
    argv = [command, *paths.flags(command), *extra]
    if netns:
        argv = ["--netns", netns, *argv]
    return argv


__all__: Sequence[str] = (
    "NodePaths",
    "cocoon",
    "kernel_snapshot",
    "run_args",
    "torn_down",
    "tree_digest",
)
