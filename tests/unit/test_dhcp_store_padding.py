"""The journal kept extended with zeros ahead of its next record: records go over zeros already
on disk, the zeros grow a chunk at a time, a restart resumes at the end of the records (a
record torn before the zeros is cut), a rotated journal gets zeros of its own, and a disk
short of space makes the journal grow as it did without them, never fail a commit."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.dhcp.leasefile import Record, encode_record
from cocoon_net.dhcp.store import PAD_RESERVE, LeaseStore, Role, load, role_path
from cocoon_net.errors import StateError
from tests.unit.test_dhcp_store import Clock, caught_up, idle, ips, journal_records, lease

CHUNK = 4096


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "leases.json"


def padded_store(path: Path, **kw: Any) -> LeaseStore:
    s = LeaseStore(path, monotonic=Clock(), journal_chunk=CHUNK, **kw)
    s.open()
    idle(s)  # it writes the first zeros before it waits for commits
    return s


def grant(s: LeaseStore, *ns: int) -> None:
    asyncio.run(s.commit([Record.grant(lease(n)) for n in ns]))


def journal_size(path: Path) -> int:
    return role_path(path, Role.JOURNAL).stat().st_size


def seqs(path: Path) -> list[int]:
    return [int(line.split(b",")[0].removeprefix(b'{"seq":')) for line in lines(path)]


def restarts_with(path: Path, ns: Iterable[int]) -> None:
    """A start on these files finds exactly the leases ns, no line corrupt or torn."""
    got = load(path)
    assert ips(got) == {lease(n).mac: str(lease(n).ip) for n in ns}
    assert (got.report.journal.corrupt, got.report.journal.torn_tail) == (0, False)


def lines(path: Path) -> list[bytes]:
    return journal_records(path).splitlines()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """(offset, length, journal size before) of every record written to a journal. Zeros
    are written 1000 bytes at a time, as short writes may be."""
    seen: list[tuple[int, int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if bytes(data[:1]) == b"\0":
            return real(fd, data[:1000], offset)
        if bytes(data[:1]) == b"{" and os.readlink(f"/proc/self/fd/{fd}").endswith(".journal"):
            seen.append((offset, len(data), os.fstat(fd).st_size))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    yield seen


@pytest.fixture
def pads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The journal's size after each fsync of it (the records' syncs are fdatasyncs)."""
    sizes: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".journal"):
            sizes.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    return sizes


def free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The journal's filesystem reports `free` bytes available."""
    real = os.fstatvfs

    def fstatvfs(fd: int) -> os.statvfs_result:
        got = real(fd)
        fields = list(got)
        fields[4] = free // got.f_frsize  # f_bavail
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "fstatvfs", fstatvfs)


def test_records_go_over_zeros_that_grow_a_chunk_at_a_time(
    path: Path, writes: list[tuple[int, int, int]], pads: list[int]
) -> None:
    s = padded_store(path)
    try:
        assert journal_size(path) == CHUNK and journal_records(path) == b""
        for n in range(1, 121):  # some 11 KB of records: the zeros are extended twice over
            grant(s, n)
    finally:
        s.close(compact=False)  # as after a crash: the zeros stay
    # Once per three quarters of a chunk of records, not once per batch.
    assert 4 <= len(pads) <= 6 and pads == sorted(set(pads)), pads
    assert len(writes) == 120
    assert all(offset + length <= size for offset, length, size in writes), writes
    end = len(journal_records(path))
    assert [offset for offset, _, _ in writes] == [
        sum(length for _, length, _ in writes[:i]) for i in range(120)
    ]
    size = journal_size(path)
    assert size % CHUNK == 0 and end + CHUNK // 4 <= size <= end + CHUNK + 4096
    assert seqs(path) == list(range(1, 121))
    restarts_with(path, range(1, 121))


def test_zeros_used_up_by_commits_here_are_extended_by_the_writer(
    path: Path, writes: list[tuple[int, int, int]]
) -> None:
    s = padded_store(path, snapshot_lag=60.0)  # the writer's own deadline is a minute away
    try:
        for n in range(1, 80):  # some 7 KB
            idle(s)
            assert s.commit_here([Record.grant(lease(n))])
            deadline = time.monotonic() + 10
            while s._padding_due():  # the write here woke the writer to extend them
                assert time.monotonic() < deadline, "the zeros were never extended"
                time.sleep(0.001)
    finally:
        s.close(compact=False)
    assert all(offset + length <= size for offset, length, size in writes), writes
    restarts_with(path, range(1, 80))


def test_a_restart_after_a_crash_resumes_at_the_end_of_the_records(
    path: Path, writes: list[tuple[int, int, int]]
) -> None:
    s = padded_store(path)
    grant(s, 1, 2)
    grant(s, 3)
    s.close(compact=False)
    assert journal_size(path) > len(journal_records(path))  # zeros after the records
    s = padded_store(path)
    writes.clear()
    try:
        for n in range(4, 80):  # past the zeros found at the start: they are extended
            grant(s, n)
    finally:
        s.close(compact=False)
    assert all(offset + length <= size for offset, length, size in writes), writes
    assert seqs(path) == list(range(1, 80))  # none lost, none written twice
    restarts_with(path, range(1, 80))


