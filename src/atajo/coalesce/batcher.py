"""Micro-batching: items that arrive within a short window for the same group go out as one call.

A group's window opens with its first item and closes after ``max_wait_s``, or at once when the batch is
full (``max_items`` items or ``max_size`` in the items' own size unit); an item that would overflow the
open batch sends it and opens the next. The call runs in a task of its own, apart from the callers:

- a caller cancelled before its batch went out simply leaves the batch;
- a caller cancelled after never cancels the call for the others;
- the call's exception is raised to every caller (the same object).

``send(group, items)`` must answer one result per item, in order. Nothing here knows what is being sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class BatchObserver(Protocol):
    def batch(self, items: int, waits_s: Sequence[float]) -> None:
        """A batch went out with ``items`` items, which had waited ``waits_s`` each."""


class _Batch(Generic[I, R]):
    __slots__ = ("futures", "items", "joined", "size", "timer")

    def __init__(self) -> None:
        self.items: list[I] = []
        self.futures: list[asyncio.Future[R]] = []
        self.joined: list[float] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[I, R]):
    def __init__(
        self,
        send: Callable[[str, list[I]], Awaitable[Sequence[R]]],
        *,
        max_wait_s: float,
        max_items: int,
        max_size: int,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.send = send
        self.max_wait_s, self.max_items, self.max_size = max_wait_s, max_items, max_size
        self.observer = observer
        self.clock = clock
        self._open: dict[str, _Batch[I, R]] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    async def submit(self, group: str, item: I, size: int = 1) -> R:
        """``item``'s result, once the batch it joins has been sent and answered."""
        batch = self._open.get(group)
        if batch is not None and (len(batch.items) >= self.max_items or batch.size + size > self.max_size):
            self._dispatch(group, batch)
            batch = None
        if batch is None:
            batch = self._open[group] = _Batch()
            if self.max_wait_s > 0:
                batch.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._expire, group, batch)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        batch.items.append(item)
        batch.futures.append(future)
        batch.joined.append(self.clock())
        batch.size += size
        if len(batch.items) >= self.max_items or batch.size >= self.max_size or self.max_wait_s <= 0:
            self._dispatch(group, batch)
        try:
            # shield: this caller's cancellation must not cancel the future the call will set
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._leave(group, batch, future)
            raise

    def _expire(self, group: str, batch: _Batch[I, R]) -> None:
        if self._open.get(group) is batch:
            self._dispatch(group, batch)

    def _leave(self, group: str, batch: _Batch[I, R], future: asyncio.Future[R]) -> None:
        if self._open.get(group) is batch and future in batch.futures:  # not sent yet: drop the item
            i = batch.futures.index(future)
            del batch.items[i], batch.futures[i], batch.joined[i]
            if not batch.items:
                del self._open[group]
                if batch.timer is not None:
                    batch.timer.cancel()
        future.cancel()  # sent: its result is dropped, never reported as unretrieved

    def _dispatch(self, group: str, batch: _Batch[I, R]) -> None:
        if self._open.get(group) is batch:
            del self._open[group]
        if batch.timer is not None:
            batch.timer.cancel()
        now = self.clock()
        self.batches += 1
        self.items += len(batch.items)
        if self.observer is not None:
            self.observer.batch(len(batch.items), [now - t for t in batch.joined])
        task = asyncio.get_running_loop().create_task(self._call(group, batch))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, group: str, batch: _Batch[I, R]) -> None:
        try:
            results = await self.send(group, batch.items)
            if len(results) != len(batch.items):
                raise RuntimeError(f"a batch of {len(batch.items)} was answered with {len(results)} results")
        except asyncio.CancelledError:
            for future in batch.futures:
                future.cancel()
            raise
        except Exception as exc:  # every caller gets it
            for future in batch.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(batch.futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Send what is waiting and let the calls finish."""
        for group, batch in list(self._open.items()):
            self._dispatch(group, batch)
        if self._calls:
            await asyncio.wait(self._calls, timeout=5)
