"""The durable lease store on real files: crash points as literal file sets, group commit,
writer failures, kill -9 in the middle of a commit storm, and the write-behind that keeps
leases.json readable by the Go tool."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net.dhcp.leasefile import LeaseState, Record, encode_record, encode_snapshot, replay
from cocoon_net.dhcp.model import Lease
from cocoon_net.dhcp.store import (
    RETRY_MAX_S,
    LeaseStore,
    Recovered,
    Role,
    SnapshotPace,
    StoreStats,
    _meta,
    load,
    role_path,
)
from cocoon_net.errors import LockHeldError, StateError
from tests.support import golease

T0 = 1_775_368_800.0  # 2026-04-05T06:00:00Z


def lease(n: int, *, ip: int | None = None, expires: float = T0) -> Lease:
    mac = f"52:54:00:00:{n // 256:02x}:{n % 256:02x}"
    return Lease(mac, IPv4Address(0x0A000000 + (ip or n)), expires)


def journal_bytes(*records: Record, first_seq: int = 1) -> bytes:
    return b"".join(encode_record(r, seq) for seq, r in enumerate(records, first_seq))


def journal_records(path: Path) -> bytes:
    """What the journal of `path` holds before the zeros written ahead of its next record;
    fails if anything but zeros follows them."""
    data = role_path(path, Role.JOURNAL).read_bytes()
    records = data.rstrip(b"\0")
    assert records == b"" or records.endswith(b"\n"), "a record cut short before the zeros"
    return records


def go_snapshot(*leases: Lease) -> bytes:
    rows = [{"mac": x.mac, "ip": str(x.ip), "expiry": "2026-04-05T06:00:00Z"} for x in leases]
    return json.dumps(rows, indent=2).encode()


def ips(recovered: Recovered) -> dict[str, str]:
    return {mac: str(x.ip) for mac, x in recovered.leases.items()}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "leases.json"


class Clock:
    """A monotonic clock that moves only when told: the write-behind's lag never runs out
    by itself, so tests that need the journal to hold their commits see it do so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(path: Path) -> Iterator[LeaseStore]:
    s = LeaseStore(path, monotonic=Clock())
    s.open()
    yield s
    s.close()


