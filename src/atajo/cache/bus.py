"""Cross-instance invalidation: over Redis pub/sub, or, with no Redis, over a log table in the shared SQL
database (SQLite file or PostgreSQL) that every instance polls.

The instance that takes an invalidation applies it to every tier, shared ones included, then publishes it;
every other instance drops the matching entries from its own per-process tier. Pub/sub does not replay what
a disconnected subscriber missed, so after a reconnect the per-process tier is flushed as a whole: a few
extra misses, never a stale answer. The SQL log keeps an hour of invalidations; an instance that could not
read it for longer, or hit an error reading it, flushes likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from atajo.cache.entry import Selector

log = logging.getLogger("atajo.cache")

CHANNEL = "atajo:cache:invalidate"


@dataclass(frozen=True, slots=True)
class BusMessage:
    """An invalidation (``selector``) or a flush (``selector`` None; ``tenant`` None: every tenant)."""

    selector: Selector | None
    tenant: str | None = None

    def encode(self, origin: str) -> bytes:
        sel = self.selector
        body = {
            "origin": origin,
            "tenant": sel.tenant if sel else self.tenant,
            "flush": sel is None,
            "tags": sorted(sel.tags) if sel else [],
            "namespace": sel.namespace if sel else None,
            "key_prefix": sel.key_prefix if sel else None,
        }
        return orjson.dumps(body)

    @staticmethod
    def decode(raw: bytes) -> tuple[str, BusMessage]:
        data = orjson.loads(raw)
        tenant = data.get("tenant")
        if data.get("flush"):
            return data["origin"], BusMessage(None, tenant)
        selector = Selector(tenant, frozenset(data.get("tags") or ()), data.get("namespace"), data.get("key_prefix"))
        return data["origin"], BusMessage(selector)


Handler = Callable[[BusMessage], Awaitable[None]]
Reconnected = Callable[[], Awaitable[None]]


class InvalidationBus(Protocol):
    origin: str
    received: int

    async def start(self, on_message: Handler, on_reconnect: Reconnected) -> None: ...

    async def publish(self, message: BusMessage) -> None: ...

    async def close(self) -> None: ...


class InvalidationLog(Protocol):
    """What the SQL backend offers the SQL bus."""

    async def append_invalidation(self, message: bytes) -> None: ...

    async def invalidations_after(self, after_id: int) -> list[tuple[int, bytes]]: ...

    async def invalidation_ids(self) -> tuple[int, int]: ...


SQL_POLL_S = 0.25


class SqlBus:
    """Invalidations through the shared database: appended to a log table, polled by every instance."""

    def __init__(self, log: InvalidationLog, *, poll_s: float = SQL_POLL_S) -> None:
        self.log = log
        self.poll_s = poll_s
        self.origin = secrets.token_hex(8)
        self.received = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self, on_message: Handler, on_reconnect: Reconnected) -> None:
        try:
            last, _ = await self.log.invalidation_ids()
        except Exception as exc:  # fail open: start from the next readable point, flushing local tiers then
            log.warning("cache invalidation log unreadable at start-up (%s); retrying", type(exc).__name__)
            last = -1
        self._task = asyncio.create_task(self._poll(last, on_message, on_reconnect), name="atajo-cache-sql-bus")

    async def _poll(self, last: int, on_message: Handler, on_reconnect: Reconnected) -> None:
        lost = last < 0
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                if lost:
                    newest, oldest = await self.log.invalidation_ids()
                    if last < 0 or oldest > last + 1:
                        last = newest  # what was missed is gone from the log: drop everything local
                    lost = False
                    await on_reconnect()
                for row_id, raw in await self.log.invalidations_after(last):
                    last = row_id
                    try:
                        origin, message = BusMessage.decode(raw)
                    except (ValueError, KeyError, TypeError):
                        log.warning("cache invalidation log: ignoring a malformed row %d", row_id)
                        continue
                    if origin != self.origin:
                        self.received += 1
                        await on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # fail open: keep serving; flush local tiers once the log is back
                if not lost:
                    log.warning("cache invalidation log unreadable (%s); retrying", type(exc).__name__)
                lost = True

    async def publish(self, message: BusMessage) -> None:
        await self.log.append_invalidation(message.encode(self.origin))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class RedisBus:
    def __init__(self, url: str, *, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self.origin = secrets.token_hex(8)
        self.received = 0
        self.reconnects = 0
        self._client: object | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, on_message: Handler, on_reconnect: Reconnected) -> None:
        """Subscribe (waiting up to a second for the first subscription), then listen in the background."""
        import redis.asyncio as aioredis

        self._client = client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=2.0)
        subscribed = asyncio.Event()
        self._task = asyncio.create_task(
            self._listen(client, on_message, on_reconnect, subscribed), name="atajo-cache-bus"
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await subscribed.wait()
        if not subscribed.is_set():
            log.warning("cache invalidation bus: Redis not reachable yet; retrying in the background")

    async def _listen(
        self,
        client: object,
        on_message: Handler,
        on_reconnect: Callable[[], Awaitable[None]],
        subscribed: asyncio.Event,
    ) -> None:
        from redis.asyncio import Redis

        assert isinstance(client, Redis)
        first = True
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if not first:
                    self.reconnects += 1
                    await on_reconnect()  # we may have missed invalidations while away
                first = False
                subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        origin, decoded = BusMessage.decode(message["data"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("cache invalidation bus: ignoring a malformed message")
                        continue
                    if origin != self.origin:
                        self.received += 1
                        await on_message(decoded)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # fail open: keep serving, resubscribe shortly, flush local tiers then
                if not first or subscribed.is_set():
                    log.warning("cache invalidation bus lost Redis (%s); reconnecting", type(exc).__name__)
                first = False
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def publish(self, message: BusMessage) -> None:
        from redis.asyncio import Redis

        assert isinstance(self._client, Redis)
        await self._client.publish(self.channel, message.encode(self.origin))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        from redis.asyncio import Redis

        if isinstance(self._client, Redis):
            await self._client.aclose()
