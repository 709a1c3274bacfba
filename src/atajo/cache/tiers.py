"""The tier chain: look up fastest first, fill faster tiers on a slower hit, write every tier behind the
response, invalidate everywhere.

Fail-open policy: a tier that raises or times out is skipped (counted in ``failure``) and left alone for
``RETRY_AFTER_S`` so a down Redis or a locked database costs one timeout, not one per request; it is tried
again after that and recovers by itself. The cache never fails a request.

Write-behind (``write_behind.py``): writes go through one bounded queue per tier, drained by one task per
tier, so the response never waits on a write and a slow tier does not hold up the others. A full queue drops
the write (counted). A write whose answer was being computed while a matching invalidation happened is dropped too:
every write carries the invalidation generation its request started in, and recent invalidations are kept
with their generation, so an answer based on data that has since changed is never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from atajo.cache.entry import CacheBackend, Clock, Entry, Selector, TierStats
from atajo.cache.write_behind import WriteBehind

log = logging.getLogger("atajo.cache")

RETRY_AFTER_S = 1.0
"""How long a failed tier is skipped before it is tried again."""
WRITE_BATCH = 64
"""Writes queued for a tier are stored together, up to this many at a time."""
RECENT_INVALIDATIONS = 4096
"""Invalidations remembered to veto in-flight writes; a write older than all of them is dropped."""


class CacheObserver(Protocol):
    """Where the chain reports what it does (``observe`` implements it; tests may record)."""

    def lookup(self, tier: str, outcome: str, seconds: float) -> None:
        """outcome: hit, stale, miss, error or skipped."""

    def write(self, tier: str, outcome: str) -> None:
        """outcome: ok, error, dropped (queue full) or vetoed (invalidated while in flight)."""

    def invalidation(self, tier: str, dropped: int, fraction: float) -> None: ...

    def failure(self, tier: str, operation: str) -> None:
        """A tier raised or timed out (get, set, invalidate, flush, stats, purge, start); it is skipped."""


class _Matcher(Protocol):
    def matches(self, entry: Entry) -> bool: ...


@dataclass(slots=True)
class Tier:
    backend: CacheBackend
    ttl_s: float
    timeout_s: float
    local: bool
    """Per-process (memory): remote invalidations must be applied to it; shared tiers are done at the source."""
    write_linger_s: float = 0.0
    """How long the writer waits for more writes to batch with the first one (SQL: one commit per batch)."""
    down_until: float = 0.0
    writes: WriteBehind[Entry] = field(init=False, repr=False)
    """Its queue of writes and their task (made by the chain)."""
    stats: TierStats = field(default_factory=lambda: TierStats(0, 0))

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass(frozen=True, slots=True)
class Lookup:
    entry: Entry | None = None
    """A fresh entry (a hit), or None."""
    tier: str | None = None
    stale: Entry | None = None
    """The freshest expired entry still kept, for serving when the provider fails."""


@dataclass(frozen=True, slots=True)
class Fill:
    """What to store after a miss (times are filled in per tier)."""

    key: str
    tenant: str
    namespace: str
    value: bytes
    tags: frozenset[str]
    ttl_s: float | None
    """Overrides every tier's TTL (``x-atajo-cache-ttl`` or policy), or None for the tiers' own."""
    generation: int
    """The invalidation generation when the request started."""


class TierChain:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        clock: Clock = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        observer: CacheObserver | None = None,
        stale_if_error_s: float = 0.0,
        write_queue: int = 10_000,
    ) -> None:
        self.tiers = list(tiers)
        for tier in self.tiers:
            tier.writes = self._writes_for(tier, write_queue)
        self.clock = clock
        self.monotonic = monotonic
        self.observer = observer or _NullObserver()
        self.stale_if_error_s = stale_if_error_s
        self.generation = 0
        self._recent: deque[tuple[int, _Matcher | None]] = deque(maxlen=RECENT_INVALIDATIONS)
        self._tasks: list[asyncio.Task[None]] = []

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        for tier in self.tiers:
            try:
                async with asyncio.timeout(max(tier.timeout_s, 5.0)):
                    await tier.backend.start()
            except Exception as exc:  # fail open: serve without this tier until it comes back
                log.warning("cache tier %s is unavailable at start-up (%s); skipping it for now", tier.name, exc)
                self._failed(tier, "start")
            tier.writes.start()

    async def close(self) -> None:
        await self.drain(timeout_s=2.0)
        for tier in self.tiers:
            await tier.writes.stop()
            with contextlib.suppress(Exception):  # closing a broken backend must not stop the others
                await tier.backend.close()

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued write is done (tests, shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                for tier in self.tiers:
                    await tier.writes.join()

    # --- lookup -----------------------------------------------------------------------------------

    async def get(self, key: str, max_age_s: float | None = None) -> Lookup:
        """Walk the tiers fastest first. A fresh entry (no older than ``max_age_s`` when given) is a hit and
        fills the faster tiers; otherwise the freshest stale entry kept anywhere is returned with the miss."""
        stale: Entry | None = None
        for i, tier in enumerate(self.tiers):
            if tier.down_until and not self._usable(tier):
                self.observer.lookup(tier.name, "skipped", 0.0)
                continue
            started = time.perf_counter()
            try:
                if tier.local:
                    entry = await tier.backend.get(key)
                else:
                    async with asyncio.timeout(tier.timeout_s):
                        entry = await tier.backend.get(key)
            except Exception as exc:  # fail open (see module docstring)
                self._failed(tier, "get", exc)
                self.observer.lookup(tier.name, "error", time.perf_counter() - started)
                continue
            elapsed = time.perf_counter() - started
            if entry is None:
                self.observer.lookup(tier.name, "miss", elapsed)
                continue
            now = self.clock()
            if now < entry.fresh_until and (max_age_s is None or now - entry.created_at <= max_age_s):
                self.observer.lookup(tier.name, "hit", elapsed)
                if i:
                    self._fill_faster(entry, i, now)
                return Lookup(entry, tier.name, None)
            self.observer.lookup(tier.name, "stale", elapsed)
            if stale is None or entry.created_at > stale.created_at:
                stale = entry
        return Lookup(None, None, stale)

    def _fill_faster(self, entry: Entry, upto: int, now: float) -> None:
        for tier in self.tiers[:upto]:
            fresh_until = min(now + tier.ttl_s, entry.fresh_until)
            keep_until = min(fresh_until + self.stale_if_error_s, entry.keep_until)
            self._enqueue(tier, replace(entry, fresh_until=fresh_until, keep_until=keep_until), self.generation)

    # --- storing ----------------------------------------------------------------------------------

    def store(self, fill: Fill) -> None:
        """Queue the answer for every tier, each with its own TTL. Never waits."""
        now = self.clock()
        for tier in self.tiers:
            ttl = fill.ttl_s if fill.ttl_s is not None else tier.ttl_s
            entry = Entry(
                key=fill.key,
                tenant=fill.tenant,
                namespace=fill.namespace,
                value=fill.value,
                created_at=now,
                fresh_until=now + ttl,
                keep_until=now + ttl + self.stale_if_error_s,
                tags=fill.tags,
            )
            self._enqueue(tier, entry, fill.generation)

    def _enqueue(self, tier: Tier, entry: Entry, generation: int) -> None:
        tier.writes.put(entry, generation)

    def _writes_for(self, tier: Tier, capacity: int) -> WriteBehind[Entry]:
        async def write(entries: list[Entry]) -> None:
            async with asyncio.timeout(max(tier.timeout_s, 1.0)):
                await tier.backend.set_many(entries)

        return WriteBehind(
            f"atajo-cache-writer-{tier.name}",
            write,
            batch=WRITE_BATCH,
            observe=lambda outcome: self.observer.write(tier.name, outcome),
            failed=lambda exc: self._failed(tier, "set", exc),  # fail open: a lost write is a later miss
            vetoed=self.vetoed,
            usable=lambda: self._usable(tier),
            capacity=capacity,
            linger_s=tier.write_linger_s,
        )

    def vetoed(self, entry: Entry, generation: int) -> bool:
        if generation >= self.generation:
            return False
        if not self._recent or self._recent[0][0] > generation + 1:
            return True  # older than every remembered invalidation: cannot tell, so do not store
        return any(gen > generation and (sel is None or sel.matches(entry)) for gen, sel in self._recent)

    # --- invalidation -----------------------------------------------------------------------------

    def _remember(self, selector: _Matcher | None) -> None:
        self.generation += 1
        self._recent.append((self.generation, selector))

    async def invalidate(self, selector: Selector, *, local_only: bool = False) -> dict[str, int]:
        """Drop what ``selector`` matches from every tier (``local_only``: only per-process tiers, for an
        invalidation another instance already applied to the shared ones). Returns dropped counts per tier;
        a tier that fails is reported as -1."""
        self._remember(selector)
        dropped: dict[str, int] = {}
        for tier in self.tiers:
            if local_only and not tier.local:
                continue
            try:
                async with asyncio.timeout(max(tier.timeout_s, 5.0)):
                    before = tier.stats.entries if not tier.local else (await tier.backend.stats()).entries
                    count = await tier.backend.invalidate(selector)
            except Exception as exc:  # reported to the caller as -1 and counted; the other tiers still go
                self._failed(tier, "invalidate", exc)
                dropped[tier.name] = -1
                continue
            dropped[tier.name] = count
            self.observer.invalidation(tier.name, count, count / before if before else 0.0)
        return dropped

    async def flush(self, tenant: str | None, *, local_only: bool = False) -> dict[str, int]:
        self._remember(None if tenant is None else _TenantSelector(tenant))
        dropped: dict[str, int] = {}
        for tier in self.tiers:
            if local_only and not tier.local:
                continue
            try:
                async with asyncio.timeout(max(tier.timeout_s, 5.0)):
                    dropped[tier.name] = await tier.backend.flush(tenant)
            except Exception as exc:  # reported as -1 and counted
                self._failed(tier, "flush", exc)
                dropped[tier.name] = -1
        return dropped

    # --- upkeep -----------------------------------------------------------------------------------

    async def refresh_stats(self) -> dict[str, TierStats]:
        """Entries, bytes and evictions per tier (kept for metrics, which are read synchronously)."""
        for tier in self.tiers:
            if not self._usable(tier):
                continue
            try:
                async with asyncio.timeout(max(tier.timeout_s, 5.0)):
                    tier.stats = await tier.backend.stats()
            except Exception as exc:  # stats are best effort; counted
                self._failed(tier, "stats", exc)
        return {tier.name: tier.stats for tier in self.tiers}

    async def purge_expired(self) -> int:
        total = 0
        for tier in self.tiers:
            if not self._usable(tier):
                continue
            try:
                async with asyncio.timeout(max(tier.timeout_s, 30.0)):
                    total += await tier.backend.purge_expired()
            except Exception as exc:  # retried at the next sweep; counted
                self._failed(tier, "purge", exc)
        return total

    def _usable(self, tier: Tier) -> bool:
        if tier.down_until and self.monotonic() >= tier.down_until:
            tier.down_until = 0.0
        return not tier.down_until

    def _failed(self, tier: Tier, operation: str, exc: BaseException | None = None) -> None:
        if not tier.down_until:
            log.warning("cache tier %s failed on %s (%s); skipping it for %g s", tier.name, operation,
                        type(exc).__name__ if exc else "error", RETRY_AFTER_S)  # fmt: skip
        tier.down_until = self.monotonic() + RETRY_AFTER_S
        self.observer.failure(tier.name, operation)


@dataclass(frozen=True, slots=True)
class _TenantSelector:
    """A flush of one tenant, remembered like an invalidation so writes in flight for it are vetoed."""

    tenant: str

    def matches(self, entry: Entry) -> bool:
        return entry.tenant == self.tenant


class _NullObserver:
    def lookup(self, tier: str, outcome: str, seconds: float) -> None:
        pass

    def write(self, tier: str, outcome: str) -> None:
        pass

    def invalidation(self, tier: str, dropped: int, fraction: float) -> None:
        pass

    def failure(self, tier: str, operation: str) -> None:
        pass
