"""The bench's ladder rule: which rates a server is offered, and when its ladder ends."""

from __future__ import annotations

from collections.abc import Callable

from bench.ladder import LadderConfig, ServerRun, Step, lossless_rate, next_rate

from tests.support.benchsteps import step

FULL = (1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0, 10000.0, 12000.0)


def config(rates: tuple[float, ...] = FULL, max_rate: float = 30_000.0) -> LadderConfig:
    return LadderConfig(
        rates=rates,
        seconds=1.2,
        min_clients=200,
        grace=2.0,
        ready_timeout=10.0,
        pool_size=65_000,
        max_rate=max_rate,
    )


def climb(cfg: LadderConfig, outcome: Callable[[float], Step], limit: int = 50) -> list[float]:
    """The rates the ladder offers a server whose step at each rate is `outcome(rate)`."""
    steps: list[Step] = []
    while (rate := next_rate(steps, cfg)) is not None:
        steps.append(outcome(rate))
        assert len(steps) < limit, [s.target for s in steps]
    return [s.target for s in steps]


def capacity(limit: float, past: float = 0.5) -> Callable[[float], Step]:
    """A server lossless up to `limit` that completes `past` of the exchanges above it."""
    return lambda rate: step(rate) if rate <= limit else step(rate, past)


def test_lossless_rate_is_the_highest_step_below_the_first_lossy_one() -> None:
    steps = [step(1000), step(2000), step(3000, 0.98), step(4000)]
    assert lossless_rate(steps) == 2000
    assert lossless_rate([step(1000, 0.5)]) is None
    # 99 % completed at 99 % of the rate is lossless; less of either is not.
    assert lossless_rate([step(1000, 0.99)]) == 1000
    assert lossless_rate([step(1000, 1.0, sent_share=0.98)]) is None


def test_the_ladder_offers_exactly_2x_and_3x_the_lossless_rate_past_the_listed_rates() -> None:
    rates = climb(config(), capacity(8000))
    assert rates == [*FULL, 16000, 24000]


def test_a_multiple_between_listed_rates_is_offered_in_order() -> None:
    # Lossless 5000: 2x is listed (10000), 3x is 15000, past the list.
    assert climb(config(), capacity(5000)) == [*FULL, 15000]
    # Lossless 3000: 9000 goes between 8000 and 10000.
    assert climb(config(), capacity(3000)) == [
        1000, 2000, 3000, 4000, 5000, 6000, 8000, 9000, 10000, 12000,
    ]  # fmt: skip


def test_no_multiple_above_the_cap() -> None:
    # Lossless 12000 is found past the list (15000 loses); 2x = 24000, 3x = 36000 > 30000.
    assert climb(config(), capacity(12000)) == [*FULL, 15000, 24000]
    assert climb(config(max_rate=20_000), capacity(8000)) == [*FULL, 16000]


def test_the_knee_is_looked_for_past_the_listed_rates_up_to_the_cap() -> None:
    assert climb(config(), capacity(100_000)) == [*FULL, 15000, 19000, 24000, 30000]


def test_no_extension_without_a_cap() -> None:
    assert climb(config(max_rate=0), capacity(8000)) == list(FULL)


def test_the_generator_ceiling_ends_the_extension() -> None:
    def server(rate: float) -> Step:
        if rate >= 16000:  # the generator sends at most 15,000 DISCOVERs/s
            return step(rate, 0.5, sent_share=15000 / rate)
        return capacity(8000)(rate)

    assert climb(config(), server) == [*FULL, 16000]
    # A listed rate still runs after a short step; only the extension stops.
    short_at_2000 = climb(
        config(rates=(1000, 2000, 3000)),
        lambda r: step(r, 1.0, sent_share=0.9) if r == 2000 else step(r),
    )
    assert short_at_2000 == [1000, 2000, 3000]


def test_a_saturated_step_ends_the_ladder_once_3x_was_offered() -> None:
    # Lossless 2000, and every step above it loses more than half.
    assert climb(config(), capacity(2000, past=0.3)) == [1000, 2000, 3000, 4000, 5000, 6000]
    # Nothing lossless: the first saturated step ends it.
    assert climb(config(), capacity(0, past=0.3)) == [1000]


def test_a_sparse_ladder_goes_back_for_the_multiples_it_skipped() -> None:
    # 1000 lossless, 6000 lossy: 2000 and 3000 are run next; 2000 lossless makes 4000 and
    # 6000 the multiples, and so on.
    rates = climb(config(rates=(1000, 6000), max_rate=0), capacity(2500, past=0.6))
    assert rates[:2] == [1000, 6000]
    run = ServerRun("x", steps=[capacity(2500, past=0.6)(r) for r in rates])
    lossless = run.lossless_rate
    assert lossless == 2000
    assert {2 * lossless, 3 * lossless} <= set(rates)
