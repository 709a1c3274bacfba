"""The shared tier on Redis (7.0 or later, one server or a replicated primary; not a cluster).

Layout under ``prefix`` (``atajo:cache:`` by default):

    {prefix}e:{key}             hash: v (value bytes), c, f, k (created_at, fresh_until, keep_until as
                                decimal text), t (tenant), n (namespace), g (tags, a JSON list);
                                PEXPIRE keep_until - clock(), so Redis drops it by itself
    {prefix}t:{tenant}:{tag}    set of keys carrying the tag
    {prefix}n:{tenant}:{ns}     set of keys in the namespace
    {prefix}tenants             set of tenants (for selectors of every tenant)

Index sets only ever gain an expiry further out (PEXPIRE NX, then GT), so they outlive their entries;
their members may be stale (entry expired, or replaced with other tags). That is harmless: the invalidation
script re-reads each candidate and acts on what the entry holds now, removes stale members as it meets
them, and counts only entries a ``get`` would still have returned.

``set`` is one MULTI/EXEC; ``invalidate`` is one Lua script (keys are built inside it from the prefix,
which is why this backend wants one Redis, not a cluster). A key-prefix-only selector finds its candidates
with SCAN and feeds them to the same script in batches.

Two clients share the URL: a hot one (get, set, ping) with short connect and read timeouts and no retries,
so a down Redis costs one short timeout; and a bulk one for invalidation, flushes and stats, whose replies
may take longer. Both use a BlockingConnectionPool: when every connection is busy, callers wait.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.retry import Retry

from atajo.cache.backends import redact_url
from atajo.cache.entry import Clock, Entry, Selector, TierStats

_FIELDS = ("v", "c", "f", "k", "t", "n", "g")
_INDEX_SLACK_MS = 1000
"""Index sets outlive the entries they list by this much."""
_SCAN_BATCH = 500
_BULK_TIMEOUT_S = 30.0

# ARGV: prefix, now, mode (tags | namespace | list), has_tenant, tenant, has_namespace, namespace,
#       has_key_prefix, key_prefix, number of tags, the tags…, then (mode list) the candidate keys.
_INVALIDATE = """
local prefix, now, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local has_tenant, tenant = ARGV[4] == '1', ARGV[5]
local has_ns, ns = ARGV[6] == '1', ARGV[7]
local has_kp, kp = ARGV[8] == '1', ARGV[9]
local ntags = tonumber(ARGV[10])
local wanted = {}
for i = 11, 10 + ntags do wanted[ARGV[i]] = true end
local dropped = 0

