"""Writing behind the response, for the exact tiers and the semantic tier alike: one bounded queue and one task
per store. A full queue drops the write; writes that queued up meanwhile are stored together (up to a batch);
each is checked against the invalidations since its request started (vetoed); a failed write is lost, a
later miss, and never fails a request. Outcomes reported: ok, error, dropped, vetoed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def _always() -> bool:
    return True


class WriteBehind(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], Awaitable[None]],
        *,
        batch: int,
        observe: Callable[[str], None],
        failed: Callable[[Exception], None],
        vetoed: Callable[[T, int], bool] | None = None,
        usable: Callable[[], bool] = _always,
        capacity: int = 10_000,
        linger_s: float = 0.0,
    ) -> None:
        """``write`` stores a batch (and raises when it could not); ``usable`` False drops the batch unwritten (a
        store known to be down); ``linger_s`` waits for more writes to join the first (one commit per batch)."""
        self.name = name
        self._write = write
        self._batch = batch
        self._observe = observe
        self._failed = failed
        self._vetoed = vetoed
        self._usable = usable
        self.linger_s = linger_s
        self.queue: asyncio.Queue[tuple[T, int]] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None

    def put(self, item: T, generation: int) -> None:
        """Queue ``item`` (never waits)."""
        try:
            self.queue.put_nowait((item, generation))
        except asyncio.QueueFull:
            self._observe("dropped")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def join(self) -> None:
        """Until every queued write is done."""
        await self.queue.join()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.linger_s:
                await asyncio.sleep(self.linger_s)
            while len(batch) < self._batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._store(batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _store(self, batch: list[tuple[T, int]]) -> None:
        items = []
        for item, generation in batch:
            if self._vetoed is not None and self._vetoed(item, generation):
                self._observe("vetoed")
            else:
                items.append(item)
        if not items:
            return
        outcome = "ok"
        if not self._usable():
            outcome = "dropped"
        else:
            try:
                await self._write(items)
            except Exception as exc:
                self._failed(exc)
                outcome = "error"
        for _ in items:
            self._observe(outcome)
