"""The bench's printed table and its raw JSON: pure functions over the measured runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.ladder import OVERLOAD_MULTIPLES, ServerRun, Step

OURS = "cocoon-net"
REFERENCE = "kea"
CPU_RATE = 1000.0  # the step whose CPU per DORA the summary compares
COLUMNS = (
    ("server", "{}"),
    ("target/s", "{:g}"),
    ("clients", "{}"),
    ("goodput/s", "{:.0f}"),
    ("drops %", "{:.1f}"),
    ("D-O avg", "{:.2f}"),
    ("D-O p99", "{:.2f}"),
    ("R-A avg", "{:.2f}"),
    ("R-A p99", "{:.2f}"),
    ("NAKs", "{}"),
    ("cpu %", "{:.0f}"),
    ("RSS MB", "{:.1f}"),
    ("other %", "{:.0f}"),
    ("late %", "{:.0f}"),
    ("per fsync", "{}"),
    ("note", "{}"),
)


def mb(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns under a header, as every table of the bench is printed."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*row) for row in rows
    ]


def ladder_table(runs: Sequence[ServerRun]) -> list[str]:
    """One row per step: latencies in ms, CPU as % of one core, RSS = peak (VmHWM) so far."""
    rows: list[list[str]] = []
    for run in runs:
        for step in run.steps:
            lg = step.loadgen
            values = (
                run.name,
                lg["target_rate"],
                lg["clients"],
                lg["goodput"],
                lg["drops_pct"],
                lg["offer_latency"]["avg_ms"],
                lg["offer_latency"]["p99_ms"],
                lg["ack_latency"]["avg_ms"],
                lg["ack_latency"]["p99_ms"],
                lg["naks"],
                step.server_cpu_pct,
                step.server_hwm_kib / 1024,
                step.other_cpu_pct,
                lg["late_pct"],
                "-" if step.batch_size is None else f"{step.batch_size:.1f}",
                ("lossless" if step.lossless else "")
                + (" GENERATOR BEHIND" if step.generator_behind else ""),
            )
            rows.append([fmt.format(v) for (_, fmt), v in zip(COLUMNS, values, strict=True)])
        if not run.steps:
            rows.append([run.name, run.status[:60], *([""] * (len(COLUMNS) - 2))])
    return table([name for name, _ in COLUMNS], rows)


def _lossless(run: ServerRun, top_rate: float) -> str:
    """The lossless rate; "≥" when it is the ladder's top, where the server's limit lies higher."""
    rate = run.lossless_rate
    if rate is None:
        return "-"
    return f"≥ {rate:g}" if rate >= top_rate else f"{rate:g}"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def overload_goodput(run: ServerRun, multiple: float) -> tuple[float, float] | None:
    """(offered rate, goodput) at the lowest step offering `multiple` x the lossless rate."""
    if run.lossless_rate is None:
        return None
    step = run.step_at_least(multiple * run.lossless_rate)
    return None if step is None else (step.target, step.goodput)


def cpu_per_dora(run: ServerRun) -> float | None:
    step = run.step_at(CPU_RATE)
    return None if step is None else step.cpu_ms_per_dora


def summary_table(runs: Sequence[ServerRun], top_rate: float) -> list[str]:
    rows = []
    for run in runs:
        overload = []
        for multiple in OVERLOAD_MULTIPLES:
            got = overload_goodput(run, multiple)
            overload.append("-" if got is None else f"{got[1]:.0f} (at {got[0]:g})")
        rows.append(
            [
                run.name,
                _lossless(run, top_rate),
                _num(run.peak_goodput),
                *overload,
                _num(cpu_per_dora(run), "{:.3f}"),
                "-" if run.ready_seconds is None else f"{run.ready_seconds * 1000:.0f}",
                mb(run.idle_rss_kib),
                mb(run.peak_rss_kib),
                run.status if run.status != "ok" else "",
            ]
        )
    header = [
        "server",
        "lossless /s",
        "peak goodput /s",
        *(f"goodput at {m:g}x" for m in OVERLOAD_MULTIPLES),
        f"cpu ms/DORA at {CPU_RATE:g}",
        "start ms",
        "idle RSS MB",
        "peak RSS MB",
        "note",
    ]
    return table(header, rows)


def _lossless_steps(run: ServerRun) -> dict[float, Step]:
    return {s.target: s for s in run.steps if s.lossless}


def _worst_p99(step: Step) -> float:
    lg = step.loadgen
    return float(max(lg["offer_latency"]["p99_ms"], lg["ack_latency"]["p99_ms"]))


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "-"
    return f"{ours / theirs:.2f}x"


def ratio_lines(runs: Sequence[ServerRun], top_rate: float) -> list[str]:
    """Every server over Kea from the same run: lossless rate and peak goodput (higher is
    better); CPU per DORA, worst p99 at the highest rate both served losslessly and peak RSS
    (lower is better). Without Kea, cocoon-net over each peer."""
    ref = next((r for r in runs if r.name == REFERENCE and r.steps), None)
    if ref is None:
        ref = next((r for r in runs if r.name == OURS and r.steps), None)
    if ref is None:
        return [f"ratios: neither {REFERENCE} nor {OURS} has figures in this run"]
    ref_steps = _lossless_steps(ref)
    # A reference lossless at the top of the ladder may go faster: the ratio is an upper bound.
    bound = "≤ " if (ref.lossless_rate or 0) >= top_rate else ""
    lines = []
    for run in runs:
        if run is ref or not run.steps:
            continue
        steps = _lossless_steps(run)
        common = max(steps.keys() & ref_steps.keys(), default=None)
        p99 = (
            "no rate both served losslessly"
            if common is None
            else f"worst p99 at {common:g}/s "
            f"{_ratio(_worst_p99(steps[common]), _worst_p99(ref_steps[common]))}"
        )
        lines.append(
            f"{run.name} / {ref.name}: lossless rate {bound}"
            f"{_ratio(run.lossless_rate, ref.lossless_rate)}, peak goodput "
            f"{_ratio(run.peak_goodput, ref.peak_goodput)}, cpu per DORA at {CPU_RATE:g}/s "
            f"{_ratio(cpu_per_dora(run), cpu_per_dora(ref))}, {p99}, peak RSS "
            f"{_ratio(run.peak_rss_kib, ref.peak_rss_kib)}"
        )
    for run in runs:
        for multiple in OVERLOAD_MULTIPLES:
            got = overload_goodput(run, multiple)
            if got is not None and run.lossless_rate:
                lines.append(
                    f"{run.name}: goodput at {multiple:g}x its lossless rate ({got[0]:g}/s "
                    f"offered) is {100 * got[1] / run.lossless_rate:.0f} % of that rate"
                )
    behind = [f"{r.name} {s.target:g}/s" for r in runs for s in r.steps if s.generator_behind]
    if behind:
        lines.append(
            "the generator fell behind (these steps measured it, not the server): "
            + ", ".join(behind)
        )
    return lines


def guard_lines(runs: Sequence[ServerRun]) -> list[str]:
    """What the VM guard costs: the daemon's lossless rate with it over the rate without."""
    by_name = {r.name: r for r in runs if r.steps}
    on, off = by_name.get(OURS), by_name.get(f"{OURS}-no-guard")
    if on is None or off is None or not on.lossless_rate or not off.lossless_rate:
        return []
    cost = 100.0 * (1 - on.lossless_rate / off.lossless_rate)
    return [
        f"VM guard: lossless rate {on.lossless_rate:g}/s with it, {off.lossless_rate:g}/s "
        f"without: costs {max(cost, 0.0):.0f} % (one nftables element per lease, set before "
        "the ACK)"
    ]


def to_json(runs: Sequence[ServerRun], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **extra,
        "servers": [
            {**asdict(run), "lossless_rate": run.lossless_rate, "peak_rss_kib": run.peak_rss_kib}
            for run in runs
        ],
    }


def write_results(directory: Path, stamp: str, document: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