local function try(member, setkey)
  local ek = prefix .. 'e:' .. member
  local f = redis.call('HMGET', ek, 't', 'n', 'g', 'k')
  local et, en = f[1], f[2]
  if not et then
    if setkey then redis.call('SREM', setkey, member) end
    return
  end
  local etags = cjson.decode(f[3])
  if setkey then
    local belongs = setkey == prefix .. 'n:' .. et .. ':' .. en
    if not belongs then
      for _, g in ipairs(etags) do
        if setkey == prefix .. 't:' .. et .. ':' .. g then belongs = true break end
      end
    end
    if not belongs then redis.call('SREM', setkey, member) return end
  end
  if has_tenant and et ~= tenant then return end
  if has_ns and en ~= ns then return end
  if has_kp and string.sub(member, #et + 2, #et + 1 + #kp) ~= kp then return end
  if ntags > 0 then
    local hit = false
    for _, g in ipairs(etags) do
      if wanted[g] then hit = true break end
    end
    if not hit then return end
  end
  redis.call('DEL', ek)
  redis.call('SREM', prefix .. 'n:' .. et .. ':' .. en, member)
  for _, g in ipairs(etags) do redis.call('SREM', prefix .. 't:' .. et .. ':' .. g, member) end
  if tonumber(f[4]) > now then dropped = dropped + 1 end
end

if mode == 'list' then
  for i = 11 + ntags, #ARGV do try(ARGV[i], nil) end
  return dropped
end
local tenants
if has_tenant then tenants = {tenant} else tenants = redis.call('SMEMBERS', prefix .. 'tenants') end
for _, t in ipairs(tenants) do
  if mode == 'tags' then
    for i = 11, 10 + ntags do
      local setkey = prefix .. 't:' .. t .. ':' .. ARGV[i]
      for _, member in ipairs(redis.call('SMEMBERS', setkey)) do try(member, setkey) end
    end
  else
    local setkey = prefix .. 'n:' .. t .. ':' .. ns
    for _, member in ipairs(redis.call('SMEMBERS', setkey)) do try(member, setkey) end
  end
end
return dropped
"""


class _Clients(NamedTuple):
    hot: Redis
    bulk: Redis
    invalidate: AsyncScript


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        url: str,
        clock: Clock,
        *,
        prefix: str = "atajo:cache:",
        timeout_s: float = 0.25,
        max_connections: int = 64,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._url = url
        self._clock = clock
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._clients: _Clients | None = None
        self._entry_prefix = prefix + "e:"

    def __repr__(self) -> str:
        return f"RedisBackend({redact_url(self._url)!r}, prefix={self.prefix!r})"

    # --- life cycle -------------------------------------------------------------------------------

    def _connect(self) -> _Clients:
        """The two clients and the script (no I/O: connections are opened on first use, and again after a
        failure)."""
        if self._clients is None:
            common: dict[str, Any] = {
                "socket_connect_timeout": self.timeout_s,
                "retry": Retry(NoBackoff(), 0),
                "timeout": None,  # an exhausted pool blocks; the tier chain bounds each call
            }
            hot = BlockingConnectionPool.from_url(
                self._url, max_connections=self.max_connections, socket_timeout=self.timeout_s, **common
            )
            bulk = BlockingConnectionPool.from_url(
                self._url, max_connections=4, socket_timeout=max(_BULK_TIMEOUT_S, self.timeout_s), **common
            )
            bulk_client = Redis.from_pool(bulk)
            self._clients = _Clients(Redis.from_pool(hot), bulk_client, bulk_client.register_script(_INVALIDATE))
        return self._clients

    async def start(self) -> None:
        await self._connect().hot.ping()

    async def close(self) -> None:
        clients, self._clients = self._clients, None
        if clients is not None:
            await clients.hot.aclose()
            await clients.bulk.aclose()

    async def ping(self) -> None:
        await self._connect().hot.ping()

    # --- reads and writes -------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        hot = (self._clients or self._connect()).hot
        fields: list[Any] = await hot.hmget(self._entry_prefix + key, _FIELDS)
        value, created, fresh, keep, tenant, namespace, tags = fields
        if value is None:
            return None
        keep_until = float(keep)
        if self._clock() >= keep_until:
            return None
        return Entry(
            key=key,
            tenant=tenant.decode(),
            namespace=namespace.decode(),
            value=value,
            created_at=float(created),
            fresh_until=float(fresh),
            keep_until=keep_until,
            tags=frozenset(orjson.loads(tags)),
        )

    async def set(self, entry: Entry) -> None:
        hot = (self._clients or self._connect()).hot
        entry_key = self._entry_prefix + entry.key
        ttl_ms = math.ceil((entry.keep_until - self._clock()) * 1000)
        if ttl_ms <= 0:  # already gone: only the replaced version has to go
            await hot.delete(entry_key)
            return
        index_ttl_ms = ttl_ms + _INDEX_SLACK_MS
        tenant = entry.tenant
        async with hot.pipeline(transaction=True) as pipe:
            pipe.delete(entry_key)
            pipe.hset(
                entry_key,
                mapping={
                    "v": entry.value,
                    "c": repr(entry.created_at),
                    "f": repr(entry.fresh_until),
                    "k": repr(entry.keep_until),
                    "t": tenant,
                    "n": entry.namespace,
                    "g": orjson.dumps(sorted(entry.tags)),
                },
            )
            pipe.pexpire(entry_key, ttl_ms)
            index_keys = [f"{self.prefix}n:{tenant}:{entry.namespace}"]
            index_keys += [f"{self.prefix}t:{tenant}:{tag}" for tag in entry.tags]
            for index_key in index_keys:
                pipe.sadd(index_key, entry.key)
            pipe.sadd(self.prefix + "tenants", tenant)
            for index_key in (*index_keys, self.prefix + "tenants"):
                pipe.pexpire(index_key, index_ttl_ms, nx=True)
                pipe.pexpire(index_key, index_ttl_ms, gt=True)
            await pipe.execute()

    # --- dropping ---------------------------------------------------------------------------------

    async def set_many(self, entries: Sequence[Entry]) -> None:
        for entry in entries:  # one MULTI/EXEC each: an entry and its index sets change together
            await self.set(entry)

    async def invalidate(self, selector: Selector) -> int:
        if selector.tags:
            return await self._run("tags", selector.tenant, selector, sorted(selector.tags), ())
        if selector.namespace is not None:
            return await self._run("namespace", selector.tenant, selector, (), ())
        assert selector.key_prefix is not None
        if selector.tenant is not None:
            pattern = _glob_escape(f"{self._entry_prefix}{selector.tenant}/{selector.key_prefix}") + "*"
        else:  # tenants hold no '/': the first one ends the tenant (the script checks exactly anyway)
            pattern = _glob_escape(self._entry_prefix) + "*/" + _glob_escape(selector.key_prefix) + "*"
        dropped = 0
        async for batch in self._scan(pattern):
            dropped += await self._run("list", selector.tenant, selector, (), batch)
        return dropped

    async def flush(self, tenant: str | None = None) -> int:
        pattern = _glob_escape(self._entry_prefix + (f"{tenant}/" if tenant is not None else "")) + "*"
        dropped = 0
        async for batch in self._scan(pattern):
            dropped += await self._run("list", tenant, None, (), batch)
        return dropped

    async def purge_expired(self) -> int:
        return 0  # Redis drops entries (PEXPIRE) and, later, their index sets by itself

    async def stats(self) -> TierStats:
        bulk = self._connect().bulk
        now = self._clock()
        entries = size = 0
        async for batch in self._scan(_glob_escape(self._entry_prefix) + "*"):
            async with bulk.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.hstrlen(self._entry_prefix + key, "v")
                    pipe.hget(self._entry_prefix + key, "k")
                replies = await pipe.execute()
            for key, length, keep in zip(batch, replies[::2], replies[1::2], strict=True):
                if keep is not None and float(keep) > now:
                    entries += 1
                    size += length + len(key) + 64
        return TierStats(entries=entries, bytes=size)

    # --- internals --------------------------------------------------------------------------------

    async def _scan(self, pattern: str) -> AsyncIterator[list[str]]:
        """Batches of cache keys (without the entry prefix) whose entry key matches ``pattern``."""
        bulk = self._connect().bulk
        cut = len(self._entry_prefix)
        cursor = 0
        while True:
            reply: tuple[int, list[Any]] = await bulk.scan(cursor, match=pattern, count=_SCAN_BATCH)
            cursor, found = reply
            if found:
                yield [raw.decode()[cut:] for raw in found]
            if cursor == 0:
                return

    async def _run(
        self, mode: str, tenant: str | None, selector: Selector | None, tags: Sequence[str], keys: Sequence[str]
    ) -> int:
        script = self._connect().invalidate
        namespace = selector.namespace if selector is not None else None
        key_prefix = selector.key_prefix if selector is not None else None
        args: list[str | float] = [
            self.prefix,
            repr(self._clock()),
            mode,
            "0" if tenant is None else "1",
            tenant or "",
            "0" if namespace is None else "1",
            namespace or "",
            "0" if key_prefix is None else "1",
            key_prefix or "",
            len(tags),
            *tags,
            *keys,
        ]
        return int(await script(keys=[], args=args))


def _glob_escape(text: str) -> str:
    """``text`` matched literally by SCAN MATCH."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
