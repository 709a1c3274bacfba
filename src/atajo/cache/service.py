"""The cache as the rest of the gateway sees it: the tier chain, tag rules, the dependency graph and the
invalidation bus, built from settings, with their background upkeep (stats, expiry sweeps, bus listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atajo.cache.backends import open_backend
from atajo.cache.bus import BusMessage, InvalidationBus, RedisBus, SqlBus
from atajo.cache.entry import Clock, Selector, TierStats
from atajo.cache.semantic_build import build_semantic
from atajo.cache.sql import SqlBackend
from atajo.cache.tags import DependencyGraph, TagRules
from atajo.cache.tiers import CacheObserver, Tier, TierChain
from atajo.settings import CacheSettings, CacheTierSettings

if TYPE_CHECKING:
    from atajo.cache.semantic.tier import AsyncEmbedFn, EmbedFn, SemanticObserver, SemanticTier

log = logging.getLogger("atajo.cache")

STATS_INTERVAL_S = 10.0
SQL_WRITE_LINGER_S = 0.02
PURGE_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class InvalidationResult:
    dropped: dict[str, int]
    """Entries dropped per tier on this instance (-1: the tier failed)."""
    tags: frozenset[str]
    """The tags invalidated, after following the dependency graph."""

    @property
    def total(self) -> int:
        return sum(n for n in self.dropped.values() if n > 0)


def expand_url(url: str) -> str:
    """``sqlite:///~/x.db`` → the home directory spelled out (the default tier lives under ~/.cache)."""
    prefix = "sqlite:///"
    if url.startswith(prefix + "~"):
        return prefix + str(Path(url[len(prefix) :]).expanduser())
    return url


def build_tier(settings: CacheTierSettings, clock: Clock, index: int = 0) -> Tier:
    backend = open_backend(
        expand_url(settings.url),
        clock=clock,
        max_bytes=settings.max_bytes,
        timeout_s=settings.timeout_s,
        setting=f"cache.tiers.{index}.url",
    )
    # A commit per answer is most of an SQL write's cost (WAL pages written per commit): wait a moment so
    # the answers of a busy moment share one (measured in docs/benchmarks.md).
    linger_s = SQL_WRITE_LINGER_S if settings.kind == "sql" else 0.0
    return Tier(backend, settings.ttl_s, settings.timeout_s, local=settings.kind == "memory", write_linger_s=linger_s)


