"""One server through a ladder of DORA rates, measured from both sides.

The load generator runs in the load namespace as its own process, pinned to one CPU, and
reports what the clients saw; this process reads the server's CPU time and memory from /proc
over exactly the same window (the generator prints "go" and "done" around the load).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bed import Bed
from bench.loadgen import LATE_PCT_BEHIND
from bench.procstat import CpuWindow, memory_kib
from bench.servers import ServerFailed, ServerUnderTest

REPO = Path(__file__).resolve().parent.parent
SATURATED_DROPS_PCT = 50.0
# Overload is measured at these multiples of a server's lossless rate; past the last, a step
# that lost more than SATURATED_DROPS_PCT ends the ladder (higher rates only repeat it).
OVERLOAD_MULTIPLES = (2.0, 3.0)
# A step is lossless when at least this share of the offered exchanges completed with every
# reply within a client's patience, at no less than this share of the target rate.
LOSSLESS_SHARE = 0.99
# Above the listed rates and before any loss, each step offers this much more than the last
# (rounded up to KNEE_ROUND), until the server loses requests: its knee.
KNEE_FACTOR = 1.25
KNEE_ROUND = 1000.0


@dataclass(frozen=True)
class LadderConfig:
    rates: tuple[float, ...]  # always offered, in rising order
    seconds: float  # of load per step: clients = rate x seconds
    min_clients: int
    grace: float  # seconds to wait for the last replies
    ready_timeout: float
    pool_size: int  # addresses a server can hand out before it must start afresh
    # The ladder goes past `rates`, up to this rate, until it has offered every multiple in
    # OVERLOAD_MULTIPLES of the server's lossless rate (0: the listed rates only).
    max_rate: float = 0.0

    def clients(self, rate: float) -> int:
        return max(self.min_clients, round(rate * self.seconds))


@dataclass(frozen=True)
class Step:
    """One rung: the clients' view (loadgen) and the server's CPU and memory over it."""

    loadgen: dict[str, Any]
    server_cpu_pct: float
    server_rss_kib: int
    server_hwm_kib: int
    server_socket_drops: int  # requests the server's sockets overflowed on
    # CPU used by everything but the server and the load generator: kernel packet work, and
    # other processes on a shared machine. High values make a step's figures suspect.
    other_cpu_pct: float
    # cocoon-net only: journal records made durable in the step, and the fsync'ed batches
    # that carried them (group commit: records / batches per fsync).
    journal_records: int = 0
    journal_batches: int = 0
    window_seconds: float = 0.0  # the load's go-to-done window the CPU figure covers
    # The server was restarted on empty lease files just before this step: the steps before
    # had handed out too much of the pool for this one's clients.
    fresh_start: bool = False

    @property
    def target(self) -> float:
        return float(self.loadgen["target_rate"])

    @property
    def goodput(self) -> float:
        return float(self.loadgen["goodput"])

    @property
    def lossless(self) -> bool:
        lg = self.loadgen
        return (
            lg["completed"] >= LOSSLESS_SHARE * lg["clients"]
            and self.goodput >= LOSSLESS_SHARE * self.target
        )

    @property
    def generator_behind(self) -> bool:
        """The generator could not offer the target rate evenly: DISCOVERs went out under 99 %
        of it or in bursts, or replies overflowed its own queue. Such a step measured the
        generator, not the server."""
        lg = self.loadgen
        return bool(
            self.generator_short
            or lg["loadgen_socket_drops"] > 0
            or lg["late_pct"] > LATE_PCT_BEHIND
        )

    @property
    def generator_short(self) -> bool:
        """DISCOVERs went out under 99 % of the target rate: the generator's ceiling, so a
        higher step would not offer more."""
        return bool(self.loadgen["discover_rate"] < LOSSLESS_SHARE * self.target)

    @property
    def cpu_ms_per_dora(self) -> float | None:
        acks = int(self.loadgen["acks"])
        if not acks or not self.window_seconds:
            return None
        return self.server_cpu_pct / 100 * self.window_seconds / acks * 1000

    @property
    def batch_size(self) -> float | None:
        return self.journal_records / self.journal_batches if self.journal_batches else None

    @property
    def drops_pct(self) -> float:
        return float(self.loadgen["drops_pct"])


@dataclass
class ServerRun:
    """Everything measured for one server; `status` is "ok", or why it has no figures."""

    name: str
    status: str = "ok"
    ready_seconds: float | None = None
    idle_rss_kib: int | None = None
    steps: list[Step] = field(default_factory=list)

    @property
    def lossless_rate(self) -> float | None:
        return lossless_rate(self.steps)

    @property
    def peak_goodput(self) -> float | None:
        return max((s.goodput for s in self.steps), default=None)

    def step_at_least(self, rate: float) -> Step | None:
        """The lowest step offering at least `rate`: where overload at that rate was measured."""
        return min(
            (s for s in self.steps if s.target >= rate), key=lambda s: s.target, default=None
        )

    def step_at(self, rate: float) -> Step | None:
        return next((s for s in self.steps if s.target == rate), None)

    @property
    def peak_rss_kib(self) -> int | None:
        return max((s.server_hwm_kib for s in self.steps), default=None)


def lossless_rate(steps: Sequence[Step]) -> float | None:
    """The highest target rate below the first lossy step (Step.lossless): a higher step
    that happened to be lossless after a lossy one does not raise it."""
    rate = None
    for step in sorted(steps, key=lambda s: s.target):
        if not step.lossless:
            break
        rate = step.target
    return rate


def next_rate(steps: Sequence[Step], cfg: LadderConfig) -> float | None:
    """The target of the next step after `steps` (in the order they ran), or None: the
    ladder is done.

    Every listed rate is offered in rising order, and so is every multiple of the server's
    lossless rate in OVERLOAD_MULTIPLES, so that overload is measured at those multiples
    exactly (a multiple below the highest step so far comes next). Past the listed rates,
    before any loss, the rate grows by KNEE_FACTOR until the server loses requests. Past the
    listed rates the ladder never goes above `max_rate`, nor on from a step whose DISCOVERs
    the generator could not send at the rate (its ceiling: a higher target would offer no
    more), nor on once every multiple has been offered. A step that lost more than
    SATURATED_DROPS_PCT ends the ladder once the highest multiple has been offered.
    """
    listed = sorted(cfg.rates)
    if not steps:
        return listed[0] if listed else None
    ran = {s.target for s in steps}
    top, last = max(ran), steps[-1]
    lossless = lossless_rate(steps)
    overload_done = top >= max(OVERLOAD_MULTIPLES) * (lossless or 0.0)
    higher = [r for r in listed if r > top]
    multiples = []
    if lossless is not None and lossless == top:  # no loss yet: look for the knee
        if top >= listed[-1]:
            higher.append(math.ceil(top * KNEE_FACTOR / KNEE_ROUND) * KNEE_ROUND)
    elif lossless is not None:
        multiples = [m * lossless for m in OVERLOAD_MULTIPLES if m * lossless not in ran]
    if last.drops_pct > SATURATED_DROPS_PCT and overload_done:
        higher = []
    may_extend = cfg.max_rate > 0 and not last.generator_short and not overload_done
    return min(
        (r for r in multiples + higher if r <= listed[-1] or (may_extend and r <= cfg.max_rate)),
        default=None,
    )


def loadgen_argv(bed: Bed, *extra: str) -> list[str]:
    cpu = bed.cpus.loadgen
    return [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--ifname",
        bed.loadgen_if,
        "--cpu",
        str(-1 if cpu is None else cpu),
        *extra,
    ]


def _expect(proc: subprocess.Popen[str], word: str, what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        _, err = rest_of_output(proc)
        raise RuntimeError(f"load generator ({what}): {err.strip().splitlines()[-1:] or line}")


def rest_of_output(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """(stdout, stderr) from here until the process exits, read through the same buffered
    pipes readline() used: communicate() reads the file descriptors and would miss what those
    buffers already hold (the generator's result, when it came with its "done")."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait()
    return out, err


def run_step(bed: Bed, server: ServerUnderTest, rate: float, clients: int, grace: float) -> Step:
    drops_before = bed.socket_drops(server.pid)
    journal_before = server.journal_stats()
    proc = bed.in_loadgen(
        loadgen_argv(bed, "--rate", str(rate), "--clients", str(clients), "--grace", str(grace)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _expect(proc, "go", "start")
        go = time.monotonic()
        window = CpuWindow.begin(server.pid, go)
        _expect(proc, "done", "load")
        done = time.monotonic()
        cpu, machine = window.percent(done)
        rss, hwm = memory_kib(server.pid)
        socket_drops = bed.socket_drops(server.pid) - drops_before
        out, err = rest_of_output(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.strip()}")
    loadgen = json.loads(out)
    other = machine - cpu - 100.0 * loadgen["loadgen_cpu_seconds"] / max(done - go, 1e-9)
    journal = server.journal_stats()
    return Step(
        loadgen,
        cpu,
        rss,
        hwm,
        socket_drops,
        max(0.0, other),
        journal.get("records", 0) - journal_before.get("records", 0),
        journal.get("batches", 0) - journal_before.get("batches", 0),
        done - go,
    )


def run_ladder(
    bed: Bed, server: ServerUnderTest, cfg: LadderConfig, log: Callable[[str], None] = print
) -> ServerRun:
    """Start the server on a clean bridge, climb the rates, stop it. Never raises for a
    server's own failure: the run records it and the bench goes on with the next server."""
    result = ServerRun(server.name)
    reason = server.missing()
    if reason is not None:
        result.status = f"skipped: {reason}"
        log(f"{server.name}: skipped ({reason})")
        return result
    bed.forget_clients()
    try:
        server.start()
        result.ready_seconds = server.wait_ready(cfg.ready_timeout)
        result.idle_rss_kib = memory_kib(server.pid)[0]
        handed_out = 0  # addresses given to clients since the server last started afresh
        while (rate := next_rate(result.steps, cfg)) is not None:
            clients = cfg.clients(rate)
            fresh = handed_out + clients > cfg.pool_size
            if fresh:
                log(
                    f"{server.name}: restarted on empty lease files before {rate:g}/s "
                    f"({handed_out} of {cfg.pool_size} addresses handed out)"
                )
                start_afresh(bed, server, cfg.ready_timeout)
                handed_out = 0
            bed.flush_neighbours()
            step = run_step(bed, server, rate, clients, cfg.grace)
            step = dataclasses.replace(step, fresh_start=fresh)
            handed_out += clients
            result.steps.append(step)
            log(_progress(server.name, step))
    except ServerFailed as exc:
        result.status = f"failed: {exc}"
        log(f"{server.name}: {exc}")
    finally:
        server.stop()
    return result


def start_afresh(bed: Bed, server: ServerUnderTest, ready_timeout: float) -> None:
    """Stop the server and start it again with no leases, no /32 routes and no neighbour
    entries: the whole pool is free again for the steps that follow."""
    server.stop()
    server.forget_leases()
    bed.forget_clients()
    server.start()
    server.wait_ready(ready_timeout)


def _progress(name: str, step: Step) -> str:
    lg = step.loadgen
    return (
        f"{name}: {lg['target_rate']:g}/s x {lg['clients']}: goodput {lg['goodput']:.0f}/s, "
        f"{lg['drops_pct']:.1f} % drops, p99 {lg['offer_latency']['p99_ms']:.2f}/"
        f"{lg['ack_latency']['p99_ms']:.2f} ms, cpu {step.server_cpu_pct:.0f} % "
        f"(other {step.other_cpu_pct:.0f} %), socket drops "
        f"server {step.server_socket_drops} loadgen {lg['loadgen_socket_drops']}, "
        f"{lg['late_pct']:.0f} % of DISCOVERs late"
        + (", GENERATOR BEHIND" if step.generator_behind else "")
        + (
            f", {step.journal_records} lease records in {step.journal_batches} fsyncs "
            f"({step.batch_size:.1f} per fsync)"
            if step.batch_size is not None
            else ""
        )
    )
