"""The durable lease store: a journal of changes plus a Go-readable snapshot.

Durability contract
-------------------
A grant, renewal, release, expiry or decline-quarantine is written and fdatasync'ed to the
journal before `await store.commit(records)` returns; the server sends the ACK only after that
(an ACK for an address we could forget is how the Go tool handed out duplicates).
If the write fails, commit() raises StateError and no ACK may leave. After a failed write or
fsync the store stays failed: Linux may drop the unwritten pages and report success on a
retried fsync, so only a restart, which replays what is really on disk, can be trusted.

The journal is the truth. leases.json is written behind it, for the Go tool after a rollback:
it holds every change committed more than `snapshot_lag` (2 s) plus one snapshot write ago
(see Compaction). Failing to write it loses nothing and never fails a commit.

Group commit: one writer thread owns the journal. commit() queues its records and awaits a
future; the writer takes everything queued, writes it with one write() and one fdatasync(),
then resolves all those futures on their event loop. A small group can instead be written in
the caller's thread with commit_here(), but only while the writer sits idle with nothing
queued: it holds the writer's place for that one write, so the journal still has one writer
at a time and records go in the order they were committed. At a low rate that saves more CPU
than the commit costs (a hand-off to the writer and back is two thread switches and a wake-up
of the loop); under load the writer is busy, the call declines, and the loop never waits for
the disk.

Files (Role), next to the lease file the caller names:

    leases.json           SNAPSHOT  JSON array the Go tool can read (leasefile.py)
    leases.json.meta      META      seq, snapshot digests, MAC history, quarantined IPs,
                                    hold deadlines still ahead
    leases.json.journal   JOURNAL   one JSON line per change since the snapshot
    leases.json.lock      LOCK      flock: one store per lease file
    .leases.json.*.tmp    temps of atomic_write (also of .meta and .journal); leases-<digits>.json
                          are the Go tool's

Journal lines (each sets or deletes whole entries, so replaying a line twice changes nothing):

    {"seq":41,"op":"grant","ip":"172.20.100.7","mac":"52:54:00:12:34:56","expires":1775368800.0}
    {"seq":42,"op":"quarantine","ip":"172.20.100.9","mac":"52:54:00:ab:cd:ef","expires":1775372400.0}
    {"seq":43,"op":"release","ip":"172.20.100.7","mac":"52:54:00:12:34:56"}
    {"seq":44,"op":"hold","ip":"172.20.100.8","expires":1775372400.0}

The journal file runs on past its last line with zeros, written and fsync'ed a chunk (1 MiB)
ahead by the writer between batches: a record written over zeros already on disk
costs its fdatasync the data and a cache flush, where one that grows the file also costs an
inode write (LeaseStore._pad; with the disk nearly full it grows as it did without them).
Records go at a tracked offset, never O_APPEND.

Replay: the snapshot, with history, quarantine and holds from META, then every complete
journal line in file order; the last record for a MAC or IP wins. The zeros after the last
line are no line. A final line without its newline, zeros or not after it, is a write torn
by a crash: ignored, reported, and cut off at the next open, where writing resumes after
the last complete line. Other bad lines are counted (over `max_corrupt` the store refuses to
start) and the journal is copied aside before it is truncated. Only the last batch can be
torn (each is fdatasync'ed before the next is written), so a line that a crash left with
zeros where a page of it did not reach the disk costs no acknowledged record: it counts as
corrupt, and the start is a careful one (LoadReport.complete).

Compaction folds the journal into the snapshot:

    1. write META with digest(new snapshot) and digest(current snapshot): tmp, fsync, rename,
       fsync dir
    2. write SNAPSHOT the same way
    3. replace JOURNAL by the records written after the snapshot's point (tmp, fsync, rename,
       fsync dir; at open and close, when nothing else writes, truncate it and fsync instead)

Steps 1-2 take a few hundred milliseconds with tens of thousands of leases on a slow disk, so
while the daemon runs they go to a thread of their own, with the table as it was when they
began (Lease records are immutable: a copy of the list is a consistent view). The writer keeps
appending and fsyncing commits meanwhile, and remembers what it wrote since; step 3 is its own,
between two batches, and costs one small write and two fsyncs. A commit never waits for a
snapshot.

It runs when the journal passes N records or bytes, at open and close, and as the write-behind
of leases.json: once the oldest change not yet in the snapshot is `snapshot_lag` (2 s) old, so
that leases.json, which the Go tool reads after a rollback, is never much older than the
journal. Its cost is kept in check three ways. It runs only while the journal is not empty:
an idle store writes nothing. Only the entries that changed are re-encoded (SnapshotEncoder;
after a restart it takes the lines of the snapshot it finds), so a snapshot of 60,000 leases
costs mostly the sort and two 7 MB writes with their fsyncs: about 0.1 s, up to 0.25 s under
a storm of renewals on a busy 2-CPU host, instead of 0.4 s and more. And a write-behind that
took t seconds is followed by the next one no sooner than t / `snapshot_share` seconds after
it started, so snapshots never take more than that share (a fifth) of the time, whatever
the disk does. One compaction runs at a time.

So leases.json holds every change committed more than `snapshot_lag` plus the time one
compaction takes ago, as long as compactions succeed and each takes less than
`snapshot_lag` * `snapshot_share` (0.4 s); slower ones stretch the lag to five times their
own length.

The snapshot built in 1-2 drops the history of MACs whose last lease ended more than
`history_retention` ago, so VM churn does not grow META without bound. If 1, 2 or the write
in 3 fails, the journal is untouched: it still holds every change and the next start replays
it. The failure is logged once (`store.compact.failed`, then `store.compact.recovered` when
a later attempt succeeds); the write-behind retries with a back-off from `snapshot_lag` up to
a minute, the size trigger after as many records again.

A crash before 3 leaves a snapshot that already holds some or all of the journal; replaying
the journal over it gives the same table because records are idempotent (and the rename in 3
is atomic: the old journal, whole, or the new one). META names both the new and the old
snapshot digest, so either snapshot is recognised as ours after a crash between 1 and 2.
A leases.json matching neither was written by someone else (the Go tool after a downgrade,
an operator's edit): it wins, and the journal is set aside as stale.

Startup: take LOCK, remove temps, read META, read SNAPSHOT (a corrupt or empty one is renamed
to leases.json.corrupt-<UTC time>, never overwritten), replay JOURNAL. When something was set
aside, skipped or found foreign, compact at once, so that the next start does not meet it
again. So does a store without a snapshot yet (it holds what its journal holds, at most a few
thousand records): after open there is always a leases.json for META to name. Otherwise the
files already hold every lease: a torn last line is cut off (so no new line is glued to it),
META is written to name the snapshot as it is, and the compaction is left to the
write-behind, held until the owner says it serves (`resume_write_behind`, then
`snapshot_lag`; none at all when META names the snapshot and the journal is empty), so that
its encoding and fsyncs (seconds with 60,000 leases) do not delay serving.
`LoadReport.complete` is False whenever the table may be missing leases; the daemon then also
recovers from its kernel routes and hands out nothing it cannot prove free.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from cocoon_net.dhcp.leasefile import (
    LeaseState,
    Meta,
    Record,
    ReplayReport,
    SnapshotEncoder,
    check_record,
    decode_meta,
    decode_snapshot,
    encode_meta,
    encode_record,
    replay,
)
from cocoon_net.dhcp.model import Lease
from cocoon_net.errors import CocoonError, StateError
from cocoon_net.fsutil import atomic_write, fsync_dir, remove_stale_temps
from cocoon_net.lock import StateLock

if TYPE_CHECKING:  # the daemon's loop; `status` reads leases without importing asyncio
    import asyncio

log = logging.getLogger(__name__)

_GO_TEMP = re.compile(r"^leases-\d+\.json$")  # os.CreateTemp(dir, "leases-*.json")


class Role(enum.Enum):
    """The store's files, as suffixes of the lease file name."""

    SNAPSHOT = ""
    META = ".meta"
    JOURNAL = ".journal"
    LOCK = ".lock"


