"""The run's summary: each server's figures, their ratios to Kea, and the targets.

Pure functions over what the run measured. Every figure comes from this run; a target whose
figure the run did not measure says so instead of passing or failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.cpu import CpuRounds
from bench.figures import Startup
from bench.ladder import OVERLOAD_MULTIPLES, ServerRun, Step
from bench.recovered import Recovered
from bench.report import OURS, mb, table

REFERENCE = "kea"
CPU_RATE = 1000.0  # the step whose CPU per DORA the summary compares
START_LEASES = 60_000  # start to ready, and resident memory, on a /16 holding this many leases
STATUS_LEASES = 253  # `cocoon-net status` on a full /24

# The targets: each a bound on one figure of cocoon-net's, or on its ratio to Kea's.
LOSSLESS_VS_KEA = 0.8  # cocoon-net's lossless rate at least this times Kea's
CPU_VS_KEA = 1.5  # CPU per DORA at CPU_RATE at most this times Kea's
OVERLOAD_SHARE = 0.9  # goodput at each overload multiple, as a share of the lossless rate
RECOVERED_VS_NONE = 2.0  # DISCOVER p99 with recovered addresses over the p99 with none
START_MS = 3000.0
STATUS_MS = 100.0
IDLE_RSS_KIB = 40 * 1024
GENERATOR_VS_KEA = 1.5  # the generator offers at least this times Kea's lossless rate


@dataclass(frozen=True)
class Overload:
    offered: float  # the step's target rate: the lowest at least the multiple
    goodput: float
    share: float  # goodput / lossless rate
    generator_behind: bool
    # DISCOVERs went out under 99 % of the rate: the step did not offer the multiple.
    generator_short: bool = False


@dataclass(frozen=True)
class ServerFigures:
    """One server's figures from the ladder and the further figures of the same run."""

    name: str
    status: str
    lossless: float | None
    # Lossless at the highest step it was offered: its real limit lies higher.
    lossless_at_top: bool
    peak_goodput: float | None
    overload: dict[float, Overload | None]  # by multiple of the lossless rate
    cpu_ms_per_dora: float | None
    start_ms: float | None  # exec to ready with START_LEASES leases
    status_ms: float | None  # `cocoon-net status` with STATUS_LEASES leases
    idle_rss_kib: int | None  # right after ready on the /16 pool, before any client
    loaded_rss_kib: int | None  # right after ready with START_LEASES leases
    recovered_ratio: float | None
    peak_rss_kib: int | None
    worst_p99: dict[float, float]  # lossless steps: rate -> the worse of the two p99s
    # ACKs per second from the lossless step's first DISCOVER to its last ACK: below the
    # lossless rate when the receive queue took in part of the step and was worked off after.
    sustained: float | None = None


def overload_at(run: ServerRun, multiple: float) -> Overload | None:
    """Goodput at the lowest step offering at least `multiple` x the lossless rate."""
    lossless = run.lossless_rate
    if not lossless:
        return None
    step = run.step_at_least(multiple * lossless)
    if step is None:
        return None
    return Overload(
        step.target,
        step.goodput,
        step.goodput / lossless,
        step.generator_behind,
        step.generator_short,
    )


def _worst_p99(step: Step) -> float:
    lg = step.loadgen
    return float(max(lg["offer_latency"]["p99_ms"], lg["ack_latency"]["p99_ms"]))


def _sustained(run: ServerRun) -> float | None:
    lossless = run.lossless_rate
    step = None if lossless is None else run.step_at(lossless)
    return None if step is None else float(step.loadgen["achieved_rate"])


