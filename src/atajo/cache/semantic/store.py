"""Where the semantic tier keeps its vectors: one interface, an in-process store and (``pgvector.py``) a
PostgreSQL store shared by many instances.

A vector entry points at an exact-tier entry (``key``) and carries that entry's tenant, namespace, tags and
``keep_until``: it expires with it and the same ``Selector`` drops both. The answer itself lives only in the
exact tiers, so a vector whose entry is gone there is a dead pointer that the tier removes when it meets one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from atajo.cache.entry import Selector
from atajo.cache.semantic.index import Neighbour, Vector, VectorIndex


@dataclass(frozen=True, slots=True)
class VectorEntry:
    key: str
    """The exact tier's entry key (``{tenant}/{namespace}/{model}/v1-…``)."""
    tenant: str
    namespace: str
    partition: str
    """Tenant, model and a digest of everything but the asked text: searches never cross it."""
    text: str
    """The meaning-bearing text that was embedded."""
    vector: Vector = field(repr=False)
    """Unit length, float32."""
    keep_until: float
    """Wall-clock seconds; the exact entry's ``keep_until``."""
    tags: frozenset[str] = frozenset()

    def relative_key(self) -> str:
        return self.key[len(self.tenant) + 1 :]


def selector_matches(selector: Selector, entry: VectorEntry) -> bool:
    """``Selector.matches`` for vector entries: the same rules as the exact tiers'."""
    return selector.matches(entry)


class VectorStore(Protocol):
    """The semantic tier's storage. Methods may raise on I/O failure; the tier fails open (a miss)."""

    name: str
    """``memory`` or ``pgvector``: the label in metrics."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def search(self, partition: str, vector: Vector, k: int, now: float) -> list[Neighbour]:
        """The ``k`` nearest live entries (``keep_until > now``) of ``partition`` by cosine, best first."""

    async def add_many(self, entries: Sequence[VectorEntry]) -> None:
        """Store each entry, replacing any entry under its key."""

    async def delete(self, keys: Sequence[str]) -> int:
        """Drop these keys; how many were there."""

    async def invalidate(self, selector: Selector) -> int:
        """Drop every entry the selector matches; how many."""

    async def flush(self, tenant: str | None = None) -> int:
        """Drop every entry (of one tenant, or all); how many."""

    async def purge_expired(self, now: float) -> int:
        """Drop entries with ``keep_until <= now``; how many."""

    async def count(self) -> int: ...


@dataclass(slots=True)
class _Meta:
    tenant: str
    namespace: str
    keep_until: float
    tags: frozenset[str]


class MemoryVectorStore:
    """``VectorIndex`` plus the metadata expiry and invalidation need. Per process, bounded by entries."""

    name = "memory"

    def __init__(self, max_entries: int = 100_000, dimension: int = 384) -> None:
        self.index = VectorIndex(dimension=dimension, max_entries=max_entries)
        self._meta: dict[str, _Meta] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def has_partition(self, partition: str) -> bool:
        return self.index.has_partition(partition)

    async def search(self, partition: str, vector: Vector, k: int, now: float) -> list[Neighbour]:
        while True:  # expired neighbours are dropped and the search repeated: each round drops at least one
            found = self.index.search(partition, vector, k)
            expired = [n.key for n in found if (m := self._meta.get(n.key)) is None or m.keep_until <= now]
            if not expired:
                return found
            await self.delete(expired)

    async def add_many(self, entries: Sequence[VectorEntry]) -> None:
        for e in entries:
            self.index.add(e.partition, e.key, np.asarray(e.vector, dtype=np.float32), e.text)
            with self._lock:
                self._meta[e.key] = _Meta(e.tenant, e.namespace, e.keep_until, e.tags)
        self._forget_evicted()

    def _forget_evicted(self) -> None:
        if len(self._meta) > len(self.index):
            with self._lock:
                for key in [k for k in self._meta if k not in self.index]:
                    del self._meta[key]

    async def delete(self, keys: Sequence[str]) -> int:
        dropped = 0
        for key in keys:
            dropped += self.index.delete(key)
            with self._lock:
                self._meta.pop(key, None)
        return dropped

    async def invalidate(self, selector: Selector) -> int:
        with self._lock:
            keys = [
                k
                for k, m in self._meta.items()
                if selector_matches(selector, VectorEntry(k, m.tenant, m.namespace, "", "", _EMPTY, 0.0, m.tags))
            ]
        return await self.delete(keys)

    async def flush(self, tenant: str | None = None) -> int:
        with self._lock:
            keys = [k for k, m in self._meta.items() if tenant is None or m.tenant == tenant]
        return await self.delete(keys)

    async def purge_expired(self, now: float) -> int:
        with self._lock:
            keys = [k for k, m in self._meta.items() if m.keep_until <= now]
        return await self.delete(keys)

    async def count(self) -> int:
        return len(self.index)


_EMPTY: Vector = np.zeros(0, dtype=np.float32)
