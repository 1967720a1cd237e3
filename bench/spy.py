"""The daemon's py-spy samples, summed for the bench's report.

`--py-spy` attaches `py-spy record --native` to cocoon-net once it is ready and writes its
raw samples (one line per distinct stack: `thread (TID): NAME;outer;...;inner COUNT`) next
to the JSON. Only samples of running threads are taken (no `--idle`), so the shares are of
the CPU the daemon used, kernel work done in its syscalls included. py-spy pauses the
process for each sample (native stacks need it): at 100 Hz the cost is small, but the
profiled run's figures are not the bench's figures.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 100
_ADDRESS = re.compile(r"^0x[0-9a-f]+ \((?P<lib>[^)]*)\)$")
_LINE = re.compile(r":\d+\)$")


@dataclass(frozen=True)
class Stack:
    thread: str
    frames: tuple[str, ...]  # outermost first
    samples: int


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
        thread, _, rest = head.partition(": ")
        name, *frames = rest.split(";")
        out.append(Stack(name or thread, tuple(map(frame_name, frames)), int(count)))
    return out


def report(stacks: list[Stack], top: int = 15) -> list[str]:
    """Shares by thread, by the function running (own), and by function on the stack."""
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

    lines = [f"{total} samples at {RATE_HZ} Hz while running; by thread:"]
    lines += [f"  {pct(n)}  {name}" for name, n in threads.most_common()]
    lines.append(f"running (own), top {top}:")
    lines += [f"  {pct(n)}  {name}" for name, n in own.most_common(top)]
    lines.append(f"on the stack (inclusive), top {top} of the daemon's own functions:")
    ours = [(f, n) for f, n in inclusive.most_common() if ".py)" in f and "threading" not in f]
    lines += [f"  {pct(n)}  {name}" for name, n in ours[:top]]
    return lines


def report_files(paths: Iterable[Path], top: int = 15) -> list[str]:
    stacks: list[Stack] = []
    for path in paths:
        stacks += parse(path.read_text(errors="replace").splitlines())
    return report(stacks, top)
