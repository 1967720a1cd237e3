"""Per-client token buckets: a VM that floods the DHCP port is answered at a bounded rate.

Pure bookkeeping: the caller passes `now`, nothing reads a clock. Memory is bounded: at most
`max_clients` buckets are kept. A bucket that has refilled to `burst` behaves exactly like a
fresh one, so such idle buckets are dropped first; only if every bucket is busy is the least
recently seen one dropped (it then restarts full, the only approximation made).
"""

from __future__ import annotations

from cocoon_net.dhcp.settings import DhcpSettings

# (tokens, when they were counted): a tuple, as every packet makes a new one.
_Bucket = tuple[float, float]


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_clients: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        # Insertion order is recency order: allow() re-inserts the key it touches.
        self._buckets: dict[str, _Bucket] = {}

    @classmethod
    def from_settings(cls, settings: DhcpSettings) -> RateLimiter:
        return cls(settings.rate_per_second, settings.rate_burst, settings.rate_max_clients)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, bucket: _Bucket, now: float) -> float:
        # A clock that stepped back refills nothing rather than going negative.
        tokens, stamp = bucket
        elapsed = max(0.0, now - stamp)
        return min(self.burst, tokens + elapsed * self.rate)

    def allow(self, key: str, now: float) -> bool:
        """Take one token for `key`; False when its bucket is empty."""
        bucket = self._buckets.pop(key, None)
        tokens = self.burst if bucket is None else self._tokens(bucket, now)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._evict(now)
        return allowed

    def _evict(self, now: float) -> None:
        idle = [key for key, b in self._buckets.items() if self._tokens(b, now) >= self.burst]
        for key in idle:
            del self._buckets[key]
        while len(self._buckets) > self.max_clients:
            del self._buckets[next(iter(self._buckets))]
