"""The two locks that keep init, adopt, teardown and the daemon from racing.

- The state lock (<run-dir>/cocoon-net.lock) guards pool.json and the host setup it records.
  init, adopt and teardown hold it for their whole run; the daemon only while it reads the
  pool at start-up and while it (re)applies host setup, which writes pool.json.
- The daemon lock (<run-dir>/cocoon-net.daemon.lock) is held by the daemon for its whole
  life: a second daemon fails at once, and init, adopt and teardown look at it to learn
  whether a daemon runs (and which) without taking it.

flock(2): the kernel drops a lock when its holder exits, however it exits, so a crash never
leaves a stale lock (a PID file can). The holder writes its PID and command into the file so
others can name it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from cocoon_net.errors import HostSetupError, LockHeldError

log = logging.getLogger("cocoon_net.lock")

POLL_SECONDS = 0.1


class StateLock:
    """An exclusive flock on path. A holder whose command is `wait_for` (or anyone, when
    wait_for is None) is waited for up to `wait` seconds; then LockHeldError names it."""

    def __init__(
        self, path: Path, command: str, *, wait: float = 0.0, wait_for: str | None = None
    ) -> None:
        self.path = path
        self.command = command
        self.wait = wait
        self.wait_for = wait_for
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        fd = _open(self.path)
        deadline = time.monotonic() + self.wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                patient = self.wait_for is None or holder.command == self.wait_for
                if not patient or time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockHeldError(
                        f"another cocoon-net is running ({holder}) and holds {self.path}; "
                        "wait for it to finish or stop it"
                    ) from None
                if not told:
                    log.info("waiting for %s to release %s", holder, self.path)
                    told = True
                time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Holder:
    """Who holds a lock, as its holder wrote it: 'PID COMMAND'."""

    def __init__(self, text: str) -> None:
        pid, _, command = text.strip().partition(" ")
        self.pid = int(pid) if pid.isdigit() else None
        self.command = command

    def __str__(self) -> str:
        if self.pid is None:
            return "pid unknown"
        return f"pid {self.pid}, {self.command}" if self.command else f"pid {self.pid}"


def holder(path: Path) -> Holder | None:
    """Who holds the lock at path now, or None when nobody does. Never takes it for longer
    than the probe: a process starting at the same moment may find it busy for that instant,
    which is why waiters poll."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostSetupError(f"cannot open lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)  # drops the probe's shared lock, if it got one


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostSetupError(f"cannot open lock {path}: {exc.strerror}") from None


def _read_holder(fd: int) -> Holder:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace")
    except OSError:
        text = ""
    return Holder(text)
