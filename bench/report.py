"""The bench's printed table and its raw JSON: pure functions over the measured runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.ladder import ServerRun

OURS = "cocoon-net"
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
                " ".join(
                    word
                    for word, shown in (
                        ("lossless", step.lossless),
                        ("GENERATOR BEHIND", step.generator_behind),
                        ("(fresh start)", step.fresh_start),
                    )
                    if shown
                ),
            )
            rows.append([fmt.format(v) for (_, fmt), v in zip(COLUMNS, values, strict=True)])
        if not run.steps:
            rows.append([run.name, run.status[:60], *([""] * (len(COLUMNS) - 2))])
    return table([name for name, _ in COLUMNS], rows)


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
