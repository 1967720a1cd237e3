"""The state and daemon locks: who holds them, who is waited for, who is refused at once."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from cocoon_net import lock
from cocoon_net.errors import LockHeldError


def test_holder_names_the_process_that_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "run" / "cocoon-net.daemon.lock"
    assert lock.holder(path) is None  # no file: nobody
    with lock.StateLock(path, "daemon"):
        found = lock.holder(path)
        assert found is not None
        assert (found.pid, found.command) == (os.getpid(), "daemon")
        assert str(found) == f"pid {os.getpid()}, daemon"
    assert lock.holder(path) is None  # the file stays, the lock is gone


class _Told(logging.Handler):
    """Set once the lock says it waits: the holder then lets go."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting for"):
            self.waiting.set()


def test_a_second_init_is_refused_at_once_and_named(tmp_path: Path) -> None:
    path = tmp_path / "cocoon-net.lock"
    told = _Told()
    lock.log.addHandler(told)
    lock.log.setLevel(logging.INFO)
    try:
        with lock.StateLock(path, "init"):
            waiter = lock.StateLock(path, "adopt", wait=2, wait_for="daemon")
            with pytest.raises(LockHeldError, match=f"pid {os.getpid()}, init"):
                waiter.acquire()  # patience, but only for the daemon
        assert not told.waiting.is_set()
    finally:
        lock.log.removeHandler(told)


def test_the_daemons_brief_hold_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "cocoon-net.lock"
    daemon = lock.StateLock(path, "daemon").acquire()
    told = _Told()
    lock.log.addHandler(told)
    lock.log.setLevel(logging.INFO)

    def release_once_waited_for() -> None:
        told.waiting.wait(30)
        daemon.release()

    thread = threading.Thread(target=release_once_waited_for)
    thread.start()
    try:
        with lock.StateLock(path, "init", wait=60, wait_for="daemon"):
            found = lock.holder(path)
            assert found is not None and found.command == "init"
        assert told.waiting.is_set()
    finally:
        daemon.release()
        thread.join()
        lock.log.removeHandler(told)


def test_no_wait_means_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "cocoon-net.lock"
    with lock.StateLock(path, "daemon"), pytest.raises(LockHeldError, match="daemon"):
        lock.StateLock(path, "teardown").acquire()
