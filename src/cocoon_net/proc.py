"""Running the host's own tools (ip, iptables, iptables-restore, sysctl readers).

One place turns a failed command into a one-line HostSetupError naming the command and what it
printed, so callers never parse CalledProcessError themselves.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from cocoon_net.errors import HostSetupError

TIMEOUT = 60  # seconds a host tool may take before it counts as hung


def run(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[str]:
    """Run argv and return the result; raise HostSetupError unless its exit code is in ok_codes."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=TIMEOUT
        )
    except FileNotFoundError as exc:
        raise HostSetupError(f"{argv[0]}: command not found (install it first)") from exc
    except subprocess.TimeoutExpired as exc:
        raise _timed_out(argv) from exc
    return _checked(argv, proc, ok_codes)


def run_unless(
    argv: Sequence[str], outdated: Callable[[], bool], poll: float
) -> subprocess.CompletedProcess[str] | None:
    """Run argv like run(), asking outdated() every `poll` seconds while it runs: once that
    says its answer would come too late to be used, it is killed and None returned. A child
    still running after run()'s timeout is killed too, and that is an error, as in run()."""
    try:
        child = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except FileNotFoundError as exc:
        raise HostSetupError(f"{argv[0]}: command not found (install it first)") from exc
    deadline = time.monotonic() + TIMEOUT
    with child:
        while True:
            try:
                out, err = child.communicate(timeout=poll)  # keeps reading what it prints
            except subprocess.TimeoutExpired:
                hung = time.monotonic() >= deadline
                if hung or outdated():
                    child.kill()
                    child.communicate()
                    if hung:
                        raise _timed_out(argv) from None
                    return None
            else:
                break
    return _checked(argv, subprocess.CompletedProcess(argv, child.returncode, out, err), (0,))


def _timed_out(argv: Sequence[str]) -> HostSetupError:
    return HostSetupError(f"{' '.join(argv)}: timed out after {TIMEOUT} s")


def _checked(
    argv: Sequence[str], proc: subprocess.CompletedProcess[str], ok_codes: Sequence[int]
) -> subprocess.CompletedProcess[str]:
    if proc.returncode not in ok_codes:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit status {proc.returncode}"
        raise HostSetupError(f"{' '.join(argv)}: {reason}")
    return proc


def run_json(argv: Sequence[str]) -> Any:
    """Run a command that prints JSON (`ip -json ...`) and decode its output."""
    out = run(argv).stdout.strip()
    if not out:
        return []
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise HostSetupError(f"{' '.join(argv)}: unreadable JSON output") from exc
