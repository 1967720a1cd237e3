"""The daemon's py-spy samples, summed for the bench's report.

`--py-spy` attaches `py-spy record --native` to cocoon-net once it is ready and writes its
raw samples (one line per distinct stack: `thread (TID): NAME;outer;...;inner COUNT`) next
to the JSON. Only samples of running threads are taken (no `--idle`), so the shares are of
the CPU the daemon used, kernel work done in its syscalls included. py-spy pauses the
process for each sample (native stacks need it): at 100 Hz the cost is small, but the
profiled run's figures are not the bench's figures.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 100
# Native frames a thread waits in. py-spy's idle filter does not see a wait below a native
# frame (a lock, the event loop's epoll), so those samples are told apart here: the rest is
# what the daemon spent CPU on.
WAITS = frozenset(
    {
        "epoll_wait",
        "PyThread_acquire_lock_timed",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "sem_wait",
        "sem_timedwait",
        "__futex_abstimed_wait_common",
        "poll",
        "select",
    }
)
_ADDRESS = re.compile(r"^0x[0-9a-f]+ \((?P<lib>[^)]*)\)$")
_LINE = re.compile(r":\d+\)$")


@dataclass(frozen=True)
class Stack:
    thread: str
    tid: int
    frames: tuple[str, ...]  # outermost first
    samples: int

    @property
    def waiting(self) -> bool:
        return any(f.partition(" (")[0] in WAITS for f in self.frames[-3:])


def binary() -> str | None:
    """py-spy from PATH or beside this interpreter (a venv's bin)."""
    found = shutil.which("py-spy")
    if found is None:
        candidate = Path(sys.executable).with_name("py-spy")
        found = str(candidate) if candidate.exists() else None
    return found


def frame_name(raw: str) -> str:
    """`func (file.py:12)` → `func (file.py)`; a bare native address → its library."""
    address = _ADDRESS.match(raw)
    if address:
        return f"? ({address['lib']})"
    return _LINE.sub(")", raw)


def parse(lines: Iterable[str]) -> list[Stack]:
    out = []
    for line in lines:
        head, sep, count = line.rstrip("\n").rpartition(" ")
        if not sep or not count.isdigit():
            continue
        # `thread (TID): NAME;frames`, or `thread (TID);frames` when py-spy did not get the
        # name (a thread that ended meanwhile).
        first, *frames = head.split(";")
        thread, _, name = first.partition(": ")
        tid = int(thread.partition("(")[2].rstrip(")") or "0", 0)
        out.append(Stack(name or thread, tid, tuple(map(frame_name, frames)), int(count)))
    return out


def report(stacks: list[Stack], top: int = 15) -> list[str]:
    """Shares of the samples not waiting, by thread, by the function running (own), and by
    function on the stack."""
    waited = sum(s.samples for s in stacks if s.waiting)
    stacks = [s for s in stacks if not s.waiting]
    total = sum(s.samples for s in stacks)
    if total == 0:
        return ["no samples"]
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for s in stacks:
        threads[s.thread] += s.samples
        if s.frames:
            own[s.frames[-1]] += s.samples
        for frame in set(s.frames):
            inclusive[frame] += s.samples

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f} %"

    lines = [
        f"{total} samples at {RATE_HZ} Hz on CPU ({waited} more waiting in epoll or a lock, "
        "left out); by thread:"
    ]
    lines += [f"  {pct(n)}  {name}" for name, n in threads.most_common()]
    lines.append(f"running (own), top {top}:")
    lines += [f"  {pct(n)}  {name}" for name, n in own.most_common(top)]
    lines.append(f"on the stack (inclusive), top {top} of the daemon's own functions:")
    ours = [(f, n) for f, n in inclusive.most_common() if ".py)" in f and "threading" not in f]
    lines += [f"  {pct(n)}  {name}" for name, n in ours[:top]]
    return lines


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """User and system CPU seconds of each of `pid`'s threads, by thread id, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def cpu_lines(cpu: dict[int, tuple[float, float]], stacks: list[Stack]) -> list[str]:
    """The samples count a thread blocked in a syscall (fdatasync waiting for the disk) as
    running: its CPU time says how much of that was CPU. Threads by their Python names as
    the samples give them."""
    if not cpu:
        return []
    names = {s.tid: s.thread for s in stacks}
    by_name: dict[str, tuple[float, float]] = {}
    for tid, (user, system) in cpu.items():
        name = names.get(tid, f"thread {tid}")
        was = by_name.get(name, (0.0, 0.0))
        by_name[name] = (was[0] + user, was[1] + system)
    lines = ["CPU time by thread (/proc, user + system, over the daemon's life):"]
    for name, (user, system) in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {user + system:8.2f} s  ({user:.2f} + {system:.2f})  {name}")
    return lines


def read_files(paths: Iterable[Path]) -> list[Stack]:
    stacks: list[Stack] = []
    for path in paths:
        stacks += parse(path.read_text(errors="replace").splitlines())
    return stacks
