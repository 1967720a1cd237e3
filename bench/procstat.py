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


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent on anything but idle and iowait since boot (/proc/stat "cpu")."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICKS


@dataclass(frozen=True)
class CpuWindow:
    """CPU a process used over a stretch of wall time, as % of one CPU."""

    pid: int
    wall_start: float
    cpu_start: float
    machine_start: float

    @classmethod
    def begin(cls, pid: int, now: float) -> CpuWindow:
        return cls(pid, now, cpu_seconds(pid), machine_busy_seconds())

    def percent(self, now: float) -> tuple[float, float]:
        """(the process's CPU, the whole machine's busy CPU), as % of one CPU."""
        wall = now - self.wall_start
        if wall <= 0:
            return 0.0, 0.0
        own = cpu_seconds(self.pid) - self.cpu_start
        machine = machine_busy_seconds() - self.machine_start
        return 100.0 * own / wall, 100.0 * machine / wall
