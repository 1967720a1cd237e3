"""The per-MAC token bucket: burst, refill, independence of clients, bounded memory."""

from __future__ import annotations

from cocoon_net.dhcp.ratelimit import RateLimiter

MAC = "02:00:00:00:00:01"


def test_burst_then_refill_at_rate() -> None:
    rl = RateLimiter(rate=2.0, burst=3, max_clients=10)
    assert [rl.allow(MAC, 100.0) for _ in range(4)] == [True, True, True, False]
    assert not rl.allow(MAC, 100.4)  # 0.8 token: not yet
    assert rl.allow(MAC, 100.5)  # one token after half a second at 2/s
    assert not rl.allow(MAC, 100.5)
    assert [rl.allow(MAC, 200.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_clients_do_not_share_a_bucket() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_clients=10)
    assert rl.allow(MAC, 0.0)
    assert not rl.allow(MAC, 0.0)
    assert rl.allow("02:00:00:00:00:02", 0.0)


def test_clock_stepping_back_refills_nothing() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_clients=10)
    assert rl.allow(MAC, 50.0)
    assert not rl.allow(MAC, 10.0)


def test_memory_is_bounded_and_idle_buckets_go_first() -> None:
    rl = RateLimiter(rate=1.0, burst=2, max_clients=3)
    rl.allow("busy", 0.0)
    rl.allow("busy", 0.0)  # empty bucket
    for i in range(50):
        rl.allow(f"flood-{i}", 0.0)
        assert len(rl) <= 3
    # The flood evicts least recently seen buckets; the busy one was evicted along the way
    # and restarts full: the one approximation, documented in the module.
    assert len(rl) == 3
    rl2 = RateLimiter(rate=1.0, burst=2, max_clients=2)
    rl2.allow("busy", 99.0)
    rl2.allow("busy", 99.0)  # empty at 99, one token back by 100
    rl2.allow("idle", 0.0)  # seen last, but full again by 100
    rl2.allow("new", 100.0)  # over the cap: the idle bucket goes, not the least recent
    assert len(rl2) == 2
    assert [rl2.allow("busy", 100.0), rl2.allow("busy", 100.0)] == [True, False]
