"""The budget store in Redis, shared by every instance: one Lua script checks and adds all of a request's
counters atomically (``RESERVE``), another adds the reconciliation (``ADJUST``). Counters expire after their
window ends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from atajo.budget.store import Charge, Reserved, StoreUnavailable

RESERVE = """
local n = #KEYS
local values = {}
for i = 1, n do
  values[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if values[i] + tonumber(ARGV[i]) > tonumber(ARGV[n + i]) then
    local out = {i}
    for j = 1, n do out[j + 1] = tonumber(redis.call('GET', KEYS[j]) or '0') end
    return out
  end
end
local out = {0}
for i = 1, n do
  out[i + 1] = redis.call('INCRBY', KEYS[i], ARGV[i])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * n + i])
end
return out
"""

ADJUST = """
local n = #KEYS
local out = {}
for i = 1, n do
  out[i] = redis.call('INCRBY', KEYS[i], ARGV[i])
  redis.call('EXPIRE', KEYS[i], ARGV[n + i])
end
return out
"""


class RedisBudgetStore:
    def __init__(self, url: str, *, prefix: str = "atajo:budget:", timeout_s: float = 0.5) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._client: Any = None
        self._reserve: Any = None
        self._adjust: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            from redis.asyncio import Redis  # the redis extra, needed only with a Redis budget store
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = Redis.from_url(
                self.url,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._reserve = self._client.register_script(RESERVE)
            self._adjust = self._client.register_script(ADJUST)
        return self._client

    async def _run(self, script: str, keys: list[str], args: list[int]) -> list[int]:
        from redis.exceptions import RedisError

        self._redis()
        call = self._reserve if script == "reserve" else self._adjust
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                raw = await call(keys=keys, args=args)
        except (OSError, TimeoutError, RedisError) as exc:
            raise StoreUnavailable(f"Redis at {self.url.split('@')[-1]}: {exc or type(exc).__name__}") from None
        return [int(v) for v in raw]

    async def reserve(self, charges: Sequence[Charge]) -> Reserved:
        keys = [self.prefix + c.key for c in charges]
        args = [c.amount for c in charges] + [c.limit for c in charges] + [max(1, c.ttl_s) for c in charges]
        out = await self._run("reserve", keys, args)
        refused = out[0] - 1 if out[0] else None
        return Reserved(refused, tuple(out[1:]))

    async def adjust(self, charges: Sequence[Charge]) -> tuple[int, ...]:
        keys = [self.prefix + c.key for c in charges]
        args = [c.amount for c in charges] + [max(1, c.ttl_s) for c in charges]
        return tuple(await self._run("adjust", keys, args))

    async def values(self, keys: Sequence[str]) -> tuple[int, ...]:
        from redis.exceptions import RedisError

        client = self._redis()
        try:
            raw = await client.mget([self.prefix + k for k in keys])
        except (OSError, TimeoutError, RedisError) as exc:
            raise StoreUnavailable(f"Redis: {exc}") from None
        return tuple(int(v or 0) for v in raw)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
