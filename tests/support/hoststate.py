"""The network state of the namespace the test run lives in, to compare before and after.

Links, addresses, routes (every table, IPv4 and IPv6), policy rules and the firewall
(iptables and ip6tables, nftables): all a test could leave behind by touching the host
instead of a namespace of its own. Counters and other values the kernel changes by itself
are left out. Other network namespaces are not part of it: creating them is how tests stay
off the host. The comparison assumes no other test run shares the host at the same time.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess

_COMMANDS: dict[str, list[str]] = {
    "links": ["ip", "-o", "-d", "link", "show"],
    "addresses": ["ip", "-o", "addr", "show"],
    "routes": ["ip", "route", "show", "table", "all"],
    "routes6": ["ip", "-6", "route", "show", "table", "all"],
    "rules": ["ip", "rule", "show"],
    "rules6": ["ip", "-6", "rule", "show"],
}
_ROOT_COMMANDS: dict[str, list[str]] = {
    "iptables": ["iptables-save"],
    "ip6tables": ["ip6tables-save"],
    "nftables": ["nft", "list", "ruleset"],
}
_VOLATILE = [
    re.compile(r"\[\d+:\d+\]"),  # iptables-save chain counters
    re.compile(r"counter packets \d+ bytes \d+"),  # nft rule counters
    re.compile(r"^# .*$", re.M),  # iptables-save time stamps
    re.compile(r"(valid_lft|preferred_lft) \S+"),  # address lifetimes count down
    re.compile(r"expires \d+sec"),  # IPv6 routes learnt from router advertisements
]


def _read(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return f"({argv[0]} not installed)"
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    text = done.stdout if done.returncode == 0 else f"(exit {done.returncode}) {done.stderr}"
    for pattern in _VOLATILE:
        text = pattern.sub("", text)
    return text


def snapshot() -> dict[str, str]:
    commands = dict(_COMMANDS)
    if os.geteuid() == 0:
        commands |= _ROOT_COMMANDS
    return {name: _read(argv) for name, argv in commands.items()}


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Unified diffs of every part that changed; empty when nothing did."""
    out: list[str] = []
    for name, was in before.items():
        if was != after.get(name):
            out += difflib.unified_diff(
                was.splitlines(),
                after.get(name, "").splitlines(),
                f"{name} before the run",
                f"{name} after the run",
                lineterm="",
            )
    return out
