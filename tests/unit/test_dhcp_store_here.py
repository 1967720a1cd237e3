"""Commits written in the caller's thread (LeaseStore.commit_here): on disk before it returns,
only while the journal writer is idle with nothing queued, so the journal keeps one writer at
a time and the commit order; a failure fails the store for good; the writer still folds what
was written here into leases.json and compacts the journal."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon_net.dhcp.leasefile import Record
from cocoon_net.dhcp.store import LeaseStore, Role, load, role_path
from cocoon_net.errors import StateError
from tests.unit.test_dhcp_store import (
    Clock,
    caught_up,
    go_view,
    idle,
    ips,
    journal_records,
    lease,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "leases.json"


@pytest.fixture
def store(path: Path) -> Iterator[LeaseStore]:
    s = LeaseStore(path, monotonic=Clock())
    s.open()
    idle(s)
    yield s
    s.close()


def test_a_commit_here_is_written_and_fdatasynced_in_the_callers_thread(
    path: Path, store: LeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, bytes]] = []  # (thread, the journal as it was at the fdatasync)
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        journal = Path(os.readlink(f"/proc/self/fd/{fd}")).read_bytes()
        synced.append((threading.current_thread().name, journal))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert store.commit_here([Record.grant(lease(1)), Record.grant(lease(2))])
    assert len(synced) == 1 and synced[0][0] == threading.current_thread().name
    assert b'"ip":"10.0.0.1"' in synced[0][1] and b'"ip":"10.0.0.2"' in synced[0][1]
    stats = store.stats()
    assert (stats.batches, stats.records, stats.last_batch) == (1, 2, 2)
    assert store.commit_here([])  # nothing to write: done at once
    assert len(synced) == 1
    store.close(compact=False)  # as after a crash: the journal holds both
    assert ips(load(path)) == {lease(1).mac: "10.0.0.1", lease(2).mac: "10.0.0.2"}


def test_a_commit_here_waits_its_turn_behind_the_writer(
    path: Path, store: LeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer works on a batch, commit_here writes nothing and says so; what is
    then handed to the writer goes to the journal after the batch before it."""
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def held(fd: int) -> None:
        entered.set()
        assert release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    journal = role_path(path, Role.JOURNAL)

    async def run() -> None:
        first = store.submit([Record.grant(lease(1))])
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        before = journal.read_bytes()
        assert not store.commit_here([Record.grant(lease(2))])
        assert journal.read_bytes() == before  # nothing written
        second = store.submit([Record.grant(lease(2))])
        assert not store.commit_here([Record.grant(lease(3))])  # queued work: still no
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)

    asyncio.run(run())
    lines = journal_records(path).splitlines()
    assert [b'"ip":"10.0.0.1"' in lines[0], b'"ip":"10.0.0.2"' in lines[1]] == [True, True]
    assert len(lines) == 2