def test_a_record_torn_before_the_zeros_is_cut_and_leaves_no_trace(path: Path) -> None:
    s = padded_store(path)
    grant(s, 1, 2)
    s.close(compact=False)
    end = len(journal_records(path))
    long = Record.grant(lease(3)).lease()
    cut = encode_record(Record(Record.grant(long).op, long.ip, long.mac, 1.0, "h" * 200), 3)
    torn = bytearray(cut[:180])
    torn[40:80] = bytes(40)  # a page of it that never reached the disk
    with open(role_path(path, Role.JOURNAL), "r+b") as fh:
        fh.seek(end)
        fh.write(torn)
    s = LeaseStore(path, monotonic=Clock(), journal_chunk=CHUNK)
    assert s.open().report.journal.torn_tail
    try:
        idle(s)
        grant(s, 4)  # shorter than the fragment: none of it may outlive this record
    finally:
        s.close(compact=False)
    assert seqs(path) == [1, 2, 3]  # the torn record had seq 3, never acknowledged
    restarts_with(path, (1, 2, 4))
    assert journal_size(path) > len(journal_records(path))  # padded again


def test_a_rotated_journal_gets_zeros_of_its_own(
    path: Path, writes: list[tuple[int, int, int]]
) -> None:
    s = LeaseStore(path, snapshot_lag=0.05, journal_chunk=CHUNK)
    s.open()
    try:
        before = role_path(path, Role.JOURNAL).stat().st_ino
        grant(s, 1, 2)
        s.resume_write_behind()
        caught_up(path, s)  # folded into leases.json: the journal was replaced
        idle(s)
        assert role_path(path, Role.JOURNAL).stat().st_ino != before
        assert journal_size(path) >= CHUNK and journal_records(path) == b""
        writes.clear()
        grant(s, 3)
        assert writes and all(offset + n <= size for offset, n, size in writes), writes
        assert writes[0][0] == 0
    finally:
        s.close(compact=False)
    restarts_with(path, (1, 2, 3))


def test_a_journal_of_zeros_only_counts_as_empty_at_open(path: Path) -> None:
    s = padded_store(path)
    s.close(compact=False)
    assert journal_size(path) == CHUNK
    got = load(path)
    assert got.report.current  # nothing to fold in: leases.json is not rewritten at open
    assert (got.report.journal.records, got.report.journal.torn_tail) == (0, False)


def test_with_too_little_free_space_the_journal_grows_without_zeros(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    free_space(monkeypatch, PAD_RESERVE + CHUNK - 4096)
    caplog.set_level(logging.WARNING, "cocoon_net.dhcp.store")
    s = padded_store(path)
    try:
        for n in range(1, 80):
            grant(s, n)
            assert journal_size(path) == len(journal_records(path))
    finally:
        s.close(compact=False)
    assert seqs(path) == list(range(1, 80))
    unpadded = [r.getMessage() for r in caplog.records if "store.journal.unpadded" in r.msg]
    assert len(unpadded) == 1  # logged once, not per try
    assert ": less free space than the reserve;" in unpadded[0]


def test_with_the_reserve_and_a_chunk_free_the_zeros_are_written(
    path: Path, monkeypatch: pytest.MonkeyPatch, writes: list[tuple[int, int, int]]
) -> None:
    free_space(monkeypatch, PAD_RESERVE + CHUNK)  # each extension is one chunk: just enough
    s = padded_store(path)
    try:
        for n in range(1, 80):
            grant(s, n)
    finally:
        s.close(compact=False)
    assert all(offset + length <= size for offset, length, size in writes), writes
    restarts_with(path, range(1, 80))


def test_a_disk_full_while_writing_zeros_fails_no_commit(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The zeros written before the disk filled up are padding; records go past them. The
    first failure after zeros were written is logged, and only that one."""
    real = os.pwrite
    room = [CHUNK + 1000]  # the zeros at open fit, then part of the next ones

    def full(fd: int, data: Any, offset: int) -> int:
        if bytes(data[:1]) == b"\0":
            if room[0]:
                written = real(fd, data[: room[0]], offset)
                room[0] -= written
                return written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    caplog.set_level(logging.WARNING, "cocoon_net.dhcp.store")
    s = padded_store(path)
    try:
        assert journal_size(path) == CHUNK
        for n in range(1, 80):  # some 7 KB: over the zeros, then past them
            grant(s, n)
        assert not s.stats().failed
    finally:
        s.close(compact=False)
    assert seqs(path) == list(range(1, 80))
    assert journal_size(path) == len(journal_records(path))
    restarts_with(path, range(1, 80))
    unpadded = [r for r in caplog.records if "store.journal.unpadded" in r.getMessage()]
    assert len(unpadded) == 1 and "No space left on device" in unpadded[0].getMessage()


def test_an_io_error_writing_zeros_fails_the_store(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = padded_store(path)
    real = os.pwrite

    def eio(fd: int, data: Any, offset: int) -> int:
        if bytes(data[:1]) == b"\0":
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", eio)
    acked: list[int] = []
    try:
        with pytest.raises(StateError, match="Input/output error"):
            for n in range(1, 60):  # some 5 KB: past the zeros' low mark
                grant(s, n)
                acked.append(n)
        assert s.stats().failed
    finally:
        s.close(compact=False)
    assert len(acked) < 59
    assert ips(load(path)) == {lease(n).mac: str(lease(n).ip) for n in acked}


def test_a_commit_reads_none_of_the_journals_times(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat of the journal between its writes makes the kernel give each write a new
    mtime (multigrain timestamps), which every fdatasync then writes with the inode."""
    s = padded_store(path)
    stats: list[int] = []
    real = os.fstat

    def fstat(fd: int) -> os.stat_result:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".journal"):
            stats.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    try:
        grant(s, 1)
        idle(s)
        assert s.commit_here([Record.grant(lease(2))])
    finally:
        monkeypatch.setattr(os, "fstat", real)
        s.close(compact=False)
    assert stats == []
    restarts_with(path, (1, 2))
