"""How the daemon's cyclic garbage collector runs.

The daemon's long-lived objects are its leases (a few per address: the table's record, the
journal's copy of it, the address) and the pool; none of them is ever part of a reference
cycle, so reference counting frees every one that is dropped. Yet each full collection walks
all of them: under a boot storm, with tens of thousands of leases made since the start, that
was about a tenth of the server's CPU, for nothing found. So:

- what start-up built is frozen (`gc.freeze`) before serving, and whatever a full collection
  leaves alive is frozen after it: later collections walk only what was made since;
- the youngest generation is collected after YOUNG_THRESHOLD allocations instead of 700:
  a DHCP exchange's short-lived objects are freed by reference counting long before then,
  and the fewer passes over the survivors cost less in all;
- every THAW_SECONDS the frozen objects go back to the collector (`gc.unfreeze`), and the
  next full collection walks them all once: a cycle that was made of objects alive at a
  freeze and became garbage later is freed then, so memory stays bounded.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

YOUNG_THRESHOLD = 20_000
THAW_SECONDS = 3600.0


class Collector:
    """start() once the daemon serves, thaw_if_due() now and then, stop() before exiting."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._thawed = clock()
        self._thresholds = gc.get_threshold()

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, *self._thresholds[1:])
        gc.callbacks.append(self._after)
        self._thawed = self._clock()
        gc.enable()

    def thaw_if_due(self) -> bool:
        """Give the frozen objects back to the collector if THAW_SECONDS have passed since
        the last time; True when it did."""
        now = self._clock()
        if now - self._thawed < THAW_SECONDS:
            return False
        self._thawed = now
        gc.unfreeze()
        return True

    def stop(self) -> None:
        if self._after in gc.callbacks:
            gc.callbacks.remove(self._after)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    @staticmethod
    def _after(phase: str, info: dict[str, Any]) -> None:
        # After a full collection, everything still tracked is alive: freeze it.
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()