def test_a_failed_commit_here_fails_the_store_for_good(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[str] = []
    s = LeaseStore(path, on_failure=failures.append)
    s.open()
    idle(s)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    journal = role_path(path, Role.JOURNAL)
    try:
        with pytest.raises(StateError) as info:
            s.commit_here([Record.grant(lease(1))])
        assert str(info.value) == f"lease journal {journal}: Input/output error"
        assert failures == [str(info.value)] and s.stats().failed
        with pytest.raises(StateError, match="Input/output error"):
            s.commit_here([Record.grant(lease(2))])
        with pytest.raises(StateError, match="Input/output error"):
            asyncio.run(s.commit([Record.grant(lease(2))]))
        thread = s._thread
        assert thread is not None
        thread.join(10)  # the writer stops: it must not touch the journal after this
        assert not thread.is_alive()
    finally:
        s.close()


def test_a_crash_in_a_commit_here_fails_the_store(
    path: Path, store: LeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(fd: int) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(os, "fdatasync", crash)
    with pytest.raises(StateError) as info:
        store.commit_here([Record.grant(lease(1))])
    assert str(info.value) == "lease journal write crashed: RuntimeError('boom')"
    assert store.stats().failed


def test_what_is_written_here_reaches_leases_json_through_the_write_behind(path: Path) -> None:
    s = LeaseStore(path, snapshot_lag=0.05)
    s.open()
    try:
        idle(s)
        assert s.commit_here([Record.grant(lease(1))])
        caught_up(path, s)  # the writer, idle throughout, was told to fold it in
        assert go_view(path) == {lease(1).mac: "10.0.0.1"}
    finally:
        s.close()


def test_a_journal_grown_here_is_compacted(path: Path) -> None:
    s = LeaseStore(path, monotonic=Clock(), max_journal_records=3)
    s.open()
    try:
        for n in range(1, 5):
            idle(s)
            assert s.commit_here([Record.grant(lease(n))])
        deadline = time.monotonic() + 20
        while s.stats().compactions < 2:  # the one at open, and the one of the size trigger
            assert time.monotonic() < deadline, "never compacted"
            time.sleep(0.005)
        assert {lease(n).mac for n in (1, 2, 3)} <= set(go_view(path))
    finally:
        s.close(compact=False)
    assert ips(load(path)) == {lease(n).mac: f"10.0.0.{n}" for n in range(1, 5)}


def test_a_close_asked_during_a_commit_here_is_carried_out_after_it(
    path: Path, store: LeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer woken while commit_here holds its place waits, and is woken again after."""
    real = os.fdatasync
    closer = threading.Thread(target=store.close)

    def fdatasync(fd: int) -> None:
        closer.start()
        deadline = time.monotonic() + 10
        while not store._wake:  # the writer saw the close and waits for this write
            assert time.monotonic() < deadline, "the writer was not woken"
            time.sleep(0.001)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert store.commit_here([Record.grant(lease(1))])
    monkeypatch.setattr(os, "fdatasync", real)
    closer.join(10)
    assert not closer.is_alive(), "close() never finished"
    assert ips(load(path)) == {lease(1).mac: "10.0.0.1"}


def test_a_commit_here_on_a_store_not_open_is_refused(path: Path) -> None:
    s = LeaseStore(path)
    with pytest.raises(StateError, match=r"lease store .*leases\.json is not open"):
        s.commit_here([Record.grant(lease(1))])
    assert not role_path(path, Role.JOURNAL).exists()


def test_a_second_commit_here_declines_while_the_first_holds_the_writers_place(
    path: Path, store: LeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer still sits idle while a commit_here writes: the place it holds, not the
    writer's state, keeps a second caller from writing alongside."""
    real = os.fdatasync
    journal = role_path(path, Role.JOURNAL)
    answers: list[tuple[bool, bytes, bytes]] = []  # (accepted, journal before, after)

    def second() -> None:
        before = journal.read_bytes()
        accepted = store.commit_here([Record.grant(lease(2))])
        answers.append((accepted, before, journal.read_bytes()))

    def fdatasync(fd: int) -> None:
        if not answers:
            other = threading.Thread(target=second)
            other.start()
            other.join(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert store.commit_here([Record.grant(lease(1))])
    assert len(answers) == 1
    accepted, before, after = answers[0]
    assert not accepted and after == before
    store.close(compact=False)
    assert ips(load(path)) == {lease(1).mac: "10.0.0.1"}


def test_a_commit_here_starts_no_compaction_before_one_is_due(path: Path) -> None:
    """With the write-behind's lag not run out and the journal small, what is written here
    stays in the journal only; leases.json is still the one written at open."""
    s = LeaseStore(path, monotonic=Clock())
    s.open()
    idle(s)
    assert s.commit_here([Record.grant(lease(1))])
    s.close(compact=False)  # waits for any snapshot under way
    assert go_view(path) == {}
    assert s.stats().compactions == 1  # the one at open
    assert ips(load(path)) == {lease(1).mac: "10.0.0.1"}


def test_a_commit_here_reports_its_fdatasync_time(path: Path) -> None:
    took: list[float] = []
    s = LeaseStore(path, monotonic=Clock(), observe_fsync=took.append)
    s.open()
    try:
        idle(s)
        assert s.commit_here([Record.grant(lease(1))])
        assert len(took) == 1 and isinstance(took[0], float) and 0 <= took[0] < 60
    finally:
        s.close()


class CountedCondition(threading.Condition):
    """The store's condition, counting the waits of the writer thread."""

    def __init__(self) -> None:
        super().__init__()
        self.writer_waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name == "lease-journal":
            self.writer_waits += 1
        return super().wait(timeout)


def test_a_writer_woken_for_nothing_during_a_commit_here_is_not_woken_again_after_it(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise back-to-back commits here keep waking an idle writer, one wake-up each."""
    s = LeaseStore(path, monotonic=Clock())
    cond = s._cond = CountedCondition()
    s.open()
    idle(s)
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        waits = cond.writer_waits
        with cond:
            cond.notify()  # a wake-up with no work behind it
        deadline = time.monotonic() + 10
        while cond.writer_waits == waits:  # the writer looked and went back to its wait
            assert time.monotonic() < deadline, "the writer never waited again"
            time.sleep(0.001)
        woken.append(s._wake)  # whether it asked to be woken after this write
        real(fd)

    woken: list[bool] = []
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        assert s.commit_here([Record.grant(lease(1))])
        assert woken == [False]
    finally:
        monkeypatch.setattr(os, "fdatasync", real)
        s.close()
    assert ips(load(path)) == {lease(1).mac: "10.0.0.1"}
