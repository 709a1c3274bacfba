"""The contract every ``VectorStore`` keeps: the same assertions against the in-process store and PostgreSQL
with pgvector. ``selector_matches`` is the reference for what an invalidation drops; numpy's cosine is the
reference for scores.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from atajo.cache.entry import Selector
from atajo.cache.semantic.index import Vector
from atajo.cache.semantic.store import VectorEntry, VectorStore, selector_matches

DIM = 384
NOW = 10_000.0


def unit(seed: int, dimension: int = DIM) -> Vector:
    v = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return v / np.linalg.norm(v)


def near(base: Vector, seed: int, noise: float) -> Vector:
    """A unit vector close to ``base`` (cosine about ``1 / sqrt(1 + noise**2)``)."""
    v: Vector = base + noise * unit(seed, len(base))
    return v / np.float32(np.linalg.norm(v))


def ventry(
    key: str,
    vector: Vector,
    *,
    partition: str = "p",
    keep_until: float = NOW + 600,
    tags: Iterable[str] = (),
    text: str | None = None,
) -> VectorEntry:
    """An entry under ``key`` = ``{tenant}/{namespace}/…``."""
    tenant, namespace = key.split("/")[:2]
    return VectorEntry(key, tenant, namespace, partition, text or f"text of {key}", vector, keep_until, frozenset(tags))


async def keys_in(store: VectorStore, partitions: Iterable[str], now: float = NOW) -> set[str]:
    """Every live key of these partitions, as searches see them."""
    found: set[str] = set()
    for partition in partitions:
        found |= {n.key for n in await store.search(partition, unit(0), 1000, now)}
    return found


# --- searching ----------------------------------------------------------------------------------------


async def test_nearest_first_with_exact_cosine_scores(store: VectorStore) -> None:
    entries = [ventry(f"t/ns/m/{i}", unit(i)) for i in range(40)]
    entries.append(ventry("t/ns/m/close", near(unit(3), 99, 0.3)))
    await store.add_many(entries)
    vectors = {e.key: e.vector for e in entries}
    query = unit(3)

    found = await store.search("p", query, 5, NOW)

    exact = sorted(vectors, key=lambda key: -float(vectors[key] @ query))[:5]
    assert [n.key for n in found] == exact
    assert found[0].key == "t/ns/m/3" and found[0].text == "text of t/ns/m/3"
    assert found[0].score == pytest.approx(1.0, abs=1e-5)
    assert found[1].key == "t/ns/m/close"
    for n in found:
        assert n.score == pytest.approx(float(vectors[n.key] @ query), abs=1e-5)
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)
    assert len(await store.search("p", query, 100, NOW)) == 41, "k beyond the partition: all of it"
    assert await store.search("p", query, 0, NOW) == []


async def test_partitions_never_see_each_other(store: VectorStore) -> None:
    same = unit(1)
    await store.add_many(
        [
            ventry("a/ns/x/1", same, partition="a|model-x"),
            ventry("b/ns/x/1", unit(2), partition="b|model-x"),
            ventry("a/ns/y/1", same, partition="a|model-y"),
        ]
    )

    assert [n.key for n in await store.search("b|model-x", same, 5, NOW)] == ["b/ns/x/1"]
    assert [n.key for n in await store.search("a|model-x", same, 5, NOW)] == ["a/ns/x/1"]
    assert [n.key for n in await store.search("a|model-y", same, 5, NOW)] == ["a/ns/y/1"]
    assert await store.search("c|model-x", same, 5, NOW) == []
    assert await store.search("a|model", same, 5, NOW) == [], "a partition is matched whole, not as a prefix"


async def test_adding_a_key_again_replaces_everything_about_it(store: VectorStore) -> None:
    await store.add_many([ventry("t/ns/m/1", unit(1), partition="old", tags={"user:1"}, text="old text")])
    await store.add_many(
        [ventry("t/ns/m/1", unit(2), partition="new", tags={"user:2"}, text="new text", keep_until=NOW + 5)]
    )

    assert await store.count() == 1
    assert await store.search("old", unit(1), 5, NOW) == []
    [found] = await store.search("new", unit(2), 5, NOW)
    assert (found.key, found.text) == ("t/ns/m/1", "new text")
    assert found.score == pytest.approx(1.0, abs=1e-5)
    assert await store.invalidate(Selector("t", frozenset({"user:1"}))) == 0, "the old tags are gone"
    assert await store.search("new", unit(2), 5, NOW + 5) == [], "the new keep_until applies"
    await store.purge_expired(NOW + 5)  # (the memory store may have dropped it already, when found expired)
    assert await store.count() == 0


async def test_a_batch_with_a_key_twice_keeps_the_last(store: VectorStore) -> None:
    await store.add_many(
        [
            ventry("t/ns/m/1", unit(1), text="first"),
            ventry("t/ns/m/2", unit(2)),
            ventry("t/ns/m/1", unit(3), text="last"),
        ]
    )
    await store.add_many([])

    assert await store.count() == 2
    found = await store.search("p", unit(3), 1, NOW)
    assert [(n.key, n.text) for n in found] == [("t/ns/m/1", "last")]


async def test_a_vector_of_the_wrong_dimension_is_refused(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="384"):
        await store.add_many([ventry("t/ns/m/1", unit(1, 8))])
    assert await store.count() == 0


# --- expiry -------------------------------------------------------------------------------------------


async def test_expired_entries_are_never_returned(store: VectorStore) -> None:
    query = unit(7)
    short = [ventry(f"t/ns/m/short{i}", near(query, i, 0.1), keep_until=NOW + 10) for i in range(12)]
    long = [ventry(f"t/ns/m/long{i}", near(query, 100 + i, 1.0), keep_until=NOW + 1000) for i in range(3)]
    await store.add_many([*short, *long])

    before = await store.search("p", query, 3, NOW + 9.999)
    assert {n.key for n in before} <= {e.key for e in short}, "the short-lived ones are nearest while alive"

    # exactly keep_until: gone; the 12 expired entries are all nearer than the live ones, which are still found
    after = await store.search("p", query, 3, NOW + 10)
    assert sorted(n.key for n in after) == sorted(e.key for e in long)
    assert await store.search("p", query, 20, NOW + 10) == after


async def test_purge_expired_drops_exactly_those_past_keep_until(store: VectorStore) -> None:
    await store.add_many(
        [
            ventry("t/ns/m/1", unit(1), keep_until=NOW + 10),
            ventry("t/ns/m/2", unit(2), keep_until=NOW + 10, partition="q"),
            ventry("t/ns/m/3", unit(3), keep_until=NOW + 10.001),
        ]
    )

    assert await store.purge_expired(NOW + 9.999) == 0
    assert await store.purge_expired(NOW + 10) == 2
    assert await store.purge_expired(NOW + 10) == 0
    assert await store.count() == 1
    assert await keys_in(store, ["p", "q"], now=NOW) == {"t/ns/m/3"}, "purged, not just hidden"


# --- dropping -----------------------------------------------------------------------------------------

# tenants "a" and "ab" (one a prefix of the other), namespaces, tags, and key characters that LIKE would treat
# as wildcards
CORPUS = [
    ("a/ns1/m1/x1", {"user:1"}),
    ("a/ns1/m1/x2", {"user:2", "doc:9"}),
    ("a/ns1/m2/x3", set()),
    ("a/ns2/m1/x4", {"user:1"}),
    ("a/ns2/m_%/x5", {"doc:9"}),
    ("ab/ns1/m1/x6", {"user:1"}),
    ("ab/ns1/m1/x7", set()),
    ("b/ns1/m1/x8", {"user:1", "user:2"}),
    ("b/ns2/m1/x9", {"doc:9"}),
    ("b/ns2/mX%/x10", set()),
]
SELECTORS = [
    Selector(None, frozenset({"user:1"})),
    Selector("a", frozenset({"user:1"})),
    Selector("a", frozenset({"user:1", "doc:9"})),
    Selector("ab", frozenset({"user:2"})),
    Selector(None, namespace="ns2"),
    Selector("b", namespace="ns1"),
    Selector("a", key_prefix="ns1/m1/"),
    Selector(None, key_prefix="ns1/m"),
    Selector(None, key_prefix="ns2/m_%"),
    Selector("b", key_prefix="ns2/m"),
    Selector("a", key_prefix=""),
    Selector(None, key_prefix="b/"),
    Selector(None, frozenset({"user:1"}), namespace="ns1"),
    Selector("a", frozenset({"doc:9"}), key_prefix="ns2/"),
    Selector("a", frozenset({"nothing"})),
]


def corpus() -> list[VectorEntry]:
    return [ventry(key, unit(i), partition=key.rsplit("/", 1)[0], tags=tags) for i, (key, tags) in enumerate(CORPUS, 1)]


PARTITIONS = {key.rsplit("/", 1)[0] for key, _ in CORPUS}


@pytest.mark.parametrize("selector", SELECTORS, ids=repr)
async def test_invalidate_drops_exactly_what_selector_matches(store: VectorStore, selector: Selector) -> None:
    entries = corpus()
    await store.add_many(entries)
    expected = {e.key for e in entries if selector_matches(selector, e)}

    assert await store.invalidate(selector) == len(expected)

    assert await keys_in(store, PARTITIONS) == {e.key for e in entries} - expected
    assert await store.count() == len(entries) - len(expected)
    assert await store.invalidate(selector) == 0


async def test_flush_one_tenant_then_all(store: VectorStore) -> None:
    await store.add_many(corpus())

    assert await store.flush("a") == 5
    assert await store.flush("a") == 0
    assert await keys_in(store, PARTITIONS) == {
        "ab/ns1/m1/x6",
        "ab/ns1/m1/x7",
        "b/ns1/m1/x8",
        "b/ns2/m1/x9",
        "b/ns2/mX%/x10",
    }
    assert await store.flush("nobody") == 0
    assert await store.flush() == 5
    assert await store.count() == 0
    assert await keys_in(store, PARTITIONS) == set()


async def test_delete_counts_what_was_there(store: VectorStore) -> None:
    await store.add_many(corpus())

    assert await store.delete(["a/ns1/m1/x1", "a/ns1/m1/x1", "missing", "b/ns2/m1/x9"]) == 2
    assert await store.delete(["a/ns1/m1/x1"]) == 0
    assert await store.delete([]) == 0
    assert await store.count() == len(CORPUS) - 2
    assert "a/ns1/m1/x1" not in await keys_in(store, PARTITIONS)


async def test_count_counts_every_partition(store: VectorStore) -> None:
    assert await store.count() == 0
    await store.add_many([ventry(f"t/ns/m/{i}", unit(i), partition=f"p{i % 3}") for i in range(10)])
    assert await store.count() == 10