class CacheService:
    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Clock = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        observer: CacheObserver | None = None,
        semantic_observer: SemanticObserver | None = None,
        embed: EmbedFn | AsyncEmbedFn | None = None,
    ) -> None:
        """``embed`` replaces the semantic tier's local model (tests; embeddings through a provider)."""
        self.settings = settings
        self.clock = clock
        self.chain = TierChain(
            [build_tier(t, clock, i) for i, t in enumerate(settings.tiers)],
            clock=clock,
            monotonic=monotonic,
            observer=observer,
            stale_if_error_s=settings.stale_if_error_s,
            write_queue=settings.write_queue,
        )
        self.semantic: SemanticTier | None = None
        if settings.semantic.enabled:
            self.semantic = build_semantic(
                settings.semantic,
                clock=clock,
                observer=semantic_observer,
                vetoed=self.chain.vetoed,
                embed=embed,
                write_queue=settings.write_queue,
            )
        self.rules = TagRules(settings.tag_rules)
        self.graph = DependencyGraph(settings.dependencies)
        self.bus = self._bus(settings)
        self._upkeep: list[asyncio.Task[None]] = []

    def _bus(self, settings: CacheSettings) -> InvalidationBus | None:
        """Redis pub/sub when there is Redis; else the shared SQL database's log, when there is a memory tier
        whose copies other processes (``--workers``, other instances) must learn to drop."""
        bus_url = settings.bus_url or next((t.url for t in settings.tiers if t.kind == "redis"), None)
        if bus_url:
            return RedisBus(bus_url)
        sql = next((t.backend for t in self.chain.tiers if isinstance(t.backend, SqlBackend)), None)
        if sql is not None and any(t.local for t in self.chain.tiers):
            return SqlBus(sql)
        return None

    async def start(self) -> None:
        await self.chain.start()
        if self.semantic is not None:
            await self._start_semantic(self.semantic)
        if self.bus is not None:
            await self.bus.start(self._on_bus_message, self._on_bus_reconnect)
        self._upkeep = [
            asyncio.create_task(self._every(STATS_INTERVAL_S, self.chain.refresh_stats), name="atajo-cache-stats"),
            asyncio.create_task(self._every(PURGE_INTERVAL_S, self._purge), name="atajo-cache-purge"),
        ]

    async def _start_semantic(self, semantic: SemanticTier) -> None:
        try:
            await semantic.start()
        except Exception as exc:  # fail open, as the exact tiers do: serve without it
            log.warning("semantic cache tier is unavailable (%s); serving without it", exc)
            await semantic.close()
            self.semantic = None

    async def _purge(self) -> None:
        await self.chain.purge_expired()
        if self.semantic is not None:
            with contextlib.suppress(Exception):
                await self.semantic.purge_expired()

    async def close(self) -> None:
        for task in self._upkeep:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.bus is not None:
            await self.bus.close()
        if self.semantic is not None:
            await self.semantic.close()
        await self.chain.close()

    async def _every(self, interval_s: float, job: Callable[[], object]) -> None:
        while True:
            result = job()
            if asyncio.iscoroutine(result):
                await result
            await asyncio.sleep(interval_s)

    # --- invalidation -----------------------------------------------------------------------------

    async def invalidate(
        self,
        tenant: str | None,
        *,
        tags: frozenset[str] = frozenset(),
        namespace: str | None = None,
        key_prefix: str | None = None,
    ) -> InvalidationResult:
        """Drop, in every tier here and in every other instance's memory, the entries that depend on
        ``tags`` (through the dependency graph) and match ``namespace`` / ``key_prefix``."""
        expanded = self.graph.expand(tags) if tags else frozenset()
        selector = Selector(tenant, expanded, namespace, key_prefix)
        dropped = await self.chain.invalidate(selector)
        dropped |= await self._semantic_drop(lambda s: s.invalidate(selector))
        await self._publish(BusMessage(selector))
        return InvalidationResult(dropped, expanded)

    async def flush(self, tenant: str | None) -> dict[str, int]:
        dropped = await self.chain.flush(tenant)
        dropped |= await self._semantic_drop(lambda s: s.flush(tenant))
        await self._publish(BusMessage(None, tenant))
        return dropped

    async def _semantic_drop(
        self, drop: Callable[[SemanticTier], Awaitable[int]], *, local_only: bool = False
    ) -> dict[str, int]:
        """Apply an invalidation to the semantic tier's vectors: {"semantic": count}, -1 when it failed."""
        semantic = self.semantic
        if semantic is None or (local_only and semantic.name != "memory"):
            return {}
        try:
            return {"semantic": await drop(semantic)}
        except Exception as exc:  # the vectors then point at dropped entries: misses, never wrong answers
            log.warning("semantic cache invalidation failed: %s", type(exc).__name__)
            return {"semantic": -1}

    async def _publish(self, message: BusMessage) -> None:
        if self.bus is None:
            return
        try:
            await self.bus.publish(message)
        except Exception as exc:  # the other instances' memory keeps entries until their TTL; said in the log
            log.warning("cache invalidation not broadcast to other instances: %s", type(exc).__name__)
            self.chain.observer.failure("bus", "publish")

    async def _on_bus_message(self, message: BusMessage) -> None:
        selector, tenant = message.selector, message.tenant
        if selector is not None:
            await self.chain.invalidate(selector, local_only=True)
            await self._semantic_drop(lambda s: s.invalidate(selector), local_only=True)
        else:
            await self.chain.flush(tenant, local_only=True)
            await self._semantic_drop(lambda s: s.flush(tenant), local_only=True)

    async def _on_bus_reconnect(self) -> None:
        await self.chain.flush(None, local_only=True)
        await self._semantic_drop(lambda s: s.flush(None), local_only=True)

    async def stats(self) -> dict[str, TierStats]:
        return await self.chain.refresh_stats()