def collect(
    runs: Sequence[ServerRun],
    startups: Sequence[Startup],
    recovered: Sequence[Recovered],
    cpu: Sequence[CpuRounds] = (),
) -> list[ServerFigures]:
    """Each server's figures. CPU per DORA comes from the rounds measured apart from the
    ladder at CPU_RATE (bench/cpu.py) where the run has them, else from the ladder's step
    at that rate."""

    def startup(name: str, leases: int) -> Startup | None:
        return next(
            (s for s in startups if s.server == name and s.leases == leases and s.status == "ok"),
            None,
        )

    out = []
    for run in runs:
        big, small = startup(run.name, START_LEASES), startup(run.name, STATUS_LEASES)
        after_loss = next((r for r in recovered if r.server == run.name), None)
        rounds = next((c for c in cpu if c.server == run.name and c.plan.rate == CPU_RATE), None)
        if rounds is not None:
            cpu_ms = rounds.ms_per_dora
        else:
            cpu_step = run.step_at(CPU_RATE)
            cpu_ms = None if cpu_step is None else cpu_step.cpu_ms_per_dora
        top = max((s.target for s in run.steps), default=None)
        out.append(
            ServerFigures(
                name=run.name,
                status=run.status,
                lossless=run.lossless_rate,
                lossless_at_top=run.lossless_rate is not None and run.lossless_rate == top,
                peak_goodput=run.peak_goodput,
                overload={m: overload_at(run, m) for m in OVERLOAD_MULTIPLES},
                cpu_ms_per_dora=cpu_ms,
                start_ms=None if big is None else big.ready_ms,
                status_ms=None if small is None else small.status_ms,
                idle_rss_kib=run.idle_rss_kib,
                loaded_rss_kib=None if big is None else big.rss_kib,
                recovered_ratio=None if after_loss is None else after_loss.ratio,
                peak_rss_kib=run.peak_rss_kib,
                worst_p99={s.target: _worst_p99(s) for s in run.steps if s.lossless},
                sustained=_sustained(run),
            )
        )
    return out


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _lossless(f: ServerFigures) -> str:
    return "-" if f.lossless is None else ("≥ " if f.lossless_at_top else "") + f"{f.lossless:g}"


def _overload(o: Overload | None) -> str:
    if o is None:
        return "-"
    return f"{o.goodput:.0f} = {100 * o.share:.0f} % (at {o.offered:g})" + (
        " GB" if o.generator_behind else ""
    )


def summary_table(figs: Sequence[ServerFigures]) -> list[str]:
    header = [
        "server",
        "lossless /s",
        "sustained /s",
        "peak goodput /s",
        *(f"goodput at {m:g}x" for m in OVERLOAD_MULTIPLES),
        f"cpu ms/DORA at {CPU_RATE:g}",
        f"start {START_LEASES} ms",
        "status /24 ms",
        "idle RSS /16 MB",
        f"RSS {START_LEASES} leases MB",
        "recovered p99",
        "peak RSS MB",
        "note",
    ]
    rows = [
        [
            f.name,
            _lossless(f),
            _num(f.sustained),
            _num(f.peak_goodput),
            *(_overload(f.overload[m]) for m in OVERLOAD_MULTIPLES),
            _num(f.cpu_ms_per_dora, "{:.3f}"),
            _num(f.start_ms),
            _num(f.status_ms),
            mb(f.idle_rss_kib),
            mb(f.loaded_rss_kib),
            _num(f.recovered_ratio, "{:.2f}x"),
            mb(f.peak_rss_kib),
            f.status if f.status != "ok" else "",
        ]
        for f in figs
    ]
    return [
        *table(header, rows),
        "(sustained: ACKs per second from the lossless step's first DISCOVER to its last ACK, "
        "under the lossless rate when the receive queue took in part of that step; "
        "goodput at Nx: at the lowest step offering N x the lossless rate, as % of that rate; "
        "GB: the generator fell behind in that step; idle RSS /16: right after ready on the "
        "empty /16 pool; recovered p99: DISCOVER p99 with "
        "recovered addresses over the p99 with none)",
    ]


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio_lines(figs: Sequence[ServerFigures]) -> list[str]:
    """Every server over Kea from the same run: lossless rate and peak goodput (higher is
    better); CPU per DORA, start-up, status, RSS and p99 at the highest rate both served
    losslessly (lower is better); goodput under overload and the recovered p99 as each
    server's own shares, Kea's beside them. Without Kea, every server over cocoon-net."""
    ref = next((f for f in figs if f.name == REFERENCE and f.lossless is not None), None)
    if ref is None:
        ref = next((f for f in figs if f.name == OURS and f.lossless is not None), None)
    if ref is None:
        return [f"ratios: neither {REFERENCE} nor {OURS} has figures in this run"]
    # A reference lossless at its top may go faster: the ratio is an upper bound.
    bound = "≤ " if ref.lossless_at_top else ""
    lines = []
    for f in figs:
        if f is ref or f.peak_goodput is None:
            continue
        common = max(f.worst_p99.keys() & ref.worst_p99.keys(), default=None)
        p99 = (
            "no rate both served losslessly"
            if common is None
            else f"worst p99 at {common:g}/s "
            f"{_x(ratio(f.worst_p99[common], ref.worst_p99[common]))}"
        )
        overload = ", ".join(
            f"goodput at {m:g}x {_share(f.overload[m])} ({ref.name} {_share(ref.overload[m])})"
            for m in OVERLOAD_MULTIPLES
        )
        lines.append(
            f"{f.name} / {ref.name}: lossless rate {bound}{_x(ratio(f.lossless, ref.lossless))}, "
            f"peak goodput {_x(ratio(f.peak_goodput, ref.peak_goodput))}, {overload}, "
            f"cpu per DORA at {CPU_RATE:g}/s {_x(ratio(f.cpu_ms_per_dora, ref.cpu_ms_per_dora))}, "
            f"start with {START_LEASES} leases {_x(ratio(f.start_ms, ref.start_ms))}, "
            f"status on /24 {_num(f.status_ms)} ms ({ref.name} {_num(ref.status_ms)}), "
            f"idle RSS on /16 {_x(ratio(f.idle_rss_kib, ref.idle_rss_kib))}, "
            f"RSS with {START_LEASES} leases {_x(ratio(f.loaded_rss_kib, ref.loaded_rss_kib))}, "
            f"recovered p99 {_x(f.recovered_ratio)} of its own with none "
            f"({ref.name} {_x(ref.recovered_ratio)}), {p99}, "
            f"peak RSS {_x(ratio(f.peak_rss_kib, ref.peak_rss_kib))}"
        )
    return lines