def files(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


def reopen(path: Path) -> Recovered:
    s = LeaseStore(path)
    try:
        return s.open()
    finally:
        s.close()


# ---------------------------------------------------------------- crash points as file sets


def test_journal_only(path: Path) -> None:
    path.parent.mkdir()
    role_path(path, Role.JOURNAL).write_bytes(
        journal_bytes(Record.grant(lease(1)), Record.grant(lease(2)), Record.release(lease(1)))
    )
    got = load(path)
    assert ips(got) == {lease(2).mac: "10.0.0.2"}
    assert got.history[lease(1).mac] == lease(1)  # sticky address survives the release
    assert got.report.complete
    assert got.seq == 3


def test_snapshot_plus_journal_it_already_holds(path: Path) -> None:
    """Crash after the snapshot rename, before the journal truncation."""
    path.parent.mkdir()
    path.write_bytes(go_snapshot(lease(1, ip=9), lease(3)))
    role_path(path, Role.JOURNAL).write_bytes(
        journal_bytes(Record.grant(lease(1)), Record.grant(lease(1, ip=9)), Record.grant(lease(3)))
    )
    got = load(path)
    assert ips(got) == {lease(1).mac: "10.0.0.9", lease(3).mac: "10.0.0.3"}
    assert got.report.complete


def test_snapshot_plus_temps_of_a_crashed_write(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(go_snapshot(lease(1)))
    ours = path.parent / ".leases.json.x1y2z3.tmp"
    ours.write_bytes(b'[{"mac": "52:54:00:00:00:02", "ip": "10.0.0')
    theirs = path.parent / "leases-4087215.json"
    theirs.write_bytes(b"")
    keep = path.parent / "leases-backup.json"
    keep.write_bytes(b"[]")
    assert load(path).report.removed_temps == ()  # read-only unless repairing
    got = load(path, repair=True)
    assert ips(got) == {lease(1).mac: "10.0.0.1"}
    assert set(got.report.removed_temps) == {ours, theirs}
    assert files(path) == {"leases.json", "leases-backup.json"}


def test_torn_last_journal_line(path: Path) -> None:
    path.parent.mkdir()
    whole = journal_bytes(Record.grant(lease(1)))
    torn = encode_record(Record.grant(lease(2)), 2)[:30]
    role_path(path, Role.JOURNAL).write_bytes(whole + torn)
    got = reopen(path)
    assert ips(got) == {lease(1).mac: "10.0.0.1"}
    assert got.report.journal.torn_tail
    assert got.report.complete  # an unacknowledged write lost nothing promised
    # The next writes must not be glued to the torn fragment.
    s = LeaseStore(path, monotonic=Clock())
    s.open()
    asyncio.run(s.commit([Record.grant(lease(3))]))
    s.close(compact=False)
    again = load(path)
    assert set(ips(again)) == {lease(1).mac, lease(3).mac}
    assert again.report.journal.corrupt == 0


def test_torn_line_after_a_snapshot_is_cut_before_new_lines(path: Path, store: LeaseStore) -> None:
    """The same with a snapshot on disk, where open() leaves the fold to the write-behind."""
    asyncio.run(store.commit([Record.grant(lease(1))]))
    store.close()
    torn = encode_record(Record.grant(lease(2)), 2)[:30]
    role_path(path, Role.JOURNAL).write_bytes(journal_bytes(Record.grant(lease(4))) + torn)
    s = LeaseStore(path, monotonic=Clock())
    assert s.open().report.journal.torn_tail
    asyncio.run(s.commit([Record.grant(lease(3))]))
    s.close(compact=False)
    again = load(path)
    assert set(ips(again)) == {lease(1).mac, lease(3).mac, lease(4).mac}
    assert again.report.journal.corrupt == 0 and not again.report.journal.torn_tail


def test_open_leaves_a_sound_snapshot_to_the_write_behind(path: Path) -> None:
    """A snapshot without our sidecar (the Go tool's) is not rewritten before the store
    serves; the sidecar written at open names it, so a snapshot the Go tool writes before the
    write-behind ran is still told apart, and the journal written meanwhile set aside."""
    path.parent.mkdir()
    path.write_bytes(go_snapshot(lease(1), lease(2)))
    before = path.read_bytes()
    s = LeaseStore(path, snapshot_lag=0.01)
    got = s.open()
    assert ips(got) == {lease(1).mac: "10.0.0.1", lease(2).mac: "10.0.0.2"}
    asyncio.run(s.commit([Record.grant(lease(3))]))
    time.sleep(0.2)  # twenty lags: held until the owner serves
    assert path.read_bytes() == before and s.stats().compactions == 0
    s.close(compact=False)
    assert set(ips(load(path))) == {lease(1).mac, lease(2).mac, lease(3).mac}
    path.write_bytes(go_snapshot(lease(5)))  # the Go tool ran in between
    got = reopen(path)
    assert ips(got) == {lease(5).mac: "10.0.0.5"}
    assert got.report.foreign_snapshot


def test_the_held_write_behind_runs_once_the_owner_serves(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(go_snapshot(lease(1)))
    s = LeaseStore(path, snapshot_lag=0.01)
    s.open()
    try:
        s.resume_write_behind()
        deadline = time.monotonic() + 20
        while s.stats().compactions < 1:
            assert time.monotonic() < deadline, "leases.json never caught up"
            time.sleep(0.02)
        assert load(path).report.current
    finally:
        s.close(compact=False)


@pytest.mark.parametrize("content", [b"", b'[\n  {\n    "mac": "52:54', b"\x00" * 512])
def test_corrupt_or_empty_snapshot_is_kept_aside_and_journal_replayed(
    path: Path, content: bytes
) -> None:
    """An empty file is what the Go tool leaves after a power loss."""
    path.parent.mkdir()
    path.write_bytes(content)
    role_path(path, Role.JOURNAL).write_bytes(journal_bytes(Record.grant(lease(4))))
    got = reopen(path)
    assert ips(got) == {lease(4).mac: "10.0.0.4"}
    assert got.report.snapshot_lost
    assert not got.report.complete
    (aside,) = got.report.set_aside
    assert aside.name.startswith("leases.json.corrupt-")
    assert aside.read_bytes() == content
    assert json.loads(path.read_bytes())[0]["ip"] == "10.0.0.4"  # rebuilt, not overwritten


def test_crash_between_meta_and_snapshot_writes(path: Path, store: LeaseStore) -> None:
    """New sidecar, old snapshot: the sidecar names the old snapshot as previous."""
    asyncio.run(store.commit([Record.grant(lease(1))]))
    store.close()
    old_snapshot = path.read_bytes()
    s = LeaseStore(path, monotonic=Clock())
    s.open()
    asyncio.run(s.commit([Record.grant(lease(2)), Record.quarantine(IPv4Address("10.0.0.7"), T0)]))
    journal = role_path(path, Role.JOURNAL).read_bytes()
    s.close()
    path.write_bytes(old_snapshot)
    role_path(path, Role.JOURNAL).write_bytes(journal)
    got = load(path)
    assert set(ips(got)) == {lease(1).mac, lease(2).mac}
    assert got.quarantine == {IPv4Address("10.0.0.7"): T0}
    assert got.report.complete and not got.report.foreign_snapshot


def test_snapshot_written_by_someone_else_wins_and_journal_is_set_aside(
    path: Path, store: LeaseStore
) -> None:
    asyncio.run(store.commit([Record.grant(lease(1))]))
    store.close(compact=False)
    path.write_bytes(go_snapshot(lease(5)))  # the Go tool ran in between
    got = reopen(path)
    assert ips(got) == {lease(5).mac: "10.0.0.5"}
    assert got.report.foreign_snapshot and not got.report.complete
    (aside,) = got.report.set_aside
    assert aside.name.startswith("leases.json.journal.stale-")


def test_missing_snapshot_that_the_sidecar_expected_is_reported(
    path: Path, store: LeaseStore
) -> None:
    asyncio.run(store.commit([Record.grant(lease(1))]))
    store.close()
    path.unlink()
    got = load(path)
    assert got.leases == {}
    assert got.report.snapshot_lost == "leases.json: missing"


def test_corrupt_journal_lines_are_counted_copied_aside_and_capped(path: Path) -> None:
    path.parent.mkdir()
    journal = role_path(path, Role.JOURNAL)
    journal.write_bytes(b"{garbage\n" + journal_bytes(Record.grant(lease(1))) + b"\x00\n")
    with pytest.raises(StateError, match="2 corrupt lines"):
        load(path, max_corrupt=1)
    got = reopen(path)
    assert ips(got) == {lease(1).mac: "10.0.0.1"}
    assert got.report.journal.corrupt == 2 and not got.report.complete
    (aside,) = got.report.set_aside
    assert aside.read_bytes().startswith(b"{garbage\n")


# ---------------------------------------------------------------- Go compatibility


def test_reopening_an_up_to_date_store_rewrites_nothing(path: Path) -> None:
    s = LeaseStore(path)
    s.open()
    asyncio.run(s.commit([Record.grant(lease(1)), Record.grant(lease(2))]))
    s.close()  # folds the journal into the snapshot
    inode = {p.name: p.stat().st_ino for p in path.parent.iterdir()}
    again = LeaseStore(path)
    recovered = again.open()
    assert recovered.report.current
    assert ips(recovered) == {lease(1).mac: "10.0.0.1", lease(2).mac: "10.0.0.2"}
    # Same files, not rewritten (an atomic rewrite would give them new inodes).
    assert {p.name: p.stat().st_ino for p in path.parent.iterdir()} == inode
    # The next snapshot reuses the lines it found for what did not change.
    renewed = lease(2, expires=T0 + 60)
    asyncio.run(again.commit([Record.grant(renewed), Record.grant(lease(3))]))
    again.close()
    assert path.read_bytes() == encode_snapshot([lease(1), renewed, lease(3)])
    # A journal line to fold in makes the next open compact again.
    role_path(path, Role.JOURNAL).write_bytes(journal_bytes(Record.release(lease(1)), first_seq=9))
    third = LeaseStore(path)
    recovered = third.open()
    assert not recovered.report.current
    third.close()
    assert role_path(path, Role.JOURNAL).stat().st_size == 0
    assert ips(reopen(path)) == {lease(2).mac: "10.0.0.2", lease(3).mac: "10.0.0.3"}


def test_go_written_file_with_offsets_and_null(path: Path) -> None:
    path.parent.mkdir()
    path.write_text(
        '[{"mac": "52:54:00:AA:BB:01", "ip": "172.20.100.7",'
        ' "expiry": "2026-04-05T14:00:00+08:00"}]'
    )
    got = reopen(path)
    assert got.leases["52:54:00:aa:bb:01"].expires == T0
    path.write_text("null")
    role_path(path, Role.META).unlink()
    assert reopen(path).leases == {}


def test_our_snapshot_is_a_go_readable_array(path: Path, store: LeaseStore) -> None:
    x = Lease("52:54:00:aa:bb:01", IPv4Address("10.0.0.7"), T0, "vm1", "ff00")
    asyncio.run(store.commit([Record.grant(x)]))
    store.close()
    rows = json.loads(path.read_bytes())
    assert rows == [
        {
            "mac": "52:54:00:aa:bb:01",
            "ip": "10.0.0.7",
            "expiry": "2026-04-05T06:00:00Z",
            "hostname": "vm1",
            "clientId": "ff00",
        }
    ]


# ---------------------------------------------------------------- the running store


def test_group_commit_shares_fsyncs(path: Path) -> None:
    s = LeaseStore(path, max_journal_records=300)
    s.open()

    async def storm() -> None:
        async def vm(n: int) -> None:
            for k in range(10):
                await s.commit([Record.grant(lease(n * 10 + k, expires=T0 + k))])

        await asyncio.gather(*(vm(n) for n in range(100)))

    asyncio.run(storm())
    stats = s.stats()
    s.close()
    assert stats.records == 1000
    assert stats.batches <= 250  # one fsync per commit would be 1000
    assert stats.compactions >= 2  # at open and at least once under load, beside the commits
    got = load(path)
    assert len(got.leases) == 1000 and got.seq == 1000


def test_history_and_quarantine_survive_compaction_and_restart(path: Path) -> None:
    s = LeaseStore(path, max_journal_records=2, clock=lambda: T0)
    s.open()
    old = lease(1, expires=T0 - 40 * 86400)  # beyond the 30-day history retention

    async def run() -> None:
        await s.commit([Record.grant(lease(2)), Record.grant(old)])
        await s.commit([Record.release(lease(2)), Record.release(old)])
        await s.commit([Record.quarantine(IPv4Address("10.0.0.9"), T0 + 3600, lease(3).mac)])
        await s.commit([Record.quarantine(IPv4Address("10.0.0.8"), T0)])
        await s.commit([Record.unquarantine(IPv4Address("10.0.0.8"))])

    asyncio.run(run())
    s.close()
    got = reopen(path)
    assert got.leases == {}
    assert set(got.history) == {lease(2).mac}
    assert got.quarantine == {IPv4Address("10.0.0.9"): T0 + 3600}


def test_second_store_on_the_same_file_is_refused(path: Path, store: LeaseStore) -> None:
    with pytest.raises(LockHeldError, match=str(os.getpid())):
        LeaseStore(path).open()


def test_commit_checks_records_and_refuses_after_close(path: Path, store: LeaseStore) -> None:
    bad = Record.grant(Lease("52:54:00:aa:bb", IPv4Address("10.0.0.7"), T0))
    with pytest.raises(ValueError, match="6-byte MAC"):
        asyncio.run(store.commit([bad]))
    store.close()
    with pytest.raises(StateError, match="not open"):
        asyncio.run(store.commit([Record.grant(lease(1))]))


def test_writer_failure_fails_every_waiting_commit(path: Path) -> None:
    fsyncs: list[float] = []
    failures: list[str] = []
    s = LeaseStore(path, observe_fsync=fsyncs.append, on_failure=failures.append)
    s.open()

    async def run() -> list[BaseException | None]:
        await s.commit([Record.grant(lease(1))])
        shutil.rmtree(path.parent)  # the journal now lives on only as an open, unlinked file
        waits = [s.commit([Record.grant(lease(n))]) for n in range(2, 200)]
        return await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 60)

    results = asyncio.run(run())
    assert all(isinstance(r, StateError) for r in results)
    assert "deleted while in use" in str(results[0])
    assert s.stats().failed and len(fsyncs) >= 1
    # The owner learns once, so that it can stop (the daemon exits for systemd to restart it).
    assert len(failures) == 1 and "deleted while in use" in failures[0]
    with pytest.raises(StateError, match="deleted"):
        asyncio.run(s.commit([Record.grant(lease(3))]))
    s.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from ipaddress import IPv4Address
    from pathlib import Path
    from cocoon_net.dhcp.leasefile import Record
    from cocoon_net.dhcp.model import Lease
    from cocoon_net.dhcp.store import LeaseStore

    store = LeaseStore(
        Path(sys.argv[1]), max_journal_records=int(sys.argv[2]), snapshot_lag=float(sys.argv[3])
    )
    store.open()

    async def vm(first):
        n = first
        while True:
            mac = f"52:54:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"
            await store.commit([Record.grant(Lease(mac, IPv4Address(0x0A000000 + n), 1e9 + n))])
            print("ok", n, flush=True)
            n += 8

    async def main():
        await asyncio.gather(*(vm(i) for i in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("round_", range(4))
def test_kill_9_loses_no_acknowledged_commit(path: Path, round_: int) -> None:
    rng = random.Random(round_)
    path.parent.mkdir()
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(path),
            str(rng.choice([20, 200, 5000])),
            str(rng.choice([0.0, 0.01, 2.0])),  # 0: a write-behind after every batch
        ],
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        acked: list[int] = []
        stop_after = rng.randint(50, 1500)
        while len(acked) < stop_after:
            line = proc.stdout.readline()
            assert line.startswith(b"ok "), line
            acked.append(int(line.split()[1]))
        proc.send_signal(signal.SIGKILL)
        # Lines already in the pipe were printed after their commit returned; a line cut by
        # the kill was not fully printed and promises nothing.
        *complete, _cut = proc.stdout.read().split(b"\n")
        acked += [int(line.split()[1]) for line in complete]
    assert proc.returncode == -signal.SIGKILL
    got = load(path)
    on_disk = {int(x.ip) - 0x0A000000 for x in got.leases.values()}
    assert set(acked) <= on_disk
    assert got.report.journal.corrupt == 0


def test_failed_compaction_keeps_the_journal_and_is_retried(path: Path) -> None:
    s = LeaseStore(path, max_journal_records=5, monotonic=Clock())
    s.open()
    path.unlink()
    path.mkdir()  # leases.json cannot be replaced now: the snapshot rename fails

    async def grant(first: int, last: int) -> None:
        for n in range(first, last):
            await s.commit([Record.grant(lease(n))])

    asyncio.run(grant(1, 8))
    settled(s, failures=1)
    held, _ = replay(LeaseState(), role_path(path, Role.JOURNAL).read_bytes())
    assert len(held.leases) == 7  # nothing was truncated before a snapshot held it
    path.rmdir()
    asyncio.run(grant(8, 20))
    stats = settled(s, compactions=2)
    s.close(compact=False)
    assert stats.compactions >= 2 and stats.journal_records < 12
    assert len(load(path).leases) == 19


def test_corrupt_sidecar_is_kept_aside_and_reported(path: Path, store: LeaseStore) -> None:
    asyncio.run(store.commit([Record.grant(lease(1))]))
    store.close()
    role_path(path, Role.META).write_bytes(b'{"version": 1, "seq": "x"}')
    assert load(path).report.set_aside == ()  # read-only: nothing moved
    got = reopen(path)
    assert ips(got) == {lease(1).mac: "10.0.0.1"}
    assert got.report.meta_lost and not got.report.complete
    (aside,) = got.report.set_aside
    assert aside.name.startswith("leases.json.meta.corrupt-")


# ---------------------------------------------------------------- write-behind of leases.json


def go_view(path: Path, now: float = T0 - 1) -> dict[str, str]:
    """MAC -> IP of the leases the Go tool would restore from leases.json at `now`."""
    read = golease.read(path.read_bytes(), now)
    assert not read.skipped, read.skipped
    return {x.mac: str(x.ip) for x in read.leases}


def grant(s: LeaseStore, *ns: int) -> None:
    asyncio.run(s.commit([Record.grant(lease(n, expires=T0 + n)) for n in ns]))


def test_snapshot_pace() -> None:
    pace = SnapshotPace(lag=2.0, share=0.2)
    assert pace.due(None, 50.0) is None  # nothing waits for a snapshot: none is written
    assert pace.due(10.0, 0.0) == 12.0
    assert pace.due(10.0, 15.0) == 15.0  # the cost bound pushes it out
    # A snapshot that took 1 s allows the next no sooner than 5 s after it started: a fifth.
    assert pace.after_success(started=100.0, took=1.0) == 105.0
    backoff, waits = 0.0, []
    for _ in range(8):
        not_before, backoff = pace.after_failure(200.0, 0.01, backoff)
        waits.append(not_before - 200.0)
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, RETRY_MAX_S, RETRY_MAX_S, RETRY_MAX_S]
    assert pace.after_failure(200.0, 30.0, 0.0)[0] == 200.0 - 30.0 + 30.0 / 0.2


def test_write_behind_writes_leases_json_after_the_lag(path: Path) -> None:
    clock = Clock()
    s = LeaseStore(path, monotonic=clock, snapshot_lag=2.0)
    s.open()
    assert go_view(path) == {}
    grant(s, 1)
    clock.now += 1.9
    grant(s, 2)
    # The writer handles one batch at a time: this commit returns only after the writer
    # decided about the one before it.
    grant(s, 3)
    assert go_view(path) == {}, "written before the lag ran out"
    clock.now += 0.2  # the first commit is now 2.1 s old
    grant(s, 4)  # at the latest after this batch, the writer sees the lag has run out
    grant(s, 5)  # returns after the writer dealt with the batch before: the snapshot began
    settled(s, compactions=2)  # the one at open, and this one
    held = go_view(path)
    assert {lease(n).mac for n in (1, 2, 3)} <= set(held)
    assert held[lease(1).mac] == "10.0.0.1"
    # Expiries as Go reads them: the lease's end, rounded up to a whole second.
    read = golease.read(path.read_bytes(), T0 - 1)
    assert {x.mac: x.expiry for x in read.leases}[lease(3).mac] == T0 + 3
    assert len(journal_records(path)) < 400  # folded in, then rotated
    s.close(compact=False)  # as after a crash: whatever the journal holds is replayed
    got = load(path)
    assert ips(got) == {lease(n).mac: f"10.0.0.{n}" for n in range(1, 6)}
    assert got.report.complete and not got.report.foreign_snapshot


def caught_up(path: Path, s: LeaseStore) -> None:
    """Wait (real time) until a compaction after open() has emptied the journal."""
    deadline = time.monotonic() + 20
    while (stats := s.stats()).compactions < 2 or stats.journal_records:
        assert time.monotonic() < deadline, "leases.json never caught up"
        time.sleep(0.02)


def idle(s: LeaseStore) -> None:
    """Wait (real time) until the writer waits for work, as it does between commits: done
    with the batch before, and with deciding whether a snapshot is due after it."""
    deadline = time.monotonic() + 10
    while not s._idle:
        assert time.monotonic() < deadline, "the writer never went idle"
        time.sleep(0.001)


def settled(s: LeaseStore, *, compactions: int = 0, failures: int = 0) -> StoreStats:
    """Wait (real time) until this many compactions have ended, well or not: they write
    leases.json beside the commits, so a commit returning says nothing about them."""
    deadline = time.monotonic() + 20
    while (stats := s.stats()).compactions < compactions or stats.compaction_failures < failures:
        assert not stats.failed, "the store failed while a compaction was awaited"
        assert time.monotonic() < deadline, f"compactions never ended: {stats}"
        time.sleep(0.005)
    return stats


def temp_role(path: Path, fd: int) -> Role | None:
    """Which of the store's files the temp file open as `fd` is about to replace, if any."""
    name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
    for role in Role:  # the temp's random part has no dot: one pattern fits at most
        if re.fullmatch(rf"\.{re.escape(path.name + role.value)}\.[^.]+\.tmp", name):
            return role
    return None


def test_commits_are_not_held_up_while_a_snapshot_is_written(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """leases.json is written beside the journal: commits made while its fsync hangs return
    at once, and afterwards the journal keeps exactly the records the snapshot lacks."""
    clock = Clock()
    # The writer sleeps out the lag in real seconds too: a long one cannot run out by itself.
    s = LeaseStore(path, monotonic=clock, snapshot_lag=60.0)
    s.open()
    real_fsync = os.fsync
    writing, release = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path.parent / ".leases.json.")):
            writing.set()  # the snapshot's temp file: hang as a slow disk would
            release.wait(20)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        grant(s, 1, 2)
        clock.now += 61  # the lag has run out: a snapshot starts after this batch or the next
        grant(s, 3)
        assert writing.wait(20)
        for n in range(4, 9):  # each returns only once on disk, the snapshot still hanging
            grant(s, n)
        assert s.stats().compactions == 1 and go_view(path) == {}
        release.set()
        settled(s, compactions=2)
        snapshot = set(go_view(path))
        assert {lease(1).mac, lease(2).mac} <= snapshot <= {lease(n).mac for n in (1, 2, 3)}
        journal = journal_records(path)
        held, _ = replay(LeaseState(), journal)
        assert set(held.leases) == {lease(n).mac for n in range(1, 9)} - snapshot
        stats = s.stats()
        assert (stats.compactions, stats.journal_records) == (2, len(held.leases))
        assert stats.journal_bytes == len(journal)
        grant(s, 9)  # appended to the new journal, after what it kept
        held, _ = replay(LeaseState(), role_path(path, Role.JOURNAL).read_bytes())
        assert set(held.leases) == {lease(n).mac for n in range(1, 10)} - snapshot
        # What the journal kept is as old as when it was written: once the lag has run out
        # for it, the next commit starts the next snapshot.
        written = hashlib.sha256(path.read_bytes()).hexdigest()
        idle(s)  # else it may see the lag run out before it wrote 10, and leave 10 out
        clock.now += 61
        grant(s, 10)
        settled(s, compactions=3)
        assert set(go_view(path)) == {lease(n).mac for n in range(1, 11)}
        # That snapshot's META names the one before as its predecessor (recognised as ours
        # after a crash between the two writes).
        meta = json.loads(role_path(path, Role.META).read_bytes())
        assert meta["previous"] == written
    finally:
        release.set()
        s.close(compact=False)
    got = load(path)
    assert ips(got) == {lease(n).mac: f"10.0.0.{n}" for n in range(1, 11)}
    assert got.report.complete


def test_write_behind_runs_without_further_commits(path: Path) -> None:
    """The last grant before a quiet spell (or a crash) reaches leases.json on its own."""
    s = LeaseStore(path, snapshot_lag=0.05)
    s.open()
    try:
        grant(s, 7)
        caught_up(path, s)
        assert go_view(path) == {lease(7).mac: "10.0.0.7"}
    finally:
        s.close(compact=False)


def test_an_idle_store_writes_nothing(path: Path) -> None:
    s = LeaseStore(path, snapshot_lag=0.01)
    s.open()
    try:
        grant(s, 1)
        caught_up(path, s)
        written = s.stats().compactions, path.stat().st_ino
        time.sleep(0.3)  # thirty lags: a writer that snapshots when idle would have
        assert (s.stats().compactions, path.stat().st_ino) == written
    finally:
        s.close(compact=False)


class CountingClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_the_writer_sleeps_out_the_lag_and_writes_the_moment_it_ends(path: Path) -> None:
    """Waiting for the write-behind costs no CPU (the writer sleeps until it is due instead of
    polling the clock), and the snapshot starts once the lag has run out, to the instant."""
    clock = CountingClock()
    s = LeaseStore(path, monotonic=clock, snapshot_lag=0.5)
    s.open()
    try:
        grant(s, 1)
        time.sleep(0.25)  # the writer is waiting out the lag, in real seconds too
        reads = clock.reads
        time.sleep(0.2)
        assert clock.reads - reads < 20, "the writer polls the clock while it waits"
        clock.now += 0.5  # exactly the lag, and the clock stands still from here
        settled(s, compactions=2)
        assert go_view(path) == {lease(1).mac: "10.0.0.1"}
    finally:
        s.close(compact=False)


def test_commits_made_during_a_snapshot_reach_leases_json_without_further_commits(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records the journal keeps at its rotation are as old as when they were written:
    the write-behind folds them in on its own, no later commit needed."""
    s = LeaseStore(path, snapshot_lag=0.05)
    s.open()
    real_fsync = os.fsync
    writing, release = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if not release.is_set() and temp_role(path, fd) is Role.META:
            writing.set()  # the first write-behind hangs as on a slow disk
            release.wait(20)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        grant(s, 1)
        assert writing.wait(20)
        grant(s, 2, 3)  # written while the snapshot, which lacks them, is under way
        release.set()
        caught_up(path, s)  # the journal emptied by a second write-behind
        assert s.stats().compactions >= 3
        assert set(go_view(path)) == {lease(n).mac for n in (1, 2, 3)}
    finally:
        release.set()
        s.close(compact=False)


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """No file can be created in directory, even by root: the immutable attribute (chattr +i)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags[0] | FS_IMMUTABLE_FL]))
        except OSError as exc:
            pytest.skip(f"no immutable attribute on the file system of {directory}: {exc}")
        try:
            yield
        finally:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fault", ["snapshot-is-a-directory", "unwritable-directory"])
