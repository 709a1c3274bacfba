"""What every cache tier stores and the one interface every tier backend implements.

Backends are dumb and exact: they store opaque answer bytes under a key with their times, tenant,
namespace and dependency tags, and drop exactly what a ``Selector`` names. Freshness (fresh, stale, gone)
is decided from the times carried in the entry, against the injected clock, so every backend behaves the
same in tests that move the clock instead of sleeping.

Keys look like ``{tenant}/{namespace}/{model}/{digest}`` (see ``atajo.core.cache_key``); the part after
``{tenant}/`` is what clients see and what ``Selector.key_prefix`` matches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Clock = Callable[[], float]
"""Wall-clock seconds (``time.time`` in production, a fake in tests)."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    tenant: str
    namespace: str
    value: bytes = field(repr=False)
    """The answer, serialized by the cache stage; opaque to backends."""
    created_at: float
    """When the answer was produced (its age is measured from here, in every tier)."""
    fresh_until: float
    """Served as a hit until then."""
    keep_until: float
    """Kept until then (>= fresh_until), so a stale copy can be served when the provider fails."""
    tags: frozenset[str] = frozenset()
    """Dependency tags, tenant-relative (``user:42``); invalidating one drops the entry."""

    @property
    def size(self) -> int:
        """Approximate bytes held: what byte bounds and size metrics count."""
        return len(self.value) + len(self.key) + sum(len(t) for t in self.tags) + 64

    def relative_key(self) -> str:
        """The key without its tenant: what clients see and key prefixes match."""
        return self.key[len(self.tenant) + 1 :]


class Selectable(Protocol):
    """What an invalidation looks at: an exact entry or a vector entry pointing at one."""

    @property
    def tenant(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def tags(self) -> frozenset[str]: ...

    def relative_key(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Selector:
    """Which entries an invalidation drops: those of ``tenant`` (``None``: every tenant) that match every
    criterion given: any of ``tags`` (already expanded through the dependency graph), ``namespace``,
    and a relative key starting with ``key_prefix``. At least one criterion is required."""

    tenant: str | None
    tags: frozenset[str] = frozenset()
    namespace: str | None = None
    key_prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.tags and self.namespace is None and self.key_prefix is None:
            raise ValueError("a selector needs tags, a namespace or a key prefix")

    def matches(self, entry: Selectable) -> bool:
        """The reference semantics every backend must implement (the contract tests check them), for exact
        entries and the semantic tier's vector entries alike."""
        if self.tenant is not None and entry.tenant != self.tenant:
            return False
        if self.tags and self.tags.isdisjoint(entry.tags):
            return False
        if self.namespace is not None and entry.namespace != self.namespace:
            return False
        return self.key_prefix is None or entry.relative_key().startswith(self.key_prefix)


@dataclass(frozen=True, slots=True)
class TierStats:
    entries: int
    bytes: int
    evictions: int = 0
    """Entries dropped to respect a size bound (not TTL expiry, not invalidation), since start."""


class CacheBackend(Protocol):
    """One tier's storage. Methods may raise anything on I/O failure: the tier chain fails open on them
    (skips the tier and counts the error), so backends do not swallow their own errors."""

    name: str
    """The tier's label in metrics and in ``x-atajo-cache: hit-<name>``: memory, redis or sql."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise when the backend cannot be reached (readiness checks)."""

    async def get(self, key: str) -> Entry | None:
        """The entry, or None when absent or past its ``keep_until`` by the backend's clock."""

    async def set(self, entry: Entry) -> None:
        """Store ``entry``, replacing any entry under its key, tags included."""

    async def set_many(self, entries: Sequence[Entry]) -> None:
        """``set`` each entry, in order; the tier's writer batches what queued up (SQL: one transaction)."""

    async def invalidate(self, selector: Selector) -> int:
        """Drop every entry the selector matches; return how many were dropped."""

    async def flush(self, tenant: str | None = None) -> int:
        """Drop every entry (of one tenant, or all); return how many were dropped."""

    async def purge_expired(self) -> int:
        """Drop entries past ``keep_until``; return how many (backends that expire by themselves: 0)."""

    async def stats(self) -> TierStats: ...