def role_path(path: Path, role: Role) -> Path:
    return path.with_name(path.name + role.value)


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadReport:
    snapshot_leases: int
    skipped: tuple[str, ...]  # snapshot entries left out, one reason each
    journal: ReplayReport
    snapshot_lost: str  # why the snapshot could not be used, if it could not
    meta_lost: str  # why history and quarantine could not be read, if they could not
    foreign_snapshot: bool  # leases.json was written by someone else; journal set aside
    set_aside: tuple[Path, ...]
    removed_temps: tuple[Path, ...]
    # The snapshot is the one our sidecar names, every entry was read and the journal is
    # empty: a compaction would write the same files again.
    current: bool = False

    @property
    def complete(self) -> bool:
        """True when the table provably holds every lease and quarantine ever committed."""
        return not (
            self.snapshot_lost or self.meta_lost or self.foreign_snapshot or self.journal.corrupt
        )


@dataclass(frozen=True)
class Recovered:
    leases: Mapping[str, Lease]  # by MAC; includes leases that expired while we were down
    history: Mapping[str, Lease]  # last lease of each MAC, for sticky addresses
    quarantine: Mapping[IPv4Address, float]  # declined IP -> end of probation
    seq: int  # last journal sequence number used
    report: LoadReport
    holds: Mapping[IPv4Address, float] = field(default_factory=dict)  # routed, no lease: until