def test_failed_write_behind_keeps_the_journal_and_is_logged_once(
    path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    s = LeaseStore(path, monotonic=clock)
    s.open()
    before = path.read_bytes()
    with contextlib.ExitStack() as broken:
        if fault == "snapshot-is-a-directory":  # META is written, the snapshot rename fails
            path.unlink()
            path.mkdir()
            broken.callback(path.rmdir)
        else:  # not even a temp file for META can be created
            broken.enter_context(unwritable(path.parent))
        caplog.set_level(logging.WARNING, logger="cocoon_net.dhcp.store")
        grant(s, 9)
        for n in range(1, 9):
            # Past the longest back-off every time, so each step tries again; the clock
            # moves only once that attempt has ended.
            clock.now += RETRY_MAX_S + 1
            grant(s, n)
            grant(s, 100 + n)
            settled(s, failures=n)
        stats = s.stats()
        assert stats.compaction_failures == 8 and not stats.failed
        failed = [r for r in caplog.records if "store.compact.failed" in r.getMessage()]
        assert len(failed) == 1, [r.getMessage() for r in failed]
        assert f"write {path}" in failed[0].getMessage()  # which file, and why (below)
        held, _ = replay(LeaseState(), role_path(path, Role.JOURNAL).read_bytes())
        assert len(held.leases) == 17  # nothing truncated that no snapshot holds
        if fault == "unwritable-directory":
            assert path.read_bytes() == before
            # A crash now: the old snapshot and the journal give every lease.
            assert len(load(path).leases) == 17
    clock.now += RETRY_MAX_S + 1
    grant(s, 10)
    grant(s, 11)
    settled(s, compactions=2)
    assert set(go_view(path)) >= {lease(n).mac for n in (*range(1, 10), *range(101, 109))}
    assert any("store.compact.recovered" in r.getMessage() for r in caplog.records)
    s.close()
    got = reopen(path)
    assert len(got.leases) == 19 and got.report.complete


def test_a_failed_journal_replacement_loses_nothing_and_each_streak_is_logged(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The snapshot is written but the journal cannot be replaced by what it lacks: the old
    journal, whole, still replays over the new snapshot; commits go on, a later write-behind
    tries again, and a failure after a recovery is reported again, with its reason, and
    retried after the lag again."""
    clock = Clock()
    s = LeaseStore(path, monotonic=clock, snapshot_lag=1.0)
    s.open()
    real_fsync = os.fsync
    broken = threading.Event()

    def fsync(fd: int) -> None:
        if broken.is_set() and temp_role(path, fd) is Role.JOURNAL:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    caplog.set_level(logging.WARNING, logger="cocoon_net.dhcp.store")

    def write_behind(*ns: int, compactions: int = 0, failures: int = 0) -> None:
        grant(s, *ns)  # behind since now, if nothing was before
        idle(s)  # it decided about a snapshot after that batch with the clock as it was
        clock.now += RETRY_MAX_S + 1  # past the lag and any back-off
        grant(s, 100 + ns[0])  # after this batch the writer starts the snapshot
        settled(s, compactions=compactions, failures=failures)

    try:
        broken.set()
        write_behind(1, failures=1)
        stats = s.stats()
        assert (stats.compactions, stats.compaction_failures, stats.failed) == (1, 1, False)
        assert set(go_view(path)) == {lease(n).mac for n in (1, 101)}  # the new snapshot
        held, _ = replay(LeaseState(), role_path(path, Role.JOURNAL).read_bytes())
        assert set(held.leases) == {lease(n).mac for n in (1, 101)}  # kept whole
        got = load(path)  # a crash now: the new snapshot and the whole journal over it
        assert len(got.leases) == 2 and got.report.complete
        grant(s, 2)  # commits go on
        broken.clear()
        write_behind(3, compactions=2)
        assert s.stats().journal_records == 0
        broken.set()
        write_behind(4, failures=2)
        broken.clear()
        clock.now += 1.5  # past the lag: the new streak's first back-off, not a longer one
        grant(s, 5)
        settled(s, compactions=3)
    finally:
        s.close(compact=False)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    failed = [m for level, m in logged if level >= logging.ERROR and "compact.failed" in m]
    assert len(failed) == 2, logged  # once per streak
    assert all("Input/output error" in m for m in failed)
    assert sum("store.compact.recovered" in m for _, m in logged) == 2
    got = load(path)
    assert set(got.leases) == {lease(n).mac for n in (1, 2, 3, 4, 5, 101, 103, 104)}
    assert got.report.complete


def test_a_crash_in_close_while_a_snapshot_was_being_written_loses_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() meets a write-behind under way: the writer first completes it (the journal
    keeps what it lacks, the next META names it as the previous snapshot), so a crash between
    close's own META and snapshot writes finds a snapshot the store knows as its own."""
    clock = Clock()
    s = LeaseStore(path, monotonic=clock, snapshot_lag=60.0)
    s.open()
    real_fsync = os.fsync
    writing, release = threading.Event(), threading.Event()
    snapshots = 0

    def fsync(fd: int) -> None:
        nonlocal snapshots
        role = temp_role(path, fd)
        if role is Role.META and not writing.is_set():
            writing.set()  # the write-behind's first write hangs as on a slow disk
            release.wait(20)
        elif role is Role.SNAPSHOT:
            snapshots += 1
            if snapshots == 2:  # close's: as if the power went after its META
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    closer = threading.Thread(target=s.close)
    try:
        grant(s, 1, 2)
        clock.now += 61
        grant(s, 3)  # the write-behind starts after this batch
        assert writing.wait(20)
        grant(s, 4)  # not in the snapshot under way
        closer.start()
        time.sleep(0.2)  # the writer meets the close while the snapshot still hangs
    finally:
        release.set()
        if closer.ident is None:  # the test failed before the close began
            s.close(compact=False)
        else:
            closer.join(30)
    assert not closer.is_alive()
    assert snapshots == 2  # both written: the write-behind's, then close's that failed
    got = load(path)
    assert set(got.leases) == {lease(n).mac for n in (1, 2, 3, 4)}
    assert got.report.complete and not got.report.foreign_snapshot


def hold_fdatasync(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """fdatasync blocks until `gate` is set; `entered` is set once a call has begun."""
    entered, gate = threading.Event(), threading.Event()
    real = os.fdatasync

    def held(fd: int) -> None:
        entered.set()
        gate.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    return entered, gate


def test_a_commit_whose_event_loop_closed_meanwhile_does_not_stop_the_store(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon stopping mid-commit closes its loop before the writer answers: the records
    are written all the same and the writer goes on for everyone else."""
    entered, gate = hold_fdatasync(monkeypatch)
    s = LeaseStore(path)
    s.open()

    async def submit() -> asyncio.Future[None]:
        return s.submit([Record.grant(lease(1))])

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(submit())
        assert entered.wait(30)  # the writer holds the batch
        loop.close()
        gate.set()
        asyncio.run(asyncio.wait_for(s.commit([Record.grant(lease(2))]), 30))
        assert not s.stats().failed
    finally:
        gate.set()
        loop.close()
        s.close()
    assert set(reopen(path).leases) == {lease(1).mac, lease(2).mac}


def test_a_commit_returns_after_its_records_were_written_and_fdatasynced(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bytes] = []  # the journal as it was at each fdatasync
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).read_bytes())

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    took: list[float] = []
    s = LeaseStore(path, observe_fsync=took.append)
    s.open()
    try:
        asyncio.run(s.commit([Record.grant(lease(1)), Record.grant(lease(2))]))
        assert synced and b'"ip":"10.0.0.2"' in synced[-1]
        asyncio.run(s.commit([Record.grant(lease(3))]))
        assert b'"ip":"10.0.0.3"' in synced[-1]
        journal = journal_records(path)
        stats = s.stats()
        assert (stats.batches, stats.records, stats.last_batch) == (2, 3, 1)
        assert (stats.journal_records, stats.journal_bytes) == (3, len(journal))
        assert len(took) == 2 and all(0 <= t < 60 for t in took)
    finally:
        s.close()


def test_a_writer_crash_fails_the_waiting_commit_and_every_later_one(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = LeaseStore(path)
    s.open()

    def crash(fd: int) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(os, "fdatasync", crash)
    try:
        with pytest.raises(StateError) as info:
            asyncio.run(asyncio.wait_for(s.commit([Record.grant(lease(1))]), 30))
        assert str(info.value) == "lease journal writer crashed: RuntimeError('boom')"
        assert s.stats().failed
        with pytest.raises(StateError, match="crashed"):
            asyncio.run(s.commit([Record.grant(lease(2))]))
    finally:
        s.close()


def test_an_io_error_is_reported_with_its_reason(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = LeaseStore(path)
    s.open()

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    try:
        with pytest.raises(StateError) as info:
            asyncio.run(asyncio.wait_for(s.commit([Record.grant(lease(1))]), 30))
        journal = role_path(path, Role.JOURNAL)
        assert str(info.value) == f"lease journal {journal}: Input/output error"
    finally:
        s.close()


def test_a_store_never_opened_refuses_commits(path: Path) -> None:
    with pytest.raises(StateError, match="not open"):
        asyncio.run(asyncio.wait_for(LeaseStore(path).commit([Record.grant(lease(1))]), 5))


def test_a_journal_deleted_under_the_writer_is_named_in_the_error(path: Path) -> None:
    s = LeaseStore(path)
    s.open()

    async def run() -> None:
        await s.commit([Record.grant(lease(1))])
        shutil.rmtree(path.parent)
        await asyncio.wait_for(s.commit([Record.grant(lease(2))]), 30)

    try:
        with pytest.raises(StateError) as info:
            asyncio.run(run())
        assert str(info.value).endswith(": deleted while in use")
    finally:
        s.close()


def test_a_cancelled_waiter_does_not_strand_the_others_of_its_batch(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, gate = hold_fdatasync(monkeypatch)
    s = LeaseStore(path)
    s.open()

    async def run() -> None:
        first = asyncio.create_task(s.commit([Record.grant(lease(1))]))
        await asyncio.to_thread(entered.wait, 30)  # the writer holds the first batch
        cancelled = asyncio.create_task(s.commit([Record.grant(lease(2))]))
        waiting = asyncio.create_task(s.commit([Record.grant(lease(3))]))
        await asyncio.sleep(0)  # both queued: they will be the next batch together
        cancelled.cancel()
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, waiting), 30)

    try:
        asyncio.run(run())
    finally:
        gate.set()
        s.close()
    assert set(reopen(path).leases) == {lease(n).mac for n in (1, 2, 3)}


def test_hold_deadlines_survive_replay_and_compaction_until_they_pass(path: Path) -> None:
    later = float(int(time.time()) + 3600)  # META keeps whole seconds
    s = LeaseStore(path)
    s.open()
    held, past, claimed = IPv4Address("10.0.0.7"), IPv4Address("10.0.0.8"), lease(9)

    async def run() -> None:
        await s.commit([Record.hold(held, later), Record.hold(past, T0)])
        await s.commit([Record.hold(claimed.ip, later), Record.grant(claimed)])

    asyncio.run(run())
    assert load(path).holds == {held: later, past: T0}  # the journal, replayed
    s.close()  # compacts: META keeps the deadline still ahead, and only that one
    assert reopen(path).holds == {held: later}


def test_meta_leaves_out_the_history_a_lease_already_holds_however_it_was_built() -> None:
    """META keeps the last grant of MACs without a lease; for a leased MAC that grant is its
    lease, in the snapshot already. The same record or an equal one: both left out."""
    state = LeaseState()
    held, equal, ended = lease(1), lease(2), lease(3)
    state.leases = {held.mac: held, equal.mac: equal}
    state.history = {held.mac: held, equal.mac: Lease(equal.mac, equal.ip, equal.expires),
                     ended.mac: ended}  # fmt: skip
    assert _meta(state, 7, "a", "b", T0).history == (ended,)
