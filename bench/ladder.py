"""One server through a ladder of DORA rates, measured from both sides.

The load generator runs in the load namespace as its own process, pinned to one CPU, and
reports what the clients saw; this process reads the server's CPU time and memory from /proc
over exactly the same window (the generator prints "go" and "done" around the load).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bed import Bed
from bench.loadgen import LATE_PCT_BEHIND
from bench.procstat import CpuWindow, memory_kib
from bench.servers import ServerFailed, ServerUnderTest

REPO = Path(__file__).resolve().parent.parent
SATURATED_DROPS_PCT = 50.0
# Overload is measured up to this multiple of a server's lossless rate; past it, a step that
# lost more than SATURATED_DROPS_PCT ends the ladder (higher rates only repeat it).
OVERLOAD_MULTIPLES = (2.0, 3.0)
# A step is lossless when at least this share of the offered exchanges completed with every
# reply within a client's patience, at no less than this share of the target rate.
LOSSLESS_SHARE = 0.99


@dataclass(frozen=True)
class LadderConfig:
    rates: tuple[float, ...]
    seconds: float  # of load per step: clients = rate x seconds
    min_clients: int
    grace: float  # seconds to wait for the last replies
    ready_timeout: float


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
            lg["discover_rate"] < LOSSLESS_SHARE * self.target
            or lg["loadgen_socket_drops"] > 0
            or lg["late_pct"] > LATE_PCT_BEHIND
        )

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
        """The highest target rate below the first lossy step (Step.lossless): a higher step
        that happened to be lossless after a lossy one does not raise it."""
        rate = None
        for step in sorted(self.steps, key=lambda s: s.target):
            if not step.lossless:
                break
            rate = step.target
        return rate

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
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"load generator ({what}): {err.strip().splitlines()[-1:] or line}")


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
        out, err = proc.communicate(timeout=30)
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
        for rate in cfg.rates:
            clients = max(cfg.min_clients, round(rate * cfg.seconds))
            bed.flush_neighbours()
            step = run_step(bed, server, rate, clients, cfg.grace)
            result.steps.append(step)
            log(_progress(server.name, step))
            if step.drops_pct > SATURATED_DROPS_PCT and rate >= max(OVERLOAD_MULTIPLES) * (
                result.lossless_rate or 0.0
            ):
                break
    except ServerFailed as exc:
        result.status = f"failed: {exc}"
        log(f"{server.name}: {exc}")
    finally:
        server.stop()
    return result


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


def clients_per_server(cfg: LadderConfig) -> int:
    """Addresses one server may hand out in a full ladder (every client is new)."""
    return sum(max(cfg.min_clients, round(rate * cfg.seconds)) for rate in cfg.rates)