def _digest(data: bytes | None) -> str:
    return "" if data is None else hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _set_aside(path: Path, label: str, *, copy: bool = False) -> Path:
    """Keep a file we cannot use under a new name; StateError if even that fails."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}.{n}")
    try:
        if copy:
            shutil.copyfile(path, target)
            with open(target, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            os.rename(path, target)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StateError(
            f"cannot set aside {path} as {target.name}: {exc.strerror or exc}; "
            "move it away by hand and restart"
        ) from None
    log.warning("store.set_aside %s -> %s", path, target)
    return target


def _remove_temps(path: Path) -> list[Path]:
    removed = [
        *remove_stale_temps(path),
        *remove_stale_temps(role_path(path, Role.META)),
        *remove_stale_temps(role_path(path, Role.JOURNAL)),
    ]
    if path.parent.is_dir():
        for leftover in path.parent.iterdir():
            if _GO_TEMP.match(leftover.name):
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


def load(path: Path, *, max_corrupt: int = 100, repair: bool = False) -> Recovered:
    """Recover the lease table from the files of `path` (see the module docstring).

    Read-only unless `repair`: then unusable files are renamed or copied aside and temps are
    removed, which only the holder of LOCK may do (LeaseStore.open). StateError when the
    journal has more than max_corrupt bad lines or an unusable file cannot be moved aside.
    """
    return _load(path, max_corrupt, repair)[0]


def _load(path: Path, max_corrupt: int, repair: bool) -> tuple[Recovered, LeaseState]:
    try:
        return _recover(path, max_corrupt, repair)
    except OSError as exc:
        raise StateError(f"cannot read lease store {path}: {exc.strerror or exc}") from None


def _recover(path: Path, max_corrupt: int, repair: bool) -> tuple[Recovered, LeaseState]:
    removed = _remove_temps(path) if repair else []
    aside: list[Path] = []

    def keep_aside(unusable: Path, label: str, *, copy: bool = False) -> None:
        if repair:
            aside.append(_set_aside(unusable, label, copy=copy))

    meta_path, journal_path = role_path(path, Role.META), role_path(path, Role.JOURNAL)

    meta: Meta | None = None
    meta_lost = ""
    raw_meta = _read(meta_path)
    if raw_meta is not None:
        try:
            meta = decode_meta(raw_meta)
        except ValueError as exc:
            meta_lost = f"{meta_path.name}: {exc}"
            keep_aside(meta_path, "corrupt")

    state = LeaseState()
    if meta is not None:
        state.history.update((h.mac, h) for h in meta.history)
        state.quarantine.update(meta.quarantine)
        state.holds.update(meta.holds)

    snapshot_lost, foreign = "", False
    skipped: tuple[str, ...] = ()
    raw = _read(path)
    if raw is not None:
        try:
            read = decode_snapshot(raw)
        except ValueError as exc:
            snapshot_lost = f"{path.name}: {'empty file' if not raw.strip() else exc}"
            keep_aside(path, "corrupt")
        else:
            skipped = read.skipped
            for lease in read.leases:
                state.grant(lease)
    snapshot_leases = len(state.leases)
    known = (meta.snapshot, meta.previous) if meta else ()
    if meta is not None and not snapshot_lost and _digest(raw) not in known:
        if raw is None:
            snapshot_lost = f"{path.name}: missing"
        else:
            foreign = True
    journal = _read(journal_path) or b""
    if foreign and journal.rstrip(b"\0"):
        keep_aside(journal_path, "stale")
        journal = b""

    state, replayed = replay(state, journal)
    if replayed.corrupt > max_corrupt:
        raise StateError(
            f"{journal_path}: {replayed.corrupt} corrupt lines (limit {max_corrupt}); "
            "move the file aside to start without it, then check routes for lost leases"
        )
    if replayed.corrupt:
        keep_aside(journal_path, "corrupt", copy=True)

    report = LoadReport(
        snapshot_leases=snapshot_leases,
        skipped=tuple(skipped),
        journal=replayed,
        snapshot_lost=snapshot_lost,
        meta_lost=meta_lost,
        foreign_snapshot=foreign,
        set_aside=tuple(aside),
        removed_temps=tuple(removed),
        current=bool(
            meta is not None
            and raw is not None
            and not snapshot_lost
            and not skipped
            and not replayed.end  # nothing but padding, if anything
            and not replayed.torn_tail
            and _digest(raw) == meta.snapshot
        ),
    )
    seq = max(meta.seq if meta else 0, replayed.last_seq)
    copy = state.copy()
    return Recovered(copy.leases, copy.history, copy.quarantine, seq, report, copy.holds), state


def _meta(state: LeaseState, seq: int, snapshot: str, previous: str, now: float) -> Meta:
    """META for `state` as of journal record `seq`, naming the snapshots by digest."""
    return Meta(
        seq=seq,
        snapshot=snapshot,
        previous=previous,
        # A leased MAC's history is its lease, which the snapshot already holds: most often
        # the very same record (a grant sets both), told apart without comparing fields.
        history=tuple(
            h
            for mac, h in state.history.items()
            if (lease := state.leases.get(mac)) is not h and lease != h
        ),
        quarantine=dict(state.quarantine),
        holds={ip: t for ip, t in state.holds.items() if t > now},
    )


def _sound(report: LoadReport) -> bool:
    """Whether the files as they are can take new journal lines and give the same table at
    the next start: nothing unusable was set aside or skipped (those get a compaction at once,
    so that the next start does not find them again, or a foreign snapshot again and set the
    new lines aside with the stale journal)."""
    return report.complete and not report.skipped and not report.set_aside


# ---------------------------------------------------------------- the running store


@dataclass(frozen=True)
class StoreStats:
    """Counters for metrics; one batch is one write and one fdatasync of the journal."""

    batches: int
    records: int
    last_batch: int  # records in the latest batch
    compactions: int
    compaction_failures: int
    journal_records: int  # since the last compaction
    journal_bytes: int
    failed: bool


RETRY_MAX_S = 60.0  # the write-behind's back-off after failed snapshots stops growing here
# Zeros are written ahead of the journal's end only while the disk keeps this much free after
# them: they must never take the room a snapshot needs (a 60,000-lease one takes 7 MB).
PAD_RESERVE = 64 << 20
_PAGE = 4096  # the zeros end on a page boundary


@dataclass(frozen=True)
class SnapshotPace:
    """When the write-behind may next write leases.json (times from a monotonic clock)."""

    lag: float  # a change waits at most this long before a snapshot is started for it
    share: float  # the most of the writer's time snapshots may take, 0 < share <= 1

    def due(self, behind_since: float | None, not_before: float) -> float | None:
        """When to write: None when the snapshot already holds everything."""
        if behind_since is None:
            return None
        return max(behind_since + self.lag, not_before)

    def after_success(self, started: float, took: float) -> float:
        return started + took / self.share

    def after_failure(self, now: float, took: float, backoff: float) -> tuple[float, float]:
        """(not_before, next backoff): doubling from `lag`, capped at RETRY_MAX_S."""
        backoff = min(max(self.lag, 2 * backoff), RETRY_MAX_S)
        return max(now + backoff, self.after_success(now - took, took)), backoff


@dataclass
class _Snapshot:
    """A compaction whose steps 1-2 run in a thread of their own (module docstring)."""

    seq: int  # the last journal record the snapshot holds
    started: float  # monotonic
    thread: threading.Thread | None = None
    tail: list[bytes] = field(default_factory=list)  # journal writes after `seq`, in order
    tail_since: float | None = None  # monotonic time of the first of them
    tail_records: int = 0
    done: bool = False  # set by its thread, under the store's condition
    error: str = ""  # why steps 1-2 failed; "" when they succeeded
    digest: str = ""  # of the snapshot written


@dataclass(frozen=True)
class _Pending:
    records: tuple[Record, ...]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


def _settle(futures: list[asyncio.Future[None]], error: str) -> None:
    for future in futures:
        if future.done():  # the awaiting task was cancelled; its records are written anyway
            continue
        if error:
            future.set_exception(StateError(error))
        else:
            future.set_result(None)


class LeaseStore:
    """The journal writer. open() recovers and starts it; commit() from the event loop.

    Shut down with `await asyncio.to_thread(store.close)`: close() waits for queued commits.
    `on_failure(error)` learns, from the writer thread, that the store has failed for good.
    `snapshot_lag` and `snapshot_share` pace the write-behind of leases.json (module
    docstring); `clock` is wall time (history retention), `monotonic` measures the lag.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_journal_records: int = 10_000,
        max_journal_bytes: int = 4 << 20,
        journal_chunk: int = 1 << 20,
        history_retention: float = 30 * 86400,
        max_corrupt: int = 100,
        observe_fsync: Callable[[float], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        snapshot_lag: float = 2.0,
        snapshot_share: float = 0.2,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (snapshot_lag >= 0 and 0 < snapshot_share <= 1):
            raise ValueError(f"bad snapshot pace: lag {snapshot_lag}, share {snapshot_share}")
        if journal_chunk < _PAGE:
            raise ValueError(f"bad journal chunk: {journal_chunk} bytes")
        self.path = path
        self.journal_path = role_path(path, Role.JOURNAL)
        self.max_journal_records = max_journal_records
        self.max_journal_bytes = max_journal_bytes
        self.journal_chunk = journal_chunk
        self._pad_low = journal_chunk // 4  # the zeros are extended when fewer are left
        self.history_retention = history_retention
        self.max_corrupt = max_corrupt
        self._observe_fsync = observe_fsync
        self._on_failure = on_failure  # called once, from the writer thread
        self._clock = clock
        self._monotonic = monotonic
        self.pace = SnapshotPace(snapshot_lag, snapshot_share)
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._closing = False
        self._error = ""
        self._thread: threading.Thread | None = None
        self._idle = False  # the writer waits in _run with nothing to do (under _cond)
        self._here = False  # commit_here() holds the writer's place (under _cond)
        self._wake = False  # the writer woke while commit_here() held its place
        self._lock: StateLock | None = None
        self._fd = -1
        # Owned by the writer thread while it runs; by open() and close() otherwise.
        self._end = 0  # the journal's offset past its last record: where the next one goes
        self._padded = 0  # the journal's size: zeros from _end up to here
        self._pad_at = 0  # the writer extends the zeros once _end reaches this
        self._pad_failing = False  # the latest extension failed (logged once per streak)
        self._state = LeaseState()
        self._seq = 0
        self._snapshot_digest = ""
        self._encoder = SnapshotEncoder()
        self._due = (max_journal_records, max_journal_bytes)
        self._behind_since: float | None = None  # first write not yet in the snapshot
        self._not_before = 0.0  # earliest start of the next write-behind
        self._backoff = 0.0
        self._failing = False  # the latest compaction failed (logged once per streak)
        self._snapshot: _Snapshot | None = None  # steps 1-2 under way in their own thread
        self._stats = StoreStats(0, 0, 0, 0, 0, 0, 0, False)

    def open(self) -> Recovered:
        """Lock, recover, compact, start the writer. LockHeldError or StateError on failure."""
        lock = StateLock(role_path(self.path, Role.LOCK), "cocoon-net daemon lease store")
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {self.path.parent}: {exc.strerror or exc}") from None
        lock.acquire()
        self._closing = False
        try:
            recovered, self._state = _load(self.path, self.max_corrupt, repair=True)
            self._seq = recovered.seq
            written = _read(self.path)
            self._snapshot_digest = _digest(written)
            # Not O_APPEND: records go at _end, over the zeros written ahead of them.
            self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            # Rewriting files that are already what a compaction writes costs seconds with
            # 60,000 leases and changes nothing; the encoder takes the lines as they are.
            if recovered.report.current and written is not None:
                self._encoder.adopt(self._state.leases.values(), written)
                self._resume(0)
            elif written is not None and _sound(recovered.report):
                # The files hold every lease as they are: the fold into leases.json is the
                # write-behind's, once the owner serves (resume_write_behind), so that its
                # seconds of encoding and fsyncs do not hold up the start. META names the
                # snapshot on disk now, so that one written by someone else meanwhile (the
                # Go tool after a rollback) is still told apart from ours.
                self._cut_torn_tail(recovered.report)
                self._resume(recovered.report.journal.end)
                meta = _meta(self._state, self._seq, self._snapshot_digest, "", self._clock())
                atomic_write(role_path(self.path, Role.META), encode_meta(meta))
                self._behind_since = self._monotonic()
                self._not_before = math.inf
            else:
                self._compact()
        except OSError as exc:
            self._release(lock)
            raise StateError(f"cannot open {self.journal_path}: {exc.strerror or exc}") from None
        except StateError:
            self._release(lock)
            raise
        except CocoonError as exc:  # the first compaction could not write
            self._release(lock)
            raise StateError(f"cannot start the lease store: {exc}") from None
        self._lock = lock
        self._thread = threading.Thread(target=self._run, name="lease-journal", daemon=True)
        self._thread.start()
        return recovered

    async def commit(self, records: Iterable[Record]) -> None:
        """Return once records are on disk; StateError if they may not be (then do not ACK).

        Cancelling the caller does not take the records back: they may still be written.
        """
        await self.submit(records)

    def submit(self, records: Iterable[Record]) -> asyncio.Future[None]:
        """Queue records for the writer now; the future is done once they are on disk, or
        fails with StateError if they may not be. StateError at once when the store has
        failed or is not open. Call from the event loop."""
        import asyncio

        batch = tuple(records)
        for record in batch:
            check_record(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not batch:
            future.set_result(None)
            return future
        with self._cond:
            if self._error:
                raise StateError(self._error)
            if self._thread is None or self._closing:
                raise StateError(f"lease store {self.path} is not open")
            self._queue.append(_Pending(batch, future, loop))
            self._cond.notify()
        return future

    def commit_here(self, records: Iterable[Record]) -> bool:
        """Write and fdatasync records in this thread if the writer is idle and nothing is
        queued, and return True once they are on disk; False, having written nothing, when
        the writer is busy (submit() them then). StateError when the store has failed or is
        not open, or this write fails (the store then fails for good, as in the writer)."""
        batch = tuple(records)
        for record in batch:
            check_record(record)
        with self._cond:
            if self._error:
                raise StateError(self._error)
            if self._thread is None or self._closing:
                raise StateError(f"lease store {self.path} is not open")
            if not self._idle or self._queue or self._here:
                return False
            if not batch:
                return True
            self._here = True
            # The writer sleeps without a deadline while the snapshot holds everything: the
            # first write past it starts the write-behind's clock, which the writer keeps.
            timed = self._behind_since is not None
        try:
            took = self._write(batch)
            if self._snapshot is None and self._compaction_due():
                self._start_snapshot()
        except OSError as exc:
            self._fail_here(f"lease journal {self.journal_path}: {exc.strerror or exc}")
        except Exception as exc:
            log.exception("store.failed unexpected error in a journal write")
            self._fail_here(f"lease journal write crashed: {exc!r}")
        with self._cond:
            self._here = False
            if self._wake or not timed or self._padding_due():
                self._wake = False
                self._cond.notify()
        self._observe(took)
        return True

    def _fail_here(self, error: str) -> NoReturn:
        """A write of commit_here() failed: the store fails for good, its writer stops."""
        self._fail(error, [])  # before the writer's place is given back: it must not write
        with self._cond:
            self._here = False
            self._cond.notify()
        raise StateError(error)

    def resume_write_behind(self) -> None:
        """The owner serves now: the write-behind, held since an open() that left the fold to
        it, may run (`snapshot_lag` after this call at the earliest). A size-triggered
        compaction or close() does not wait for this."""
        with self._cond:
            if self._not_before == math.inf:
                self._not_before = self._monotonic() + self.pace.lag
                self._cond.notify()

    def stats(self) -> StoreStats:
        with self._cond:
            return self._stats

    def close(self, *, compact: bool = True) -> None:
        """Write what is queued, stop the writer, fold the journal into leases.json, unlock."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify()
        if thread is None:
            return
        thread.join()
        self._thread = None
        if self._snapshot is not None:  # left running by a writer that failed
            if self._snapshot.thread is not None:
                self._snapshot.thread.join()
            self._snapshot = None
        if compact and not self._error:
            try:
                self._compact()
            except (CocoonError, OSError) as exc:
                # Swallowed on purpose: the journal still holds every change and the next
                # start replays it; only the Go tool would see an older leases.json meanwhile.
                log.warning("store.compact.failed at close: %s", exc)
        if self._lock is not None:
            self._release(self._lock)
            self._lock = None

    def _cut_torn_tail(self, report: LoadReport) -> None:
        """Drop a last line cut short by a crash, so the next record starts a line of its own
        (glued to the fragment, it would be one corrupt line and lost at replay), and with it
        any zeros after it: no byte of the fragment may outlive the record written over it."""
        if not report.journal.torn_tail:
            return
        os.ftruncate(self._fd, report.journal.end)
        os.fsync(self._fd)

    def _resume(self, end: int) -> None:
        """The next record goes at `end`, over the zeros after it, if the file has any."""
        self._end = end
        self._padded = os.fstat(self._fd).st_size
        self._pad_at = max(end, self._padded - self._pad_low)

    def _padding_due(self) -> bool:
        return self._end >= self._pad_at

    def _pad(self) -> None:
        """Write zeros a chunk ahead of the journal's end and fsync them, between batches.

        A record written over zeros already on disk makes its fdatasync write the data and a
        cache flush; one past the end of the file also writes the inode (the new size). The
        extension runs when the zeros left fall under a quarter of a chunk, after the batch
        that got there has been resolved: no commit waits for its own extension.

        Disk full: the zeros are a saving, never a promise. ENOSPC or EDQUOT (or too little
        space left for them beside PAD_RESERVE) leaves the journal as it is, zeros partly
        written being padding like any other, and the next records go past the end of the
        file; each commit then succeeds or fails exactly as an unpadded write does, and none
        depends on this write. Any other error fails the store, like a failed commit: a disk
        that cannot take zeros will not take records either.
        """
        chunk = self.journal_chunk
        start = max(self._end, self._padded)
        stop = -(-(self._end + chunk) // _PAGE) * _PAGE
        try:
            disk = os.fstatvfs(self._fd)
            if disk.f_bavail * disk.f_frsize < stop - start + PAD_RESERVE:
                raise OSError(errno.ENOSPC, "less free space than the reserve")
            zeros = memoryview(bytes(stop - start))
            while zeros:
                zeros = zeros[os.pwrite(self._fd, zeros, start) :]
                start = stop - len(zeros)
            # fsync, not fdatasync: the size and every other piece of the inode, so that the
            # records' fdatasyncs find nothing but their data to write.
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._padded = os.fstat(self._fd).st_size
            self._pad_at = self._end + self._pad_low
            if not self._pad_failing:
                log.warning(
                    "store.journal.unpadded %s: %s; records go past its end, each fdatasync "
                    "also writing its size (retried, not logged again)",
                    self.journal_path,
                    exc.strerror or exc,
                )
                self._pad_failing = True
            return
        self._padded, self._pad_at = stop, stop - self._pad_low
        self._pad_failing = False

    def _release(self, lock: StateLock) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        lock.release()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._error:
                    wait = None  # without work or deadline: until a commit or close comes
                    if self._queue or self._closing or self._padding_due():
                        due = True
                    elif self._snapshot is not None:
                        due = self._snapshot.done  # else until it is done or a commit comes
                    else:
                        wait = self._snapshot_wait()
                        due = wait is not None and wait <= 0
                    if due and not self._here:
                        break
                    if due:
                        # commit_here() holds our place: it wakes us once it is done. Asked
                        # only with work waiting: asked after any wake-up, every write here
                        # would wake us once more, for nothing.
                        self._wake, wait = True, None
                    self._idle = True
                    self._cond.wait(wait)
                    self._idle = False
                if self._error:  # a write in commit_here() failed: the store is done
                    return
                batch, self._queue = self._queue, []
                closing = self._closing
            try:
                if batch:
                    self._append(batch)
                if self._snapshot is not None and (self._snapshot.done or (closing and not batch)):
                    self._finish_snapshot()
                if closing and not batch:
                    return  # close() compacts once the writer is gone
                if self._snapshot is None and self._compaction_due():
                    self._start_snapshot()
                if not closing and self._padding_due():
                    self._pad()
            except OSError as exc:
                self._fail(f"lease journal {self.journal_path}: {exc.strerror or exc}", batch)
                return
            except Exception as exc:
                # A bug here must not leave commits waiting forever.
                log.exception("store.failed unexpected error in the journal writer")
                self._fail(f"lease journal writer crashed: {exc!r}", batch)
                return

    def _append(self, batch: list[_Pending]) -> None:
        took = self._write([record for pending in batch for record in pending.records])
        self._resolve(batch, "")
        self._observe(took)

    def _write(self, records: Sequence[Record]) -> float:
        """Write and fdatasync records, then apply them; the fdatasync's seconds. Called by
        whoever holds the writer's place."""
        if self._behind_since is None:
            # Taken before the write, so the lag is measured from before the ACK.
            self._behind_since = self._monotonic()
        lines = []
        for record in records:
            self._seq += 1
            lines.append(encode_record(record, self._seq))
        data_all = b"".join(lines)
        data = memoryview(data_all)
        size = len(data)
        end = self._end
        while data:
            written = os.pwrite(self._fd, data, end)
            data, end = data[written:], end + written
        started = time.perf_counter()
        os.fdatasync(self._fd)
        took = time.perf_counter() - started
        # A journal unlinked under us (its directory removed) takes writes and fsyncs
        # without complaint, and loses them all at the next start. Not fstat: a stat that
        # reads the file's times makes the kernel (multigrain timestamps) give the next
        # write a new mtime, which each fdatasync then writes with the inode: one more I/O
        # and ~25 us of CPU a commit.
        if os.readlink(f"/proc/self/fd/{self._fd}").endswith(" (deleted)"):
            raise OSError(errno.ENOENT, "deleted while in use")
        self._end, self._padded = end, max(end, self._padded)
        for record in records:
            self._state.apply(record)
        snapshot = self._snapshot
        if snapshot is not None:  # written after its snapshot point: kept by the rotation
            if snapshot.tail_since is None:
                snapshot.tail_since = self._monotonic()
            snapshot.tail.append(data_all)
            snapshot.tail_records += len(lines)
        count = len(lines)
        with self._cond:
            s = self._stats
            # Not dataclasses.replace: it costs a commit twice as much.
            self._stats = StoreStats(
                batches=s.batches + 1,
                records=s.records + count,
                last_batch=count,
                compactions=s.compactions,
                compaction_failures=s.compaction_failures,
                journal_records=s.journal_records + count,
                journal_bytes=s.journal_bytes + size,
                failed=s.failed,
            )
        return took

    def _observe(self, took: float) -> None:
        if self._observe_fsync is not None:
            try:
                self._observe_fsync(took)
            except Exception:
                # A metrics bug must not stop the journal; it is logged and the batch stands.
                log.exception("store.metrics observe_fsync failed")

    def _resolve(self, batch: list[_Pending], error: str) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for pending in batch:
            by_loop.setdefault(pending.loop, []).append(pending.future)
        for loop, futures in by_loop.items():
            # A closed loop has nobody left waiting on these futures.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, futures, error)

    def _fail(self, error: str, batch: list[_Pending]) -> None:
        log.error("store.failed %s; no lease can be granted until the daemon restarts", error)
        with self._cond:
            self._error = error
            batch = batch + self._queue
            self._queue = []
            self._stats = replace(self._stats, failed=True)
        # The owner first: a waiter woken by the failure finds it already told.
        if self._on_failure is not None:
            self._on_failure(error)
        self._resolve(batch, error)

    def _snapshot_wait(self) -> float | None:
        """Seconds until the write-behind is due (<= 0: now), None when nothing waits for it."""
        due = self.pace.due(self._behind_since, self._not_before)
        return None if due is None or due == math.inf else due - self._monotonic()

    def _compaction_due(self) -> bool:
        s = self._stats
        if s.journal_records >= self._due[0] or s.journal_bytes >= self._due[1]:
            return True
        wait = self._snapshot_wait()
        return wait is not None and wait <= 0

    def _start_snapshot(self) -> None:
        """Steps 1-2 of a write-behind or size-triggered compaction, in a thread of their own
        on a copy of the table as of now; the journal keeps taking commits meanwhile."""
        self._state.prune_history(self._clock() - self.history_retention)
        snapshot = _Snapshot(seq=self._seq, started=self._monotonic())
        # Copies of the dicts only: the Lease records in them are immutable.
        view, previous = self._state.copy(), self._snapshot_digest
        # A daemon thread like the writer: an exit without close() leaves at worst a temp file,
        # which the next open() removes, and the journal, which holds everything.
        snapshot.thread = threading.Thread(
            target=self._write_snapshot,
            args=(snapshot, view, previous),
            name="lease-snapshot",
            daemon=True,
        )
        self._snapshot = snapshot
        snapshot.thread.start()

    def _write_snapshot(self, snapshot: _Snapshot, view: LeaseState, previous: str) -> None:
        error = ""
        try:
            snapshot.digest = self._write_files(view, snapshot.seq, previous)
        except CocoonError as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not leave the writer waiting for it
            log.exception("store.compact.failed unexpected error writing the snapshot")
            error = repr(exc)
        with self._cond:
            snapshot.error, snapshot.done = error, True
            self._cond.notify()

    def _finish_snapshot(self) -> None:
        """Step 3 once steps 1-2 are done: the journal keeps only what they do not hold."""
        snapshot, self._snapshot = self._snapshot, None
        assert snapshot is not None and snapshot.thread is not None
        snapshot.thread.join()
        took = self._monotonic() - snapshot.started
        if snapshot.error:
            self._compaction_failed(snapshot.error, took)
            return
        self._snapshot_digest = snapshot.digest
        tail = b"".join(snapshot.tail)
        try:
            atomic_write(self.journal_path, tail)
        except CocoonError as exc:
            # leases.json is new and the old journal, still whole, replays over it to the same
            # table; the next compaction tries again.
            self._compaction_failed(str(exc), took)
            return
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = fd
        self._resume(len(tail))  # the writer pads the new file before it waits again
        self._due = (self.max_journal_records, self.max_journal_bytes)
        self._behind_since = snapshot.tail_since
        self._not_before = self.pace.after_success(snapshot.started, took)
        self._backoff = 0.0
        if self._failing:
            log.warning("store.compact.recovered leases.json is current again")
            self._failing = False
        with self._cond:
            self._stats = replace(
                self._stats,
                compactions=self._stats.compactions + 1,
                journal_records=snapshot.tail_records,
                journal_bytes=len(tail),
            )

    def _compaction_failed(self, error: str, took: float) -> None:
        # The journal is intact and keeps every change: nothing is lost, and the next start
        # replays it. Only leases.json (what the Go tool would read) falls behind.
        now = self._monotonic()
        self._not_before, self._backoff = self.pace.after_failure(now, took, self._backoff)
        if not self._failing:
            log.error(
                "store.compact.failed %s; the journal keeps every change, leases.json "
                "is not updated until a retry succeeds (retrying, not logged again)",
                error,
            )
        else:
            log.debug("store.compact.failed again: %s", error)
        self._failing = True
        s = self._stats
        self._due = (
            s.journal_records + self.max_journal_records,
            s.journal_bytes + self.max_journal_bytes,
        )
        with self._cond:
            self._stats = replace(s, compaction_failures=s.compaction_failures + 1)

    def _compact(self) -> None:
        """Steps 1-3 at once, with no commit running (open and close). HostSetupError:
        nothing lost, journal untouched."""
        self._state.prune_history(self._clock() - self.history_retention)
        self._snapshot_digest = self._write_files(self._state, self._seq, self._snapshot_digest)
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._resume(0)
        self._due = (self.max_journal_records, self.max_journal_bytes)
        self._behind_since = None
        with self._cond:
            s = self._stats
            self._stats = replace(
                s, compactions=s.compactions + 1, journal_records=0, journal_bytes=0
            )

    def _write_files(self, state: LeaseState, seq: int, previous: str) -> str:
        """Steps 1-2 for `state` as of journal record `seq`; the new snapshot's digest."""
        snapshot = self._encoder.encode(state.leases.values())
        digest = _digest(snapshot)
        meta = _meta(state, seq, digest, previous, self._clock())
        atomic_write(role_path(self.path, Role.META), encode_meta(meta))
        atomic_write(self.path, snapshot)
        return digest
