"""The in-process budget store: counters in a dict. Every call runs without awaiting, so on one event loop
it is atomic; each process (``server.workers``) has its own counters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from atajo.budget.store import Charge, Reserved


class MemoryBudgetStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._counters: dict[str, tuple[int, float]] = {}

    def _get(self, key: str, now: float) -> int:
        found = self._counters.get(key)
        if found is None or found[1] <= now:
            return 0
        return found[0]

    async def reserve(self, charges: Sequence[Charge]) -> Reserved:
        now = self._clock()
        values = [self._get(c.key, now) for c in charges]
        for i, (charge, value) in enumerate(zip(charges, values, strict=True)):
            if value + charge.amount > charge.limit:
                return Reserved(i, tuple(values))
        return Reserved(None, self._add(charges, now))

    async def adjust(self, charges: Sequence[Charge]) -> tuple[int, ...]:
        return self._add(charges, self._clock())

    async def values(self, keys: Sequence[str]) -> tuple[int, ...]:
        now = self._clock()
        return tuple(self._get(k, now) for k in keys)

    def _add(self, charges: Sequence[Charge], now: float) -> tuple[int, ...]:
        out = []
        for charge in charges:
            value = self._get(charge.key, now) + charge.amount
            self._counters[charge.key] = (value, now + charge.ttl_s)
            out.append(value)
        if len(self._counters) > 100_000:  # forget counters of past windows
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        return tuple(out)

    async def close(self) -> None:
        return None