def behind_lines(runs: Sequence[ServerRun]) -> list[str]:
    behind = [f"{r.name} {s.target:g}/s" for r in runs for s in r.steps if s.generator_behind]
    if not behind:
        return []
    return [
        "the generator fell behind (these steps measured it, not the server): " + ", ".join(behind)
    ]


def generator_share(step: Step) -> float:
    """The generator's CPU in the step over the time it spent sending DISCOVERs, as a share of
    its core: an upper bound of its load while it sent (the CPU also covers the replies it
    read after the last DISCOVER)."""
    lg = step.loadgen
    sending = float(lg["send_seconds"])
    return float(lg["loadgen_cpu_seconds"]) / sending if sending > 0 else 0.0


def generator_lines(runs: Sequence[ServerRun]) -> list[str]:
    """The generator's own CPU at each server's lossless rate (per exchange) and at its
    heaviest overload step (share of its core while sending). Well below a whole core, one
    generator process can offer the load, and a late or short step was other work on its
    core; a second process could only run on the server's core."""
    lines = []
    for run in runs:
        lossless = None if run.lossless_rate is None else run.step_at(run.lossless_rate)
        top = None if run.lossless_rate is None else overload_at(run, max(OVERLOAD_MULTIPLES))
        heaviest = None if top is None else run.step_at(top.offered)
        if lossless is None or heaviest is None:
            continue
        per_exchange = float(lossless.loadgen["loadgen_cpu_seconds"]) / lossless.loadgen["clients"]
        lines.append(
            f"generator with {run.name}: {per_exchange * 1e6:.0f} us of its CPU per exchange at "
            f"{lossless.target:g}/s (lossless), {100 * generator_share(heaviest):.0f} % of its "
            f"core at {heaviest.target:g}/s (DISCOVERs sent at "
            f"{heaviest.loadgen['discover_rate']:.0f}/s, {heaviest.goodput:.0f}/s completed)"
        )
    return lines


def _share(o: Overload | None) -> str:
    return "-" if o is None else f"{100 * o.share:.0f} %"


