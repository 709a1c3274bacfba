"""Virtual keys: issued and revoked at run time (admin API, CLI), kept in the key store, looked up by digest.

Lookups are cached in memory (``auth.lookup_ttl_s``; unknown digests too, so a wrong key does not cost a
database query each time). What changes a lookup is appended to the store's change log, which every instance
polls every ``auth.store_poll_s`` (0.25 s by default) and drops the digests it names: a revocation reaches
every instance within a second. A lookup that raced with a change (it read the old row) is not cached. An
instance that lost the log (the database was away longer than the log keeps) forgets every lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping

from atajo.auth.store import KeyRecord, KeyStore, KeyStoreError, TenantRecord
from atajo.core.context import Principal
from atajo.errors import ServiceUnavailable
from atajo.settings import RateLimit

log = logging.getLogger("atajo.auth")

SECRET_PREFIX = "sk-atajo-"
OVERLAP = 64
"""Change-log ids re-read behind the newest applied one (see ``poll_once``)."""
MAX_CACHED = 100_000
"""Cached lookups beyond this are all dropped (a flood of random keys cannot grow memory without bound)."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hint_of(secret: str) -> str:
    """What may be shown of a secret later: its prefix and last four characters."""
    return f"{SECRET_PREFIX}…{secret[-4:]}"


def principal_of(
    record: KeyRecord, tenant: TenantRecord | None, configured: Mapping[str, RateLimit] | None = None
) -> Principal:
    tenant_limits = tenant.limits if tenant is not None and tenant.limits is not None else None
    if tenant_limits is None and configured:
        tenant_limits = configured.get(record.tenant)
    return Principal(
        record.id,
        tenant=record.tenant,
        models=frozenset(record.models) if record.models is not None else None,
        limits=record.limits,
        tenant_limits=tenant_limits,
        cache=record.cache,
        trust=record.trust,
        budget_micros=record.budget_micros,
    )


class VirtualKeys:
    def __init__(
        self,
        store: KeyStore,
        *,
        lookup_ttl_s: float = 60.0,
        poll_s: float = 0.25,
        tenant_limits: Mapping[str, RateLimit] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.lookup_ttl_s = lookup_ttl_s
        self.poll_s = poll_s
        self.tenant_limits = dict(tenant_limits or {})
        self.clock = clock
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._generation = 0
        self._last_event = -1
        self._applied: deque[int] = deque(maxlen=4 * OVERLAP)
        self._task: asyncio.Task[None] | None = None
        self.lookups = 0
        self.store_errors = 0
        self.dropped = 0

    async def start(self) -> None:
        """Open the store; if it cannot be opened now, virtual keys answer 503 until it can (static keys and
        the master key still work)."""
        try:
            await self.store.start()
            self._last_event = (await self.store.event_ids())[0]
        except KeyStoreError as exc:
            log.warning("key store unavailable at start-up (%s); retrying on use", exc)
        self._task = asyncio.create_task(self._poll(), name="atajo-keys-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    async def lookup(self, digest: str) -> Principal | None:
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        generation = self._generation
        self.lookups += 1
        try:
            found = await self.store.find(digest)
        except KeyStoreError as exc:
            self.store_errors += 1
            log.warning("key store lookup failed: %s", exc)
            raise ServiceUnavailable("The key store is unavailable; try again shortly.") from None
        principal = principal_of(*found, self.tenant_limits) if found is not None else None
        if generation == self._generation:  # no change was applied meanwhile: what we read is current
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (now + self.lookup_ttl_s, principal)
        return principal

    def forget(self, digest: str | None = None) -> None:
        """Drop one cached lookup (or all); lookups in flight will not cache what they read."""
        self._generation += 1
        if digest is None:
            self._cache.clear()
        else:
            self._cache.pop(digest, None)
        self.dropped += 1

    async def poll_once(self) -> None:
        """Apply the change log's new rows (raises KeyStoreError when the store cannot be read).

        On PostgreSQL a row's id is drawn when its transaction inserts it, not when it commits, so a row may
        become visible after one with a higher id. The log is therefore read from ``OVERLAP`` ids back, and
        rows already applied are skipped."""
        if self._last_event < 0:
            newest, _ = await self.store.event_ids()
            self.forget()
            self._last_event = newest
            return
        while True:
            rows = [r for r in await self.store.events_after(self._last_event - OVERLAP) if r[0] not in self._applied]
            if not rows:
                return
            if rows[0][0] > self._last_event + 1:
                _, oldest = await self.store.event_ids()
                if oldest > self._last_event + 1:  # pruned past what we read: we cannot know what we missed
                    self.forget()
            for row_id, kind, subject in rows:
                self._applied.append(row_id)
                self._last_event = max(self._last_event, row_id)
                self.forget(subject if kind == "key" else None)
            if len(rows) < 1000:
                return

    async def _poll(self) -> None:
        failing_since: float | None = None
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
                failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Fail closed past a second: a revocation made meanwhile must not stay usable here, so every
                # cached lookup is forgotten (virtual keys then answer 503 until the store is back).
                now = self.clock()
                if failing_since is None:
                    log.warning("key store change log unreadable (%s)", type(exc).__name__)
                    failing_since = now
                elif now - failing_since >= 1.0:
                    self.forget()
