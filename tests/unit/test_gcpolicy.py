"""The daemon's collector policy, on this process's real collector (restored after each test)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cocoon_net.gcpolicy import THAW_SECONDS, YOUNG_THRESHOLD, Collector


class Node:
    """A container that can be put in a reference cycle and watched for its end."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    yield Clock()
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


def test_start_freezes_what_lives_and_collects_the_young_less_often(clock: Clock) -> None:
    collector = Collector(clock)
    kept = [Node() for _ in range(100)]
    collector.start()
    try:
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.isenabled()
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] != YOUNG_THRESHOLD


def test_a_full_collection_frees_garbage_first_then_freezes_what_survived(clock: Clock) -> None:
    collector = Collector(clock)
    collector.start()
    try:
        frozen = gc.get_freeze_count()
        kept = [Node() for _ in range(1000)]
        garbage = cycle()
        gc.collect()
        assert garbage() is None  # collected, never frozen
        assert gc.get_freeze_count() >= frozen + len(kept)
        gc.collect(1)  # a younger collection freezes nothing
        survivors = [Node() for _ in range(1000)]
        gc.collect(1)
        assert gc.get_freeze_count() < frozen + len(kept) + len(survivors)
    finally:
        collector.stop()


def test_a_cycle_of_frozen_objects_is_freed_after_the_thaw(clock: Clock) -> None:
    collector = Collector(clock)
    a, b = Node(), Node()
    a.other, b.other = b, a
    watch = weakref.ref(a)
    collector.start()  # a and b are alive: frozen
    try:
        del a, b  # a cycle, garbage now, but frozen: no collection sees it
        gc.collect()
        assert watch() is not None
        clock.now += THAW_SECONDS - 1
        assert not collector.thaw_if_due()
        gc.collect()
        assert watch() is not None
        clock.now += 1
        assert collector.thaw_if_due()
        gc.collect()
        assert watch() is None
        assert not collector.thaw_if_due()  # the next one is THAW_SECONDS later
    finally:
        collector.stop()
