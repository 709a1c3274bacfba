"""The collector of requests sent with ``x-atajo-priority: batch``: they wait in the batch store, grouped by
tenant, key and endpoint, until their collection is sealed into one internal batch that the deferred lane's
worker runs like any other.

A collection's window opens with its first request and closes ``batches.collect_window_s`` later, or at once
when it holds ``batches.collect_max`` requests. Sealing takes the requests, writes an input file of them
(their handle ids as ``custom_id``s) and creates the batch, in one transaction: with several instances, each
request goes into exactly one batch. Everything is in the store, so queued requests survive a restart: the
next collector to look seals what is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from atajo.batches.store import BatchStore, Queued, StoredFile
from atajo.core.batches import input_line
from atajo.settings import BatchSettings
from atajo.types import JSONObject

log = logging.getLogger("atajo.batches")

SOURCE = "x-atajo-priority: batch"
"""The ``metadata.source`` of a batch the collector made (clients see those batches too)."""


def new_batch(
    batch_id: str,
    endpoint: str,
    input_file_id: str,
    total: int,
    now: float,
    settings: BatchSettings,
    *,
    tenant: str,
    key_name: str,
    metadata: dict[str, str] | None,
) -> JSONObject:
    """A new batch object, ``validating``, as OpenAI's Batch API shapes it (``_atajo`` is never shown)."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": int(now),
        "in_progress_at": None,
        "expires_at": int(now + settings.expire_after_s),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": metadata,
        "_atajo": {"tenant": tenant, "key": key_name},
    }


class Collector:
    def __init__(
        self,
        store: BatchStore,
        settings: BatchSettings,
        new_id: Callable[[str], str],
        on_sealed: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.new_id = new_id
        self.on_sealed = on_sealed
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sealed = 0
        self.failures = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="atajo-batch-collector")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def queue(self, request: Queued) -> None:
        """Store a request in its collection. The collector is told when that opens a window (so it knows
        when to close it) or fills the collection."""
        held = await self.store.queue_request(request)
        if held == 1 or held >= self.settings.collect_max:
            self.wake()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait_s = self.settings.poll_interval_s
            try:
                due = await self.step()
                if due is not None:
                    wait_s = min(wait_s, max(due - self.clock(), 0.0))
            except Exception:  # a database failure or a bug: logged and counted, tried again at the next look
                self.failures += 1
                log.exception("sealing queued batch requests failed")
            # At least every poll interval: another instance may have queued requests whose window it cannot
            # close (it stopped).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)

    async def step(self) -> float | None:
        """Seal every collection that is due (full, or its window over); when the next window closes."""
        now = self.clock()
        window, most = self.settings.collect_window_s, self.settings.collect_max
        next_due: float | None = None
        sealed = 0
        for c in await self.store.collections():
            held, due = c.count, now >= c.oldest + window
            while held and (due or held >= most):
                batch_id = await self.store.seal(
                    c.tenant, c.key_name, c.endpoint, most, lambda queued: self._make(queued, now)
                )
                if batch_id is None:
                    break
                sealed += 1
                held -= min(held, most)
            if held and not due:
                next_due = c.oldest + window if next_due is None else min(next_due, c.oldest + window)
        if sealed:
            self.sealed += sealed
            self.on_sealed()
        return next_due

    def _make(self, queued: list[Queued], now: float) -> tuple[JSONObject, StoredFile, bytes]:
        first = queued[0]
        batch_id = self.new_id("batch_")
        content = b"".join(input_line(q.id, q.endpoint, q.body) for q in queued)
        file = StoredFile(
            self.new_id("file-"),
            first.tenant,
            "batch",
            f"{batch_id}_input.jsonl",
            len(content),
            now,
            now + self.settings.keep_files_s,
        )
        batch = new_batch(
            batch_id,
            first.endpoint,
            file.id,
            len(queued),
            now,
            self.settings,
            tenant=first.tenant,
            key_name=first.key_name,
            metadata={"source": SOURCE},
        )
        log.info("sealed %d queued requests of tenant %s into batch %s", len(queued), first.tenant, batch_id)
        return batch, file, content
