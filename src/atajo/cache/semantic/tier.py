"""The semantic tier: after the exact tiers miss, find a stored answer to the same question asked in other words.

A lookup embeds the asked text, searches the request's partition (tenant, namespace, model and a digest of
everything but the asked text) and lets the match decision accept the best neighbour or not. A vector entry
only points at an exact-tier entry, which holds the answer: the caller reads it from the tier chain, so a
semantic hit obeys the exact tiers' TTLs and invalidations. Vectors are written behind the response, like the
exact tiers, and dropped by the same selectors.

Embeddings run on one worker thread. Texts that arrive while it is busy wait for it and go together as the
next batch, so a burst is embedded in a few batched runs without any added waiting window.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from atajo.cache.entry import Clock, Entry, Selector
from atajo.cache.semantic.decision import Decider, Match
from atajo.cache.semantic.embedder import Vectors
from atajo.cache.semantic.index import Neighbour, Vector
from atajo.cache.semantic.store import MemoryVectorStore, VectorEntry, VectorStore
from atajo.cache.write_behind import WriteBehind

log = logging.getLogger("atajo.cache")

EmbedFn = Callable[[Sequence[str]], Vectors]
"""Texts → unit vectors, one row each (blocking; runs on the embedding thread)."""
AsyncEmbedFn = Callable[[Sequence[str]], Awaitable[Vectors]]
"""Texts → vectors, awaited on the event loop (a provider's ``/v1/embeddings``)."""

MAX_EMBED_BATCH = 32
WRITE_BATCH = 256
RECENT_WRITE_S = 30.0
"""A vector written here this recently whose exact entry is not found yet is not treated as dead: its
exact write may still be queued."""


class SemanticObserver(Protocol):
    def lookup(self, outcome: str, seconds: float) -> None: ...

    def embed_batch(self, size: int) -> None: ...

    def write(self, outcome: str) -> None: ...


class _NullObserver:
    def lookup(self, outcome: str, seconds: float) -> None:
        pass

    def embed_batch(self, size: int) -> None:
        pass

    def write(self, outcome: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Query:
    """What one request asks the semantic tier."""

    partition: str
    text: str
    vector: Vector | None = None
    """Filled by ``find`` (kept for ``remember``, so a miss is embedded once)."""


@dataclass(frozen=True, slots=True)
class Found:
    query: Query
    match: Match
    """The decision, hit or not (its neighbour, probability and reason are reported either way)."""


class BatchingEmbedder:
    """Runs ``embed`` on one thread (or awaits it, when it is a coroutine function); texts queued while it
    runs go together in the next run."""

    def __init__(self, embed: EmbedFn | AsyncEmbedFn, observer: SemanticObserver) -> None:
        self._sync: EmbedFn | None = None
        self._async: AsyncEmbedFn | None = None
        if inspect.iscoroutinefunction(embed):
            self._async = embed
        else:
            self._sync = cast("EmbedFn", embed)
        self._observer = observer
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="atajo-embed")
        self._pending: list[tuple[str, asyncio.Future[Vector]]] = []
        self._running = False

    async def embed(self, text: str) -> Vector:
        future: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_EMBED_BATCH], self._pending[MAX_EMBED_BATCH:]
                self._observer.embed_batch(len(batch))
                try:
                    texts = [t for t, _ in batch]
                    if self._async is not None:
                        vectors = unit_rows(await self._async(texts))
                    else:
                        assert self._sync is not None
                        vectors = await loop.run_in_executor(self._executor, self._sync, texts)
                except Exception as exc:  # every waiter of this batch gets the failure (the tier fails open)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    if not future.done():
                        future.set_result(vector)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _write_failed(exc: Exception) -> None:  # fail open: a lost vector is a later semantic miss
    log.warning("semantic cache write failed: %s", type(exc).__name__)


