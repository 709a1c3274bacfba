"""GCRA in Redis: one Lua script, atomic, on Redis's own clock (``TIME``), so every instance shares each bucket
exactly and no instance's clock matters. Its arithmetic is ``limits/gcra.py``'s, line for line.

``ARGV``: [now override, mode, then per key: interval_us, tolerance_us, cost]. The override is empty in use;
the twin test passes a time so both implementations can be compared at the same instants. Mode ``check``
admits all or none and returns four integers per key (allowed, remaining, reset_us, retry_us); ``settle``
applies every cost. TATs are stored as decimal strings with full precision and expire when they are past.

All of a request's buckets are read in one call, so their keys share a hash tag (``{atajo-rl}``): in a Redis
Cluster they live on one shard. The client's pool is a ``BlockingConnectionPool``: when every connection is
busy, callers wait (up to ``timeout_s``) rather than fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atajo.limits.gcra import Bucket, Verdict

SCRIPT = """
local now
local min_px = 1
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
  min_px = 600000  -- an overridden time does not pass as Redis's does: keep keys for the test's length
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function keep(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%.17g', tat), 'PX', math.max(min_px, math.ceil((tat - now) / 1000) + 1))
  else
    redis.call('DEL', key)
  end
end
local mode = ARGV[2]
local n = #KEYS
if mode == 'settle' then
  for i = 1, n do
    local b = 2 + (i - 1) * 3
    local interval, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 3])
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    keep(KEYS[i], tat + cost * interval)
  end
  return {}
end
local out, new_tats, ok = {}, {}, true
for i = 1, n do
  local b = 2 + (i - 1) * 3
  local interval, tolerance, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - tolerance
  if allow_at <= now + 0.001 then
    new_tats[i] = new_tat
    out[#out + 1] = 1
    out[#out + 1] = math.floor((now - allow_at) / interval + 1e-6)
    out[#out + 1] = math.max(0, math.ceil(new_tat - now - 0.001))
    out[#out + 1] = 0
  else
    ok = false
    out[#out + 1] = 0
    out[#out + 1] = math.max(0, math.floor((now - (tat - tolerance)) / interval + 1e-6))
    out[#out + 1] = math.max(0, math.ceil(tat - now - 0.001))
    out[#out + 1] = math.ceil(allow_at - now - 0.001)
  end
end
if ok then
  for i = 1, n do
    keep(KEYS[i], new_tats[i])
  end
end
return out
"""


class RedisStorage:
    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 64, prefix: str = "") -> None:
        from redis.asyncio import BlockingConnectionPool, Redis

        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection: block, then fail (the caller fails open)
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self.client: Redis = Redis(connection_pool=pool)
        self.prefix = prefix
        self._script: Any = self.client.register_script(SCRIPT)

    def _key(self, key: str) -> str:
        return "{atajo-rl}:" + self.prefix + key

    async def _run(self, mode: str, buckets: Sequence[Bucket], now_us: float | None) -> Any:
        args: list[Any] = ["" if now_us is None else repr(float(now_us)), mode]
        for b in buckets:
            args += [repr(b.interval_us), repr(b.tolerance_us), repr(float(b.cost))]
        return await self._script(keys=[self._key(b.key) for b in buckets], args=args)

    async def check(self, buckets: Sequence[Bucket], *, now_us: float | None = None) -> list[Verdict]:
        flat = await self._run("check", buckets, now_us)
        return [
            Verdict(bool(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3])) for i in range(0, len(flat), 4)
        ]

    async def settle(self, buckets: Sequence[Bucket], *, now_us: float | None = None) -> None:
        await self._run("settle", buckets, now_us)

    async def tat(self, key: str) -> float | None:
        raw = await self.client.get(self._key(key))
        return float(raw) if raw is not None else None

    async def server_time_us(self) -> float:
        seconds, micros = await self.client.time()
        return seconds * 1e6 + micros

    async def close(self) -> None:
        await self.client.aclose()
