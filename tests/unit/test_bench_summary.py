"""The bench's summary: figures gathered per server, and each target judged from them."""

from __future__ import annotations

import dataclasses
import secrets
from ipaddress import IPv4Address

import pytest
from bench.cpu import FULL, CpuRounds
from bench.cpu import SMOKE as CPU_SMOKE
from bench.figures import Startup
from bench.ladder import ServerRun, Step
from bench.loadgen import RequestTemplate, client_macs, request_frame
from bench.recovered import SMOKE, Recovered
from bench.summary import (
    Overload,
    ServerFigures,
    Target,
    collect,
    evaluate,
    generator_share,
    overload_at,
)

from cocoon_net.dhcp.model import Opt
from tests.support.benchsteps import step


def figures(name: str, **changes: object) -> ServerFigures:
    """A server that meets every target (cocoon-net) or matches cocoon-net (Kea)."""
    base = ServerFigures(
        name=name,
        status="ok",
        lossless=8000.0,
        lossless_at_top=False,
        peak_goodput=9000.0,
        overload={
            2.0: Overload(16000.0, 8000.0, 1.0, False),
            3.0: Overload(24000.0, 7200.0, 0.9, False),
        },
        cpu_ms_per_dora=0.15,
        start_ms=3000.0,
        status_ms=100.0,
        idle_rss_kib=40 * 1024,
        loaded_rss_kib=60_000,
        recovered_ratio=2.0,
        peak_rss_kib=50_000,
        worst_p99={},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def kea(**changes: object) -> ServerFigures:
    return figures("kea", cpu_ms_per_dora=0.10, **changes)


def verdicts(ours: ServerFigures, ref: ServerFigures, runs: list[ServerRun]) -> list[bool | None]:
    return [t.met for t in evaluate([ref, ours], runs)]


def generator_runs(top: float = 16000.0) -> list[ServerRun]:
    return [ServerRun("kea", steps=[step(8000), step(top, 0.5)])]


def target(what: str, ours: ServerFigures, ref: ServerFigures | None = None) -> Target:
    ref = kea() if ref is None else ref
    found = [t for t in evaluate([ref, ours], generator_runs()) if t.what.startswith(what)]
    assert len(found) == 1, what
    return found[0]


def test_every_target_met_at_its_bound() -> None:
    ours = figures("cocoon-net", lossless=6400.0)  # 0.8x Kea's 8000
    assert verdicts(ours, kea(), generator_runs()) == [True] * 9


@pytest.mark.parametrize(
    ("what", "changes"),
    [
        ("lossless rate", {"lossless": 6300.0}),
        ("cpu per DORA", {"cpu_ms_per_dora": 0.151}),
        (
            "goodput at 2x",
            {
                "overload": {
                    2.0: Overload(16000.0, 7100.0, 0.89, False),
                    3.0: Overload(24000.0, 7200.0, 0.9, False),
                }
            },
        ),
        (
            "goodput at 3x",
            {
                "overload": {
                    2.0: Overload(16000.0, 8000.0, 1.0, False),
                    3.0: Overload(24000.0, 7100.0, 0.89, False),
                }
            },
        ),
        ("DISCOVER p99", {"recovered_ratio": 2.01}),
        ("start with 60000 leases", {"start_ms": 3001.0}),
        ("status on a /24", {"status_ms": 101.0}),
        ("idle RSS", {"idle_rss_kib": 40 * 1024 + 1}),
    ],
)
def test_each_target_missed_just_past_its_bound(what: str, changes: dict[str, object]) -> None:
    assert target(what, figures("cocoon-net", **changes)).met is False
    assert target(what, figures("cocoon-net")).met is True


def test_an_overload_step_the_generator_could_not_send_measures_nothing() -> None:
    short = Overload(24000.0, 9000.0, 1.1, True, generator_short=True)
    ours = figures("cocoon-net", overload={2.0: short, 3.0: short})
    assert target("goodput at 2x", ours).met is None
    bursts = Overload(24000.0, 7100.0, 0.89, True, generator_short=False)
    ours = figures("cocoon-net", overload={2.0: bursts, 3.0: bursts})
    assert target("goodput at 2x", ours).met is False


@pytest.mark.parametrize(
    ("what", "changes"),
    [
        ("cpu per DORA", {"cpu_ms_per_dora": None}),
        ("goodput at 2x", {"overload": {2.0: None, 3.0: None}}),
        ("DISCOVER p99", {"recovered_ratio": None}),
        ("start with", {"start_ms": None}),
        ("status on", {"status_ms": None}),
        ("idle RSS", {"idle_rss_kib": None}),
    ],
)
def test_a_figure_the_run_did_not_measure_is_neither_met_nor_missed(
    what: str, changes: dict[str, object]
) -> None:
    assert target(what, figures("cocoon-net", **changes)).met is None


def test_lossless_ratio_against_a_bound_is_judged_only_where_the_bound_decides() -> None:
    # Kea lossless at its top step: its limit may lie higher, so 1.0x proves nothing...
    assert target("lossless", figures("cocoon-net"), kea(lossless_at_top=True)).met is None
    # ...but 0.5x of a lower bound is below 0.8x of the real rate too.
    half = figures("cocoon-net", lossless=4000.0)
    assert target("lossless", half, kea(lossless_at_top=True)).met is False
    # cocoon-net at its own top: 0.5x of Kea might be more.
    assert target("lossless", dataclasses.replace(half, lossless_at_top=True)).met is None
    # No lossless step at all: missed.
    assert target("lossless", figures("cocoon-net", lossless=None)).met is False


def test_the_generator_target_needs_a_step_at_full_rate_at_1_5x_kea() -> None:
    ours, ref = figures("cocoon-net"), kea()  # Kea lossless 8000: 12000 needed

    def generator(runs: list[ServerRun]) -> bool | None:
        return evaluate([ref, ours], runs)[-1].met

    assert generator(generator_runs(12000.0)) is True
    assert generator(generator_runs(11000.0)) is None  # no step asked that much
    short = ServerRun("kea", steps=[step(8000), step(16000, 0.5, sent_share=0.9)])
    assert generator([short]) is False


def test_overload_is_read_at_the_lowest_step_offering_the_multiple() -> None:
    run = ServerRun(
        "cocoon-net",
        steps=[step(4000), step(5000, 0.9), step(8000, 0.8), step(12000, 0.5), step(16000, 0.4)],
    )
    got = overload_at(run, 3.0)  # lossless 4000: 12000 and up
    assert got == Overload(12000.0, 6000.0, 1.5, False)
    assert overload_at(run, 5.0) is None  # no step offered 20000


def test_collect_takes_start_up_from_60000_leases_and_status_from_a_full_24() -> None:
    run = ServerRun("cocoon-net", idle_rss_kib=38_000, steps=[step(1000), step(2000, 0.5)])
    startups = [
        Startup("cocoon-net", 253, "ok", ready_ms=300.0, rss_kib=30_000, status_ms=80.0),
        Startup("cocoon-net", 60_000, "ok", ready_ms=3100.0, rss_kib=50_000, status_ms=900.0),
        Startup("kea", 60_000, "ok", ready_ms=600.0, rss_kib=45_000),
    ]
    held = dataclasses.replace(step(1000), loadgen={**step(1000).loadgen})
    held.loadgen["offer_latency"] = {**held.loadgen["offer_latency"], "p99_ms": 3.0}
    slower = dataclasses.replace(held, loadgen={**held.loadgen})
    slower.loadgen["offer_latency"] = {**held.loadgen["offer_latency"], "p99_ms": 9.0}
    after_loss = Recovered("cocoon-net", "ok", SMOKE, 100, (step(1000),), (slower, held))
    (got,) = collect([run], startups, [after_loss])
    assert (got.start_ms, got.loaded_rss_kib, got.status_ms) == (3100.0, 50_000, 80.0)
    assert got.idle_rss_kib == 38_000  # the target is the idle daemon on the empty /16 pool
    # The lowest p99 of each side's rounds: 3.0 ms over the 2.0 ms of `step`.
    assert got.recovered_ratio == pytest.approx(1.5)
    assert got.cpu_ms_per_dora == pytest.approx(0.5 * 1.2 / 1000 * 1000)
    assert (got.lossless, got.lossless_at_top) == (1000.0, False)


def cpu_step(percent: float) -> Step:
    """A 1,000/s step of 5 s whose server used `percent` of a core over its window."""
    return dataclasses.replace(step(5000), server_cpu_pct=percent, window_seconds=5.0)


def test_cpu_per_dora_is_the_median_of_the_rounds_measured_apart_from_the_ladder() -> None:
    run = ServerRun("cocoon-net", steps=[step(1000)])  # 0.6 ms a DORA in the ladder
    rounds = CpuRounds("cocoon-net", "ok", FULL, (cpu_step(30), cpu_step(90), cpu_step(40)))
    (got,) = collect([run], [], [], [rounds])
    assert got.cpu_ms_per_dora == pytest.approx(0.4)  # 40 % of 5 s over 5,000 ACKs
    # Rounds at another rate (the smoke run's) are not the target's: the ladder's step is.
    (ladder,) = collect([run], [], [], [dataclasses.replace(rounds, plan=CPU_SMOKE)])
    assert ladder.cpu_ms_per_dora == pytest.approx(0.6)
    # A server whose rounds failed has no figure, rather than the ladder's in their place.
    (failed,) = collect([run], [], [], [dataclasses.replace(rounds, status="failed: gone")])
    assert failed.cpu_ms_per_dora is None
    unanswered = dataclasses.replace(step(5000, 0.0), window_seconds=5.0)
    (none,) = collect([run], [], [], [dataclasses.replace(rounds, steps=(unanswered,))])
    assert none.cpu_ms_per_dora is None


def test_the_sustained_rate_is_the_lossless_steps_acks_over_its_busy_time() -> None:
    """A step the queue absorbed part of is lossless at its target, yet its ACKs came over
    more than its offered time: the summary says how many a second, beside the target."""
    absorbed = step(2000)
    absorbed = dataclasses.replace(
        absorbed, loadgen={**absorbed.loadgen, "busy_seconds": 1.25, "achieved_rate": 1599.2}
    )
    run = ServerRun("cocoon-net", steps=[step(1000), absorbed, step(3000, 0.5)])
    (got,) = collect([run], [], [])
    assert got.lossless == 2000.0
    assert got.sustained == 1599.2
    (nothing,) = collect([ServerRun("kea", steps=[step(1000, 0.5)])], [], [])
    assert nothing.sustained is None


def test_request_template_patches_the_frame_request_frame_builds() -> None:
    for _ in range(500):
        mac, xid = client_macs(1)[0], secrets.randbits(32)
        offered, server_id = secrets.token_bytes(4), secrets.token_bytes(4)
        filled = RequestTemplate(mac, xid).fill(offered, server_id)
        assert filled == request_frame(mac, xid, IPv4Address(offered), server_id)
    # A MAC ending in an option's code and length, then chaddr's zero padding, is no option.
    for code in (Opt.SERVER_ID, Opt.REQUESTED_IP):
        mac = bytes([0x02, 0x11, 0x22, 0x33, code, 4])
        filled = RequestTemplate(mac, 7).fill(b"\x0a\0\0\x09", b"\x0a\0\0\x01")
        assert filled == request_frame(mac, 7, IPv4Address("10.0.0.9"), b"\x0a\0\0\x01")


def test_generator_share_is_its_cpu_over_the_time_it_sent() -> None:
    busy = step(24000, 0.3)
    busy.loadgen.update(send_seconds=1.2, busy_seconds=1.5, loadgen_cpu_seconds=0.6)
    assert generator_share(busy) == pytest.approx(0.5)
