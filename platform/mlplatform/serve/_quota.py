"""Per-key request quotas: a token bucket per key, in each ingress replica.

Why per replica, divided: a key's quota (rate r requests/s, burst b) is split evenly over
the N running ingress replicas, each enforcing r/N with a bucket of max(1, b/N). Sharing
one bucket (a Ray actor, or a file) would put a cross-process call on every request's
path and a single point of failure in front of every prediction; a divided local bucket
costs nothing per request. It is honest because Serve's proxy spreads requests over the
ingress replicas (power of two choices), so each sees about 1/N of a key's traffic:
the sustained rate a key gets across the application is r. What it costs:
  - a client whose requests happen to pile onto one replica sees 429 a little early;
  - the burst rounds up to one request per replica, so with b < N a key may burst to N;
  - N comes from the replica poller (every 1-5 s): after a scale-up the old share holds
    for one poll (the key gets less than r for a few seconds); a fresh replica enforces
    the whole quota until its first poll answers (about a second after its first request).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlplatform.errors import ApiKeyError


@dataclass(frozen=True)
class Quota:
    """A key's request quota: `rate` requests/s sustained, bursts of up to `burst` requests."""

    rate: float
    burst: int

    @classmethod
    def of(cls, rate: float, burst: int | None = None) -> Quota:
        """Validated quota; `burst` defaults to one second's worth of requests (at least 1).

        Raises:
            ApiKeyError: rate not > 0 or burst < 1.
        """
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            rate = math.nan
        if not math.isfinite(rate) or rate <= 0:
            raise ApiKeyError(f"Got {rate!r} for `rate`; must be a number of requests per second > 0, e.g. 10.")
        burst = max(1, math.ceil(rate)) if burst is None else burst
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ApiKeyError(f"Got {burst!r} for `burst`; must be a whole number of requests >= 1.")
        return cls(rate, burst)

    def describe(self) -> str:
        return f"{self.rate:g} requests/s (burst {self.burst})"


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; each request takes one."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity, self.tokens, self.t = rate, capacity, capacity, now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there (nothing taken)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def resize(self, rate: float, capacity: float, now: float) -> None:
        """New rate and capacity; tokens already earned are kept (up to the new capacity)."""
        self._refill(now)
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.t) * self.rate)
        self.t = now


class QuotaLimiter:
    """One replica's buckets, one per key that has a quota; its share is 1/`replicas` of each quota.

    Buckets exist only for keys that passed authentication, so forged keys cannot grow it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.replicas = 1
        self._buckets: dict[str, tuple[Quota, int, TokenBucket]] = {}  # key id → (quota, replicas, bucket)

    def set_replicas(self, n: int) -> None:
        """How many ingress replicas share each quota (buckets follow on their next request)."""
        self.replicas = max(1, int(n))

    def take(self, key_id: str, quota: Quota | None) -> float:
        """0.0 if `key_id` may make a request now, else the seconds to wait (Retry-After)."""
        if quota is None:
            return 0.0
        now, n = self.clock(), self.replicas
        rate, capacity = quota.rate / n, max(1.0, quota.burst / n)
        held = self._buckets.get(key_id)
        if held is None:
            bucket = TokenBucket(rate, capacity, now)
        else:
            bucket = held[2]
            if held[0] != quota or held[1] != n:  # the key's quota was edited, or replicas scaled
                bucket.resize(rate, capacity, now)
        self._buckets[key_id] = (quota, n, bucket)
        return bucket.take(now)


def retry_after_header(wait_s: float) -> str:
    """Retry-After in whole seconds (RFC 9110), rounded up so a client that obeys it succeeds."""
    return str(max(1, math.ceil(wait_s)))
