"""An in-process vector index, partitioned, bounded, with exact cosine scores.

A partition is an opaque string (the caller builds it from tenant, model, and a digest of the system
prompt, tools and answer-affecting parameters): a search only ever sees the entries of its own partition,
so answers cannot leak across tenants or models. Entries are keyed by the exact tier's entry key, so an
invalidation that drops a key there can drop it here with ``delete``.

Small partitions are searched brute force (one matrix-vector product over unit vectors). A partition that
grows past ``ann_threshold`` entries also gets an HNSW graph (``usearch``): it proposes candidates, which
are then rescored exactly against the stored vectors, so the scores returned are always exact cosines.
Brute force over 100,000 vectors costs 20-35 ms on one core; the graph answers in about 1 ms.

The index is bounded by ``max_entries`` over all partitions; past it the least recently added or touched
entry is evicted. Thread-safe (one lock).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Neighbour:
    key: str
    text: str
    """The meaning-bearing text that was embedded (the match decision compares it with the query)."""
    score: float
    """Cosine similarity with the query, in [-1, 1]."""
    vector: Vector | None = field(default=None, compare=False, repr=False)
    """The stored unit vector (a copy), for a decision that looks at more than the cosine; may be absent."""


class _Partition:
    """Rows of unit vectors with stable slot numbers; freed slots are reused."""

    __slots__ = ("alive", "ann", "dimension", "free", "high", "keys", "matrix", "texts")

    def __init__(self, dimension: int, capacity: int = 64) -> None:
        self.dimension = dimension
        self.matrix = np.zeros((capacity, dimension), dtype=np.float32)
        self.alive = np.zeros(capacity, dtype=bool)
        self.keys: list[str] = [""] * capacity
        self.texts: list[str] = [""] * capacity
        self.free: list[int] = []
        self.high = 0
        """Slots below this have been used."""
        self.ann: Any = None

    def __len__(self) -> int:
        return self.high - len(self.free)

    def add(self, key: str, vector: Vector, text: str) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            if self.high == len(self.alive):
                self._grow()
            slot = self.high
            self.high += 1
        self.matrix[slot] = vector
        self.alive[slot] = True
        self.keys[slot] = key
        self.texts[slot] = text
        if self.ann is not None:
            self.ann.add(slot, vector, threads=1)
        return slot

    def remove(self, slot: int) -> None:
        self.alive[slot] = False
        self.matrix[slot] = 0.0
        self.keys[slot] = ""
        self.texts[slot] = ""
        self.free.append(slot)
        if self.ann is not None:
            self.ann.remove(slot)

    def _grow(self) -> None:
        capacity = len(self.alive) * 2
        matrix = np.zeros((capacity, self.dimension), dtype=np.float32)
        matrix[: self.high] = self.matrix[: self.high]
        alive = np.zeros(capacity, dtype=bool)
        alive[: self.high] = self.alive[: self.high]
        self.matrix, self.alive = matrix, alive
        self.keys.extend([""] * (capacity - len(self.keys)))
        self.texts.extend([""] * (capacity - len(self.texts)))

    def build_ann(self) -> None:
        # onnxruntime (1.32) crashes with SIGSEGV when it is imported after usearch (2.26) is loaded;
        # the other order is fine. The embedder needs onnxruntime later, so load it first when installed.
        with contextlib.suppress(ImportError):
            import onnxruntime  # noqa: F401

        from usearch.index import Index

        ann = Index(
            ndim=self.dimension, metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=96
        )
        slots = np.flatnonzero(self.alive[: self.high]).astype(np.uint64)
        if len(slots):
            ann.add(slots, self.matrix[slots.astype(np.int64)], threads=1)
        self.ann = ann

    def search(self, query: Vector, k: int) -> list[tuple[int, float]]:
        n = len(self)
        if n == 0:
            return []
        k = min(k, n)
        if self.ann is not None:
            found = self.ann.search(query, max(4 * k, 16), threads=1)
            candidates = np.asarray(found.keys, dtype=np.int64)
            candidates = candidates[self.alive[candidates]]
        else:
            candidates = np.flatnonzero(self.alive[: self.high])
        scores = self.matrix[candidates] @ query
        if len(candidates) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            candidates, scores = candidates[top], scores[top]
        order = np.argsort(-scores, kind="stable")
        return [(int(candidates[i]), float(scores[i])) for i in order]


class VectorIndex:
    """Top-k cosine search per partition, delete by entry key, bounded size."""

    def __init__(self, dimension: int = 384, max_entries: int = 100_000, ann_threshold: int = 20_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.dimension = dimension
        self.max_entries = max_entries
        self.ann_threshold = ann_threshold
        self._partitions: dict[str, _Partition] = {}
        self._where: OrderedDict[str, tuple[str, int]] = OrderedDict()
        """entry key → (partition, slot), oldest first."""
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def has_partition(self, partition: str) -> bool:
        return partition in self._partitions

    @property
    def partitions(self) -> int:
        return len(self._partitions)

    def add(self, partition: str, key: str, vector: Vector, text: str) -> None:
        """Store (or replace) ``key``'s vector in ``partition``. ``vector`` must be unit length."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dimension:
            raise ValueError(f"expected a vector of {self.dimension} dimensions, got {vector.shape[0]}")
        with self._lock:
            if key in self._where:
                self._remove(key)
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = _Partition(self.dimension)
            slot = part.add(key, vector, text)
            self._where[key] = (partition, slot)
            if part.ann is None and len(part) >= self.ann_threshold:
                part.build_ann()
            while len(self._where) > self.max_entries:
                oldest = next(iter(self._where))
                self._remove(oldest)
                self.evictions += 1

    def delete(self, key: str) -> bool:
        """Drop ``key`` wherever it is; whether it was there."""
        with self._lock:
            if key not in self._where:
                return False
            self._remove(key)
            return True

    def touch(self, key: str) -> None:
        """Mark ``key`` as recently used (it will be evicted last)."""
        with self._lock:
            if key in self._where:
                self._where.move_to_end(key)

    def clear(self) -> None:
        with self._lock:
            self._partitions.clear()
            self._where.clear()

    def search(self, partition: str, vector: Vector, k: int = 2) -> list[Neighbour]:
        """The ``k`` nearest entries of ``partition`` by cosine, best first (fewer if it holds fewer), each with
        a copy of its stored vector."""
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._lock:
            part = self._partitions.get(partition)
            if part is None or k < 1:
                return []
            return [
                Neighbour(part.keys[s], part.texts[s], score, part.matrix[s].copy())
                for s, score in part.search(query, k)
            ]

    def _remove(self, key: str) -> None:
        partition, slot = self._where.pop(key)
        part = self._partitions[partition]
        part.remove(slot)
        if len(part) == 0:
            del self._partitions[partition]
