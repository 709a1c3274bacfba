"""An adaptive cap on calls in flight per upstream deployment (AIMD), so a struggling provider is not
hammered: the cap is multiplied by ``decrease`` (0.5) on a sign of distress (a 429 or 503 from the provider, a
timeout), at most once per ``cooldown_s``, and grows by one after each full cap's worth of successes while it
is in use. A call beyond the cap waits up to ``queue_timeout_s`` for a slot, then fails with
``DeploymentSaturated`` (429), which the upstream stage treats as this deployment being unavailable: it moves
on to the next deployment or fallback, without retrying this one and without counting against its circuit.

``GuardedProvider`` wraps a provider adapter: the upstream stage's code does not change. A stream holds its
slot until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.core.results import Completion
from atajo.errors import DeploymentSaturated, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from atajo.settings import ConcurrencySettings
from atajo.types import JSONObject


class Adapter(Protocol):
    """A provider adapter (``atajo.providers.base.Provider``), as far as this module needs one."""

    name: str

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion: ...

    def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]: ...

    async def embeddings(
        self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str
    ) -> Completion: ...


def distress(err: BaseException) -> bool:
    """The provider says it is overloaded: a 429 or 503 of its own, or it did not answer in time."""
    if isinstance(err, DeploymentSaturated):
        return False  # ours, not the provider's
    if isinstance(err, UpstreamUnavailable):
        return err.upstream_status in (429, 503)
    return isinstance(err, UpstreamTimeout)


class AIMD:
    """The cap of one deployment."""

    def __init__(self, settings: ConcurrencySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.limit = float(settings.initial)
        self.in_flight = 0
        self.saturated = 0
        self.decreases = 0
        self._successes = 0
        self._last_decrease = -math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def cap(self) -> int:
        return max(self.settings.min, int(self.limit))

    def try_acquire(self) -> bool:
        if self.in_flight < self.cap:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> bool:
        """A slot, waiting up to ``queue_timeout_s`` for one (first come, first served)."""
        if not self._waiters and self.try_acquire():
            return True
        if self.settings.queue_timeout_s <= 0:
            self.saturated += 1
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        granted = False
        try:
            async with asyncio.timeout(self.settings.queue_timeout_s):
                await waiter  # release() hands the slot over: in_flight already counts us
            granted = True
        except TimeoutError:
            granted = waiter.done() and not waiter.cancelled()  # handed over just as the wait timed out
            if not granted:
                self.saturated += 1
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release("other")  # handed a slot this caller will not use
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return granted

    def release(self, outcome: str) -> None:
        """``ok``, ``distress`` or ``other`` (a failure that says nothing about load)."""
        self.in_flight -= 1
        s = self.settings
        if outcome == "distress":
            now = self.clock()
            if now - self._last_decrease >= s.cooldown_s:
                self._last_decrease = now
                self.limit = max(float(s.min), self.limit * s.decrease)
                self.decreases += 1
                self._successes = 0
        elif outcome == "ok" and self.in_flight + 1 >= self.cap / 2:  # grow only a cap that is in use
            self._successes += 1
            if self._successes >= self.cap:
                self._successes = 0
                self.limit = min(float(s.max), self.limit + 1)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.cap:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)


class ConcurrencyBoard:
    def __init__(self, settings: ConcurrencySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.caps: dict[str, AIMD] = {}

    def get(self, deployment_id: str) -> AIMD:
        cap = self.caps.get(deployment_id)
        if cap is None:
            cap = self.caps[deployment_id] = AIMD(self.settings, self.clock)
        return cap


class GuardedProvider:
    """``provider`` with each deployment's calls held to its adaptive cap."""

    def __init__(self, provider: Adapter, board: ConcurrencyBoard) -> None:
        self.provider = provider
        self.board = board
        self.name = provider.name

    async def _slot(self, deployment: Deployment) -> AIMD:
        cap = self.board.caps.get(deployment.id) or self.board.get(deployment.id)
        if not cap._waiters and cap.try_acquire():  # the common case, without a wait's machinery
            return cap
        if not await cap.acquire():
            raise DeploymentSaturated(
                f"deployment {deployment.id} is at its concurrency limit ({cap.cap} calls in flight); "
                "the provider is being spared"
            )
        return cap

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion:
        return await self._guarded(deployment, self.provider.chat(request, deployment, upstream_model))

    async def _guarded(self, deployment: Deployment, call: Awaitable[Completion]) -> Completion:
        """``call`` in one of the deployment's slots, its outcome told to the cap. The call is created before
        the slot is taken but only runs once it is awaited (it is a coroutine)."""
        try:
            cap = await self._slot(deployment)
        except BaseException:
            if inspect.iscoroutine(call):
                call.close()  # never awaited: close it, or Python warns
            raise
        outcome = "other"
        try:
            result = await call
            outcome = "ok"
            return result
        except UpstreamError as err:
            outcome = "distress" if distress(err) else "other"
            raise
        finally:
            cap.release(outcome)

    async def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]:
        cap = await self._slot(deployment)
        outcome = "other"
        chunks = self.provider.chat_stream(request, deployment, upstream_model)
        try:
            async for chunk in chunks:
                yield chunk
            outcome = "ok"
        except UpstreamError as err:
            outcome = "distress" if distress(err) else "other"
            raise
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()
            cap.release(outcome)

    async def embeddings(self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str) -> Completion:
        return await self._guarded(deployment, self.provider.embeddings(request, deployment, upstream_model))
