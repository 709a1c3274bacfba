"""The semantic tier's mechanics with a deterministic embedding function: batching of concurrent texts,
failing open, the lookup budget, write-behind with invalidation vetoes, and dead pointers."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from atajo.cache.entry import Entry, Selector
from atajo.cache.semantic.decision import Decider
from atajo.cache.semantic.embedder import Vectors
from atajo.cache.semantic.store import MemoryVectorStore
from atajo.cache.semantic.tier import SemanticTier


def vector_of(text: str) -> np.ndarray:
    """A unit vector that depends only on the lower-cased words (so case and punctuation do not matter)."""
    words = "".join(c for c in text.lower() if c.isalnum() or c == " ").split()
    seed = int.from_bytes(hashlib.sha256(" ".join(words).encode()).digest()[:4], "big")
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


class Recorder:
    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, texts: Sequence[str]) -> Vectors:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(texts))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model broke")
        return np.stack([vector_of(t) for t in texts])


LENIENT = Decider.from_dict(Decider.default().to_dict() | {"threshold": 0.5})


def tier(embed: Recorder, store: MemoryVectorStore | None = None, **kw: object) -> SemanticTier:
    return SemanticTier(store or MemoryVectorStore(), embed, LENIENT, **kw)  # type: ignore[arg-type]


async def remember(
    t: SemanticTier, text: str, key: str, *, tags: frozenset[str] = frozenset(), generation: int = 0
) -> None:
    found = await t.find(t.query("acme/default/m/p", text))
    assert found is not None
    t.remember_answer(
        found.query,
        key=key,
        tenant="acme",
        namespace="default",
        tags=tags,
        keep_until=time.time() + 60,
        generation=generation,
    )
    await t.drain()


async def test_concurrent_texts_are_embedded_together_off_the_event_loop() -> None:
    embed = Recorder(delay_s=0.05)
    t = tier(embed)
    await t.start()
    await remember(t, "seed question", "acme/default/m/v1-a")  # the partition now exists, so lookups embed
    embed.batches.clear()
    found = await asyncio.gather(*(t.find(t.query("acme/default/m/p", f"question {i}")) for i in range(10)))
    assert all(f is not None and f.query.vector is not None for f in found)
    assert sum(len(b) for b in embed.batches) == 10
    assert len(embed.batches) <= 3  # the first text alone, then everything that queued while it ran
    assert embed.threads == {"atajo-embed_0"}
    await t.close()


async def test_an_unseen_partition_is_not_embedded_at_lookup_but_after_the_answer() -> None:
    embed = Recorder()
    t = tier(embed)
    await t.start()
    found = await t.find(t.query("acme/default/m/p", "first question"))
    assert found is not None and found.match.reason == "empty" and found.query.vector is None
    assert embed.batches == []
    t.remember_answer(found.query, key="acme/default/m/v1-a", tenant="acme", namespace="default", tags=frozenset(),
                      keep_until=time.time() + 60, generation=0)  # fmt: skip
    await t.drain()
    assert embed.batches == [["first question"]]
    again = await t.find(t.query("acme/default/m/p", "First question?"))
    assert again is not None and again.match.hit and again.match.neighbour is not None
    assert again.match.neighbour.key == "acme/default/m/v1-a"
    await t.close()


async def test_a_failing_model_is_a_miss_not_an_error() -> None:
    store = MemoryVectorStore()
    t = tier(Recorder(fail=True), store)
    await t.start()
    store.index.add("acme/default/m/p", "k", vector_of("x"), "x")  # make the partition known
    assert await t.find(t.query("acme/default/m/p", "anything")) is None
    await t.close()


async def test_a_lookup_past_its_budget_is_a_miss() -> None:
    store = MemoryVectorStore()
    t = tier(Recorder(delay_s=0.3), store, timeout_s=0.05)
    await t.start()
    store.index.add("acme/default/m/p", "k", vector_of("x"), "x")
    started = time.perf_counter()
    assert await t.find(t.query("acme/default/m/p", "anything")) is None
    assert time.perf_counter() - started < 0.25
    await t.close()


async def test_writes_from_before_a_matching_invalidation_are_vetoed() -> None:
    vetoes: list[tuple[str, int]] = []

    def vetoed(entry: Entry, generation: int) -> bool:
        vetoes.append((entry.key, generation))
        return generation < 1 and "user:1" in entry.tags

    t = tier(Recorder(), vetoed=vetoed)
    await t.start()
    await remember(t, "my profile", "acme/default/m/v1-a", tags=frozenset({"user:1"}), generation=0)
    await remember(t, "my orders", "acme/default/m/v1-b", tags=frozenset({"user:2"}), generation=0)
    assert await t.count() == 1
    assert ("acme/default/m/v1-a", 0) in vetoes
    await t.close()


async def test_invalidation_flush_and_expiry_reach_vectors() -> None:
    t = tier(Recorder())
    await t.start()
    await remember(t, "one", "acme/default/m/v1-a", tags=frozenset({"faq:1"}))
    await remember(t, "two", "acme/default/m/v1-b", tags=frozenset({"faq:2"}))
    assert await t.invalidate(Selector("acme", frozenset({"faq:1"}))) == 1
    assert await t.invalidate(Selector("globex", frozenset({"faq:2"}))) == 0
    assert await t.count() == 1
    assert await t.flush("acme") == 1
    assert await t.count() == 0
    await t.close()


async def test_a_dead_pointer_is_dropped_unless_it_was_just_written() -> None:
    now = [1000.0]
    t = tier(Recorder(), clock=lambda: now[0])
    await t.start()
    await remember(t, "one", "acme/default/m/v1-a")
    await t.dead("acme/default/m/v1-a")  # its exact write may still be queued: kept
    assert await t.count() == 1
    now[0] += 31
    await t.dead("acme/default/m/v1-a")
    assert await t.count() == 0
    await t.close()


async def test_a_full_write_queue_drops_and_counts() -> None:
    outcomes: list[str] = []

    class Observer:
        def lookup(self, outcome: str, seconds: float) -> None:
            pass

        def embed_batch(self, size: int) -> None:
            pass

        def write(self, outcome: str) -> None:
            outcomes.append(outcome)

    t = tier(Recorder(), write_queue=1, observer=Observer())
    found = await t.find(t.query("acme/default/m/p", "x"))  # not started: nothing drains the queue
    assert found is not None
    query = type(found.query)(found.query.partition, "x", vector_of("x"))
    for key in ("acme/default/m/v1-a", "acme/default/m/v1-b"):
        t.remember_answer(query, key=key, tenant="acme", namespace="default", tags=frozenset(),
                          keep_until=time.time() + 60, generation=0)  # fmt: skip
    assert outcomes == ["dropped"]


def test_a_broken_decision_in_config_is_a_config_error_naming_it() -> None:
    from atajo.cache.semantic_build import build_semantic
    from atajo.errors import ConfigError
    from atajo.settings import SemanticSettings

    with pytest.raises(ConfigError, match=r"cache\.semantic\.decision"):
        build_semantic(SemanticSettings(enabled=True, decision={"weights": [1.0]}), embed=Recorder())
    with pytest.raises(ConfigError, match=r"cache\.semantic\.decision: unknown setting\(s\) treshold"):
        build_semantic(SemanticSettings(enabled=True, decision={"treshold": 0.5}), embed=Recorder())
    with pytest.raises(ConfigError, match=r"cache\.semantic\.decision: .*nowhere\.npz"):
        build_semantic(SemanticSettings(enabled=True, decision={"model": "/nowhere.npz"}), embed=Recorder())
