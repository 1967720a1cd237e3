"""CPU per DORA at a moderate rate, measured apart from the ladder.

The ladder's 1,000/s step is 1.2 s (1,200 exchanges) and comes right after the server
starts: a few tens of milliseconds of CPU that are not the exchanges' own (a run's first
calls, a neighbour on a shared machine) move its figure by a fifth, in either direction and
for any server. Here every server in the run takes longer steps at the same rate, in rounds
that alternate between the servers (so that a slow spell of the machine falls on all of
them), each on a fresh start, after a pause for the server to settle. A server's figure is
the median of its rounds: CPU seconds over the step's window ÷ ACKs, as in the ladder.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.bed import Bed
from bench.ladder import Step, run_step
from bench.report import table
from bench.servers import SERVERS, ServerFailed, ServerUnderTest


@dataclass(frozen=True)
class CpuPlan:
    rate: float  # DISCOVERs per second of a step
    seconds: float  # of load per step
    settle: float  # seconds between the server's ready signal and the step
    rounds: int  # steps per server, alternating between the servers
    grace: float  # seconds to wait for the last replies
    ready_timeout: float = 10.0

    @property
    def clients(self) -> int:
        return round(self.rate * self.seconds)


FULL = CpuPlan(rate=1000.0, seconds=5.0, settle=1.0, rounds=3, grace=2.0)
SMOKE = CpuPlan(rate=50.0, seconds=1.0, settle=0.2, rounds=1, grace=1.0)


@dataclass(frozen=True)
class CpuRounds:
    server: str
    status: str  # "ok", "failed: ..." or "skipped: ..."
    plan: CpuPlan
    steps: tuple[Step, ...] = ()

    @property
    def ms_per_dora(self) -> float | None:
        """The median of the rounds' CPU ms per DORA; None unless every round completed
        exchanges."""
        figures = [step.cpu_ms_per_dora for step in self.steps]
        if self.status != "ok" or not figures or any(f is None for f in figures):
            return None
        return statistics.median(f for f in figures if f is not None)


def measure(
    bed: Bed, names: Sequence[str], workdir: Path, plan: CpuPlan, log: Callable[[str], None]
) -> list[CpuRounds]:
    """Every server's rounds, alternating; a server that fails or is missing is reported
    as such and left out of the rounds that follow."""
    servers = {name: SERVERS[name](bed.site(relay=False), workdir / name) for name in names}
    status = dict.fromkeys(names, "ok")
    for name, server in servers.items():
        reason = server.missing()
        if reason is not None:
            status[name] = f"skipped: {reason}"
    steps: dict[str, list[Step]] = {name: [] for name in names}
    for _ in range(plan.rounds):
        for name, server in servers.items():
            if status[name] != "ok":
                continue
            try:
                steps[name].append(_round(bed, server, plan))
            except ServerFailed as exc:
                status[name] = f"failed: {exc}"
                log(f"{name}: cpu per DORA at {plan.rate:g}/s: {exc}")
    out = [CpuRounds(name, status[name], plan, tuple(steps[name])) for name in names]
    for result in out:
        if result.status == "ok":
            rounds = ", ".join(_ms(step.cpu_ms_per_dora) for step in result.steps)
            log(
                f"{result.server}: cpu per DORA at {plan.rate:g}/s {_ms(result.ms_per_dora)} ms "
                f"(median of {rounds})"
            )
    return out


def _round(bed: Bed, server: ServerUnderTest, plan: CpuPlan) -> Step:
    bed.forget_clients()
    server.start()
    try:
        server.wait_ready(plan.ready_timeout)
        time.sleep(plan.settle)
        return run_step(bed, server, plan.rate, plan.clients, plan.grace)
    finally:
        server.stop()
        server.forget_leases()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def lines(results: Sequence[CpuRounds]) -> list[str]:
    """Each server's rounds and their median."""
    if not results:
        return []
    plan = results[0].plan
    rows = []
    for result in results:
        if result.status != "ok":
            rows.append([result.server, result.status, "", "", ""])
            continue
        for i, step in enumerate(result.steps, 1):
            lg = step.loadgen
            rows.append(
                [
                    result.server if i == 1 else "",
                    str(i),
                    f"{lg['goodput']:.0f}",
                    _ms(step.cpu_ms_per_dora),
                    f"{step.other_cpu_pct:.0f}",
                ]
            )
        rows.append(["", "median", "", _ms(result.ms_per_dora), ""])
    return [
        f"cpu per DORA at {plan.rate:g}/s ({plan.clients} clients in {plan.seconds:g} s per "
        f"round, {plan.rounds} rounds alternating between the servers, each on a fresh start "
        f"{plan.settle:g} s after ready)",
        *table(["server", "round", "goodput/s", "cpu ms/DORA", "other %"], rows),
    ]
