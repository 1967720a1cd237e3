"""Moving this process into an existing network namespace (the global --netns option).

The switch happens once, at start-up, before any thread or socket exists: threads and child
processes created afterwards inherit the namespace, sockets opened afterwards live in it, and
/proc/sys/net/* opened afterwards shows its sysctls. Python 3.11 has no os.setns, so libc's
setns(2) is called through ctypes.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from cocoon_net.errors import HostSetupError, UsageError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


def enter(name: str) -> None:
    """Join the network namespace `ip netns add NAME` created."""
    if not name or "/" in name or name in {".", ".."}:
        raise UsageError(f"invalid --netns {name!r}: expected a name from 'ip netns list'")
    path = NETNS_RUN_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"network namespace {name!r} not found (see 'ip netns list')") from None
    except OSError as exc:
        raise HostSetupError(f"open {path}: {exc.strerror}") from exc
    try:
        # The running interpreter already links libc: no library search (find_library
        # would run ldconfig, tens of milliseconds on every command).
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise HostSetupError(f"enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)
