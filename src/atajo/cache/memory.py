"""The per-process tier: an LRU of entries bounded by bytes (``Entry.size``), with tag and namespace indexes.

Everything happens synchronously inside the async methods (no awaits), so each call is atomic with respect
to the event loop. ``get`` is the hot path of every cache hit: one dict lookup, one clock read, one move to
the most-recent end.

Indexes (per tenant): tag → keys and namespace → keys, so an invalidation visits only the entries it can
match; a key-prefix-only selector visits the tenant's entries (its namespace sets). Expiry: an entry past
``keep_until`` is dropped when read, and ``purge_expired`` pops a heap ordered by ``keep_until`` (items left
by replaced or removed entries are skipped; the heap is rebuilt when they outnumber the live ones).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from atajo.cache.entry import Clock, Entry, Selector, TierStats


class MemoryBackend:
    name = "memory"

    def __init__(self, max_bytes: int, clock: Clock) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        """Least recently used first."""
        self._bytes = 0
        self._evictions = 0
        self._by_tag: dict[str, dict[str, set[str]]] = {}
        """tenant → tag → keys"""
        self._by_namespace: dict[str, dict[str, set[str]]] = {}
        """tenant → namespace → keys (every entry is in exactly one: also the tenant's list of keys)"""
        self._expiry: list[tuple[float, str]] = []
        """(keep_until, key) heap; may hold items of entries since replaced or removed."""

    def __repr__(self) -> str:
        return f"MemoryBackend(max_bytes={self.max_bytes})"

    # --- protocol ---------------------------------------------------------------------------------

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.keep_until:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def set(self, entry: Entry) -> None:
        key = entry.key
        if key in self._entries:
            self._remove(key)
        size = entry.size
        if size > self.max_bytes or entry.keep_until <= self._clock():
            return  # too big for the bound, or already gone: not stored (the old version is dropped too)
        self._entries[key] = entry
        self._bytes += size
        tenant = entry.tenant
        self._by_namespace.setdefault(tenant, {}).setdefault(entry.namespace, set()).add(key)
        if entry.tags:
            tags = self._by_tag.setdefault(tenant, {})
            for tag in entry.tags:
                tags.setdefault(tag, set()).add(key)
        heapq.heappush(self._expiry, (entry.keep_until, key))
        if len(self._expiry) > 2 * len(self._entries) + 64:
            self._expiry = [(e.keep_until, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiry)
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self._evictions += 1

    async def set_many(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            await self.set(entry)

    async def invalidate(self, selector: Selector) -> int:
        tenants = [selector.tenant] if selector.tenant is not None else list(self._by_namespace)
        candidates: set[str] = set()
        for tenant in tenants:
            if selector.tags:
                by_tag = self._by_tag.get(tenant)
                if by_tag:
                    for tag in selector.tags:
                        candidates.update(by_tag.get(tag, ()))
            elif selector.namespace is not None:
                candidates.update(self._by_namespace.get(tenant, {}).get(selector.namespace, ()))
            else:
                candidates.update(self._tenant_keys(tenant))
        return self._drop(key for key in candidates if selector.matches(self._entries[key]))

    async def flush(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return self._drop(list(self._tenant_keys(tenant)))
        now = self._clock()
        live = sum(1 for entry in self._entries.values() if entry.keep_until > now)
        self._entries.clear()
        self._by_tag.clear()
        self._by_namespace.clear()
        self._expiry.clear()
        self._bytes = 0
        return live

    async def purge_expired(self) -> int:
        now = self._clock()
        dropped = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.keep_until <= now:
                self._remove(key)
                dropped += 1
        return dropped

    async def stats(self) -> TierStats:
        return TierStats(entries=len(self._entries), bytes=self._bytes, evictions=self._evictions)

    # --- internals --------------------------------------------------------------------------------

    def _tenant_keys(self, tenant: str) -> Iterable[str]:
        for keys in self._by_namespace.get(tenant, {}).values():
            yield from keys

    def _drop(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` (materialized first: the indexes change); count those not yet expired."""
        now = self._clock()
        live = 0
        for key in list(keys):
            if self._remove(key).keep_until > now:
                live += 1
        return live

    def _remove(self, key: str) -> Entry:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        tenant = entry.tenant
        namespaces = self._by_namespace[tenant]
        keys = namespaces[entry.namespace]
        keys.discard(key)
        if not keys:
            del namespaces[entry.namespace]
            if not namespaces:
                del self._by_namespace[tenant]
        if entry.tags:
            by_tag = self._by_tag[tenant]
            for tag in entry.tags:
                keys = by_tag[tag]
                keys.discard(key)
                if not keys:
                    del by_tag[tag]
            if not by_tag:
                del self._by_tag[tenant]
        return entry
