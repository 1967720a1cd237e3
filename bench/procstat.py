"""CPU time and memory of a server process, from /proc (proc(5))."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its waited-for children (the `ip` or `iptables` it
    ran), fields 14-17 of /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after it follow its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return sum(int(value) for value in fields[11:15]) / _TICKS


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB: resident now, and the peak since the process started."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass(frozen=True)
class CpuWindow:
    """CPU a process used over a stretch of wall time, as % of one CPU."""

    pid: int
    wall_start: float
    cpu_start: float

    @classmethod
    def begin(cls, pid: int, now: float) -> CpuWindow:
        return cls(pid, now, cpu_seconds(pid))

    def percent(self, now: float) -> float:
        wall = now - self.wall_start
        return 100.0 * (cpu_seconds(self.pid) - self.cpu_start) / wall if wall > 0 else 0.0
