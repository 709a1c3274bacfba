"""Single-flight across instances: a short lease in Redis says which instance is computing an answer.

The first instance to miss sets ``{prefix}{key}`` with ``SET NX PX ttl`` and calls the provider; the others
find the lease taken and wait for the answer to appear in the shared cache tiers, checking every ``poll_s``.
While waiting they try the lease again, so one of them takes over at once if the holder failed (it deletes
its lease) or vanished (the lease expires). After ``wait_s`` a waiter calls the provider itself.

When the holder has its answer it does not delete the lease but marks it ``done`` for a short grace: the
answer is written to the shared tiers behind the response, so for a moment it is neither in the cache nor
in flight, and an instance arriving then would otherwise call again.

Redis failing never blocks a request: a failed or slow (``timeout_s``) Redis call means "no lease", the
instance computes on its own (its in-process single-flight still makes that one call per instance) and
Redis is left alone for ``retry_after_s``.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger("atajo.coalesce")

R = TypeVar("R")

_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '1' then
    return redis.call('SET', KEYS[1], 'done', 'PX', ARGV[3])
  end
  return redis.call('DEL', KEYS[1])
end
return 0
"""

DONE_GRACE_MS = 2000
"""How long a finished lease still holds others off while its answer is written to the shared tiers."""


class Claim(enum.Enum):
    OWNED = "acquired"
    """This instance holds the lease: call the provider, then ``finish``."""
    FOUND = "waited_hit"
    """Another instance's answer appeared while waiting."""
    TIMED_OUT = "waited_timeout"
    """Waited ``wait_s`` in vain: call the provider without a lease."""
    UNAVAILABLE = "error"
    """Redis failed or is being left alone: call the provider without a lease."""


class LeaseObserver(Protocol):
    def lease(self, outcome: str) -> None: ...


Sleep = Callable[[float], Awaitable[None]]


class RedisLease:
    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 30.0,
        wait_s: float = 30.0,
        poll_s: float = 0.025,
        timeout_s: float = 0.25,
        retry_after_s: float = 5.0,
        prefix: str = "atajo:lease:",
        observer: LeaseObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.url = url
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.wait_s, self.poll_s, self.timeout_s, self.retry_after_s = wait_s, poll_s, timeout_s, retry_after_s
        self.prefix = prefix
        self.observer = observer
        self.clock, self.sleep = clock, sleep
        self._tokens = (f"{os.getpid()}-{id(self):x}-{n}" for n in itertools.count(1))
        self._held: dict[str, str] = {}
        self._down_until = 0.0
        self._client: Any = None
        self._finish_script: Any = None
        self._pending: set[asyncio.Task[None]] = set()

    def _redis(self) -> Any:
        if self._client is None:
            from redis.asyncio import Redis  # the redis extra, needed only with a lease
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = Redis.from_url(
                self.url,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._finish_script = self._client.register_script(_FINISH)
        return self._client

    async def _try(self, key: str) -> bool | None:
        """Take the lease: True if taken, False if another instance holds it, None if Redis is unusable."""
        if self.clock() < self._down_until:
            return None
        token = next(self._tokens)
        try:
            taken = await asyncio.wait_for(
                self._redis().set(self.prefix + key, token, nx=True, px=self.ttl_ms), self.timeout_s
            )
        except Exception as exc:  # fail open: no lease, compute here (counted as outcome "error")
            self._down_until = self.clock() + self.retry_after_s
            log.warning("lease: Redis unavailable (%s); going without leases for %g s", exc, self.retry_after_s)
            return None
        if taken:
            self._held[key] = token
            return True
        return False

    async def claim(self, key: str, check: Callable[[], Awaitable[R | None]]) -> tuple[Claim, R | None]:
        """Take the lease for ``key``, or wait until ``check()`` finds another instance's answer."""
        deadline = self.clock() + self.wait_s
        while True:
            taken = await self._try(key)
            if taken is None:
                return self._seen(Claim.UNAVAILABLE), None
            if taken:
                return self._seen(Claim.OWNED), None
            await self.sleep(self.poll_s)
            found = await check()
            if found is not None:
                return self._seen(Claim.FOUND), found
            if self.clock() >= deadline:
                return self._seen(Claim.TIMED_OUT), None

    def _seen(self, claim: Claim) -> Claim:
        if self.observer is not None:
            self.observer.lease(claim.value)
        return claim

    def finish(self, key: str, answered: bool) -> None:
        """Give the lease up (in the background, so a cancelled caller need not wait): marked done for a short
        grace when an answer is on its way to the shared tiers, deleted when not (a waiter then takes over)."""
        token = self._held.pop(key, None)
        if token is None:
            return
        task = asyncio.get_running_loop().create_task(self._finish(key, token, answered))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish(self, key: str, token: str, answered: bool) -> None:
        try:
            self._redis()
            await asyncio.wait_for(
                self._finish_script(keys=[self.prefix + key], args=[token, "1" if answered else "0", DONE_GRACE_MS]),
                self.timeout_s,
            )
        except Exception as exc:  # the lease expires by itself within ttl_s
            log.warning("lease: could not release %s (%s); it expires by itself", key, exc)

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=1)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