class SemanticTier:
    def __init__(
        self,
        store: VectorStore,
        embed: EmbedFn | AsyncEmbedFn,
        decider: Decider,
        *,
        clock: Clock = time.time,
        neighbours: int = 4,
        timeout_s: float = 1.0,
        write_queue: int = 10_000,
        observer: SemanticObserver | None = None,
        vetoed: Callable[[Entry, int], bool] | None = None,
        load: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.decider = decider
        self.clock = clock
        self.neighbours = neighbours
        self.timeout_s = timeout_s
        self.observer: SemanticObserver = observer or _NullObserver()
        self.embedder = BatchingEmbedder(embed, self.observer)
        self._load = load
        self._vetoed = vetoed
        self._writes = WriteBehind(
            "atajo-semantic-writer",
            self._store,
            batch=WRITE_BATCH,
            observe=self.observer.write,
            failed=_write_failed,
            vetoed=self._is_vetoed,
            capacity=write_queue,
        )
        self._recent: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._flying: dict[str, dict[str, tuple[str, Vector]]] = {}
        """partition → {cache key: (asked text, vector)} of the requests being answered now."""

    @property
    def name(self) -> str:
        return self.store.name

    async def start(self) -> None:
        if self._load is not None:  # load the model now, not on the first request
            await asyncio.get_running_loop().run_in_executor(self.embedder._executor, self._load)
        await self.store.start()
        self._writes.start()

    async def close(self) -> None:
        await self.drain(2.0)
        await self._writes.stop()
        self.embedder.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until every pending embedding and write is done (tests, shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._background:
                    await asyncio.gather(*self._background, return_exceptions=True)
                await self._writes.join()

    # --- lookup -----------------------------------------------------------------------------------

    @staticmethod
    def query(partition: str, text: str) -> Query:
        return Query(partition, text)

    async def find(self, query: Query, *, embed_empty: bool = False) -> Found | None:
        """Embed, search, decide. ``None`` when the tier failed or took longer than ``timeout_s`` (a miss;
        the query is then not remembered either).

        A partition the in-process store has never seen cannot hit: unless ``embed_empty`` (the vector is
        wanted anyway, to group requests in flight), the text is then not embedded now but after the answer,
        off the request's path (``remember_answer``)."""
        started = time.perf_counter()
        if isinstance(self.store, MemoryVectorStore) and not self.store.has_partition(query.partition):
            if embed_empty:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        query = Query(query.partition, query.text, await self.embedder.embed(query.text))
                except Exception as exc:  # fail open, as below
                    log.warning("semantic cache embedding failed: %s", type(exc).__name__)
                    self.observer.lookup("error", time.perf_counter() - started)
                    return None
            self.observer.lookup("empty", time.perf_counter() - started)
            return Found(query, Match(False, None, 0.0, "empty"))
        try:
            async with asyncio.timeout(self.timeout_s):
                vector = await self.embedder.embed(query.text)
                query = Query(query.partition, query.text, vector)
                neighbours = await self.store.search(query.partition, vector, self.neighbours, self.clock())
        except Exception as exc:  # fail open: the request goes on to the provider
            log.warning("semantic cache lookup failed: %s", type(exc).__name__)
            self.observer.lookup("error", time.perf_counter() - started)
            return None
        match = self.decider.decide(query.text, neighbours, query_vector=vector)
        self.observer.lookup(match.reason, time.perf_counter() - started)
        return Found(query, match)

    async def dead(self, key: str) -> None:
        """The exact entry ``key`` points at is gone: drop the vector, unless it was written so recently that
        its exact write may still be on its way."""
        written = self._recent.get(key)
        if written is not None and self.clock() - written < RECENT_WRITE_S:
            return
        with contextlib.suppress(Exception):
            await self.store.delete([key])

    # --- grouping requests in flight --------------------------------------------------------------

    def fly(self, query: Query, key: str) -> Callable[[], None]:
        """Note that the request ``key`` asking ``query`` is being answered; returns what to call when done."""
        vector = query.vector
        if vector is None:
            return _nothing
        flying = self._flying.setdefault(query.partition, {})
        flying[key] = (query.text, vector)

        def landed() -> None:
            flying.pop(key, None)
            if not flying and self._flying.get(query.partition) is flying:
                del self._flying[query.partition]

        return landed

    def twin(self, query: Query, key: str) -> tuple[str, Match] | None:
        """An in-flight request of the same partition that the match decision says asks the same question
        as ``query`` (its cache key and the decision), or ``None``."""
        flying = self._flying.get(query.partition)
        if not flying or query.vector is None:
            return None
        others = [(k, text, vector) for k, (text, vector) in flying.items() if k != key]
        if not others:
            return None
        matrix = np.stack([vector for _, _, vector in others])
        scores = matrix @ np.asarray(query.vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[: self.neighbours]
        neighbours = [Neighbour(others[i][0], others[i][1], float(scores[i]), others[i][2]) for i in order]
        match = self.decider.decide(query.text, neighbours, query_vector=query.vector)
        if not match.hit or match.neighbour is None:
            return None
        return match.neighbour.key, match

    # --- storing ----------------------------------------------------------------------------------

    def remember(self, entry: VectorEntry, generation: int) -> None:
        """Queue a vector for the store (never waits; a full queue drops it, counted)."""
        self._writes.put(entry, generation)

    def remember_answer(
        self,
        query: Query,
        *,
        key: str,
        tenant: str,
        namespace: str,
        tags: frozenset[str],
        keep_until: float,
        generation: int,
    ) -> None:
        """Point ``query``'s text at the exact entry ``key``, embedding it first (in the background) when the
        lookup did not."""

        def entry(vector: Vector) -> VectorEntry:
            return VectorEntry(key, tenant, namespace, query.partition, query.text, vector, keep_until, tags)

        if query.vector is not None:
            self.remember(entry(query.vector), generation)
            return

        async def embed_then_remember() -> None:
            try:
                vector = await self.embedder.embed(query.text)
            except Exception as exc:  # a lost vector is a later miss
                log.warning("semantic cache embedding failed: %s", type(exc).__name__)
                self.observer.write("error")
                return
            self.remember(entry(vector), generation)

        task = asyncio.get_running_loop().create_task(embed_then_remember())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store(self, entries: list[VectorEntry]) -> None:
        now = self.clock()
        await self.store.add_many(entries)
        for e in entries:
            self._recent[e.key] = now
        self._forget_old(now)

    def _is_vetoed(self, e: VectorEntry, generation: int) -> bool:
        if self._vetoed is None:
            return False
        probe = Entry(e.key, e.tenant, e.namespace, b"", 0.0, 0.0, e.keep_until, e.tags)
        return self._vetoed(probe, generation)

    def _forget_old(self, now: float) -> None:
        if len(self._recent) > 4 * WRITE_BATCH:
            self._recent = {k: t for k, t in self._recent.items() if now - t < RECENT_WRITE_S}

    # --- invalidation and upkeep ------------------------------------------------------------------

    async def invalidate(self, selector: Selector) -> int:
        return await self.store.invalidate(selector)

    async def flush(self, tenant: str | None) -> int:
        return await self.store.flush(tenant)

    async def purge_expired(self) -> int:
        return await self.store.purge_expired(self.clock())

    async def count(self) -> int:
        return await self.store.count()


def _nothing() -> None:
    pass


def unit_rows(vectors: Vectors) -> Vectors:
    """Rows scaled to unit length (embeddings from a provider are not always normalised)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    result: Vectors = v / np.clip(norms, 1e-12, None)
    return result


def vectors_from_openai(body: object, count: int) -> Vectors:
    """The vectors of an OpenAI ``/v1/embeddings`` answer, in input order; ``ValueError`` when malformed."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise ValueError(f"expected {count} embeddings in the answer's data")
    rows: list[object] = [None] * count
    for i, item in enumerate(data):
        index = item.get("index", i) if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or not isinstance(item.get("embedding"), list):
            raise ValueError("an embedding in the answer has no valid index or vector")
        rows[index] = item["embedding"]
    matrix = np.asarray(rows, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError("the answer's embeddings differ in length")
    return matrix