@dataclass(frozen=True)
class Target:
    what: str
    measured: str
    met: bool | None  # None: this run did not measure it

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT MET", None: "not measured"}[self.met]


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def evaluate(figs: Sequence[ServerFigures], runs: Sequence[ServerRun]) -> list[Target]:
    """cocoon-net's targets, each with what this run measured and whether it met it."""
    by_name = {f.name: f for f in figs}
    ours, kea = by_name.get(OURS), by_name.get(REFERENCE)
    targets = [_lossless_target(ours, kea)]

    ours_cpu = None if ours is None else ours.cpu_ms_per_dora
    kea_cpu = None if kea is None else kea.cpu_ms_per_dora
    cpu = ratio(ours_cpu, kea_cpu)
    targets.append(
        Target(
            f"cpu per DORA at {CPU_RATE:g}/s ≤ {CPU_VS_KEA:g}x Kea's",
            f"{_num(ours_cpu, '{:.3f}')} ms vs {_num(kea_cpu, '{:.3f}')} ms: {_x(cpu)}",
            _at_most(cpu, CPU_VS_KEA),
        )
    )
    for m in OVERLOAD_MULTIPLES:
        targets.append(_overload_target(m, None if ours is None else ours.overload[m]))
    rec = None if ours is None else ours.recovered_ratio
    targets.append(
        Target(
            f"DISCOVER p99 with recovered addresses ≤ {RECOVERED_VS_NONE:g}x the p99 with none",
            _x(rec),
            _at_most(rec, RECOVERED_VS_NONE),
        )
    )
    start = None if ours is None else ours.start_ms
    status = None if ours is None else ours.status_ms
    rss = None if ours is None else ours.idle_rss_kib
    targets += [
        Target(
            f"start with {START_LEASES} leases ≤ {START_MS:g} ms",
            f"{_num(start)} ms",
            _at_most(start, START_MS),
        ),
        Target(
            f"status on a /24 ≤ {STATUS_MS:g} ms", f"{_num(status)} ms", _at_most(status, STATUS_MS)
        ),
        Target(
            f"idle RSS on a /16 pool ≤ {mb(IDLE_RSS_KIB)} MB",
            f"{mb(rss)} MB",
            _at_most(rss, IDLE_RSS_KIB),
        ),
    ]
    targets.append(_generator_target(kea, runs))
    return targets


def _overload_target(multiple: float, o: Overload | None) -> Target:
    """Judged where the step offered the multiple; a step the generator sent in bursts is
    judged (bursts only make it harder) and says so."""
    what = f"goodput at {multiple:g}x its lossless rate ≥ {100 * OVERLOAD_SHARE:.0f} % of it"
    if o is None:
        return Target(what, "-", None)
    measured = f"{o.goodput:.0f}/s at {o.offered:g}/s offered: {100 * o.share:.0f} %"
    if o.generator_short:
        return Target(what, measured + " (the generator could not send the rate)", None)
    note = " (generator behind)" if o.generator_behind else ""
    return Target(what, measured + note, o.share >= OVERLOAD_SHARE)


def _lossless_target(ours: ServerFigures | None, kea: ServerFigures | None) -> Target:
    what = f"lossless rate ≥ {LOSSLESS_VS_KEA:g}x Kea's"
    if ours is None or kea is None or kea.lossless is None:
        return Target(what, "-", None)
    value = ratio(ours.lossless, kea.lossless)
    measured = f"{_lossless(ours)}/s vs {_lossless(kea)}/s: " + (
        "-" if value is None else f"{value:.2f}x"
    )
    if value is None:  # cocoon-net had no lossless step
        return Target(what, measured, False)
    if value >= LOSSLESS_VS_KEA and kea.lossless_at_top:
        # Kea might go faster than the ladder asked: the ratio is only an upper bound.
        return Target(what, measured + " (Kea lossless at its top step)", None)
    if value < LOSSLESS_VS_KEA and ours.lossless_at_top:
        return Target(what, measured + " (cocoon-net lossless at its top step)", None)
    return Target(what, measured, value >= LOSSLESS_VS_KEA)


def _generator_target(kea: ServerFigures | None, runs: Sequence[ServerRun]) -> Target:
    """Some step at or above 1.5 x Kea's lossless rate had its DISCOVERs sent at the full rate.
    Not measured when no step asked that much (Kea lossless at its top asks for more)."""
    what = f"generator offers ≥ {GENERATOR_VS_KEA:g}x Kea's lossless rate"
    if kea is None or kea.lossless is None:
        return Target(what, "-", None)
    need = GENERATOR_VS_KEA * kea.lossless
    asked = [s for r in runs for s in r.steps if s.target >= need]
    full = [s.target for r in runs for s in r.steps if not s.generator_short]
    measured = f"DISCOVERs at the full rate up to {max(full, default=0):g}/s, {need:g}/s needed"
    if not asked:
        return Target(what, measured + " (no step asked that much)", None)
    return Target(what, measured, any(not s.generator_short for s in asked))


def target_lines(targets: Sequence[Target], runs: Sequence[ServerRun]) -> list[str]:
    steps = [s for r in runs for s in r.steps]
    behind = sum(1 for s in steps if s.generator_behind)
    width = max((len(t.verdict) for t in targets), default=0)
    return [
        f"(the generator fell behind in {behind} of the {len(steps)} ladder steps"
        + ("; the machine was busy: see other % and the load average)" if behind else ")"),
        *(f"{t.verdict:<{width}}  {t.what}: {t.measured}" for t in targets),
    ]
