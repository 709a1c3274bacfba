"""GCRA (the generic cell rate algorithm): a rate limit held as one number per bucket, its theoretical arrival
time (TAT). The in-process storage here and the Redis Lua script in ``limits/redis.py`` implement exactly
this; a test runs the same sequences through both.

A bucket lets ``limit`` units through per ``period`` after a burst of up to ``burst`` at once. In time units:
each unit costs ``interval = period / limit``; the bucket tolerates a TAT up to ``tolerance = burst * interval``
ahead of now. A request of ``cost`` units at ``now``:

    tat      = max(stored TAT, now)
    new_tat  = tat + cost * interval
    allow_at = new_tat - tolerance          # the request may pass once now >= allow_at
    allowed  : now >= allow_at              → the TAT becomes new_tat (kept until it is in the past)
    remaining: whole units that could still pass now
    reset    : time until the bucket is full again (its TAT reaches now)
    retry    : time until this request could pass (0 when allowed)

A request is checked against several buckets (key, tenant, model, gateway; requests and tokens) at once and
is admitted only if every bucket allows it; then all are charged, otherwise none (``check``). After the call
the token buckets are corrected by the difference between the estimate and the actual usage (``settle``:
always applied, a negative cost gives time back, never below now). Times are microseconds, as floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

EPSILON_US = 0.001
"""Float arithmetic on times near 1.7e15 µs is exact to a fraction of a µs; comparisons allow a nanosecond
(and unit counts a millionth) so a bucket refilled to the exact instant is not judged a rounding error short."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket and what this request asks of it. ``interval_us`` already has the adaptive multiplier in it."""

    key: str
    interval_us: float
    tolerance_us: float
    cost: float

    @staticmethod
    def of(key: str, limit: float, burst: float, cost: float, period_s: float = 60.0) -> Bucket:
        interval = period_s * 1e6 / limit
        return Bucket(key, interval, burst * interval, cost)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    remaining: int
    reset_us: int
    retry_us: int


class Storage(Protocol):
    """Where TATs live: in this process (``MemoryStorage``) or in Redis (``RedisStorage``)."""

    name: str

    async def check(self, buckets: Sequence[Bucket]) -> list[Verdict]:
        """Admit all or none; a verdict per bucket."""
        ...

    async def settle(self, buckets: Sequence[Bucket]) -> None:
        """Apply each bucket's cost (negative: give back) unconditionally."""
        ...

    async def close(self) -> None: ...


def decide(tat: float | None, now: float, bucket: Bucket) -> tuple[Verdict, float]:
    """The verdict for one bucket, and the TAT it would have if the request passed."""
    tat = now if tat is None or tat < now else tat
    new_tat = tat + bucket.cost * bucket.interval_us
    allow_at = new_tat - bucket.tolerance_us
    if allow_at <= now + EPSILON_US:
        remaining = math.floor((now - allow_at) / bucket.interval_us + 1e-6)
        return Verdict(True, remaining, max(0, math.ceil(new_tat - now - EPSILON_US)), 0), new_tat
    remaining = max(0, math.floor((now - (tat - bucket.tolerance_us)) / bucket.interval_us + 1e-6))
    reset = max(0, math.ceil(tat - now - EPSILON_US))
    return Verdict(False, remaining, reset, math.ceil(allow_at - now - EPSILON_US)), tat


def settled(tat: float | None, now: float, bucket: Bucket) -> float:
    tat = now if tat is None or tat < now else tat
    return max(tat + bucket.cost * bucket.interval_us, now)


class MemoryStorage:
    """TATs in a dict of this process; the clock is injectable (microseconds from a seconds clock)."""

    name = "memory"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._tats: dict[str, float] = {}
        self._checks = 0

    def now_us(self) -> float:
        return self.clock() * 1e6

    async def check(self, buckets: Sequence[Bucket]) -> list[Verdict]:
        return self.check_at(self.now_us(), buckets)

    def check_at(self, now: float, buckets: Sequence[Bucket]) -> list[Verdict]:
        verdicts, new_tats = [], []
        for bucket in buckets:
            verdict, new_tat = decide(self._tats.get(bucket.key), now, bucket)
            verdicts.append(verdict)
            new_tats.append(new_tat)
        if all(v.allowed for v in verdicts):
            for bucket, new_tat in zip(buckets, new_tats, strict=True):
                self._store(bucket.key, new_tat, now)
        self._checks += 1
        if self._checks % 10_000 == 0:
            self._expire(now)
        return verdicts

    async def settle(self, buckets: Sequence[Bucket]) -> None:
        self.settle_at(self.now_us(), buckets)

    def settle_at(self, now: float, buckets: Sequence[Bucket]) -> None:
        for bucket in buckets:
            self._store(bucket.key, settled(self._tats.get(bucket.key), now, bucket), now)

    def _store(self, key: str, tat: float, now: float) -> None:
        """A TAT not ahead of now is a full bucket, as an absent one is (Redis deletes it likewise)."""
        if tat > now:
            self._tats[key] = tat
        else:
            self._tats.pop(key, None)

    def tat(self, key: str) -> float | None:
        return self._tats.get(key)

    def _expire(self, now: float) -> None:
        """Forget buckets whose TAT is past: they are full, as an absent bucket is."""
        for key in [k for k, tat in self._tats.items() if tat <= now]:
            del self._tats[key]

    async def close(self) -> None:
        return None
