"""The contract every tier backend keeps: the same assertions against memory, Redis, SQLite and PostgreSQL.

Time is a FakeClock; ``Selector.matches`` is the reference for what an invalidation drops.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from atajo.cache.entry import CacheBackend, Entry, Selector
from tests.cache.conftest import T0, make_entry, present, twin
from tests.doubles import FakeClock


async def put(backend: CacheBackend, *entries: Entry) -> list[str]:
    for entry in entries:
        await backend.set(entry)
    return [entry.key for entry in entries]


# --- storing and reading ----------------------------------------------------------------------------


async def test_round_trip_keeps_bytes_tags_and_times_exactly(backend: CacheBackend) -> None:
    entry = Entry(
        key="acme/ns/gpt-4o/abc123",
        tenant="acme",
        namespace="ns",
        value=bytes(range(256)) * 3 + b"\x00",
        created_at=T0 - 0.123456789,
        fresh_until=T0 + 59.987654321,
        keep_until=T0 + 3600.000001,
        tags=frozenset({"user:42", "doc:7", "ü:ñ"}),
    )
    await backend.set(entry)

    got = await backend.get(entry.key)

    assert got == entry
    assert got is not None and got.value == entry.value and got.tags == entry.tags
    assert await backend.get("acme/ns/gpt-4o/other") is None


async def test_set_many_stores_a_batch_in_order(backend: CacheBackend) -> None:
    first = make_entry("t1/ns/m/a", tags=["user:1"], value=b"first")
    again = make_entry("t1/ns/m/a", tags=["user:2"], value=b"again")  # the same key later in the batch wins
    other = make_entry("t1/ns/m/b", tags=["user:1"], value=b"other")
    await backend.set_many([first, other, again])
    stored = await backend.get("t1/ns/m/a")
    assert stored is not None and stored.value == b"again" and stored.tags == {"user:2"}
    assert await backend.invalidate(Selector("t1", frozenset({"user:1"}))) == 1, "only b still carries user:1"
    assert await backend.get("t1/ns/m/a") is not None
    assert await backend.get("t1/ns/m/b") is None
    await backend.set_many([])


async def test_empty_value_and_no_tags(backend: CacheBackend) -> None:
    entry = make_entry("acme/ns/m/empty", value=b"")
    await backend.set(entry)

    assert await backend.get(entry.key) == entry


async def test_set_replaces_value_times_and_tags(backend: CacheBackend) -> None:
    old = make_entry("acme/ns/m/1", tags={"user:1", "doc:1"}, value=b"old")
    new = make_entry("acme/ns/m/1", tags={"doc:2"}, value=b"new", created_at=T0 + 5, fresh_s=10, keep_s=20)
    await put(backend, old, new)

    assert await backend.get(new.key) == new
    assert await backend.invalidate(Selector("acme", frozenset({"user:1", "doc:1"}))) == 0
    assert await backend.get(new.key) == new
    assert await backend.invalidate(Selector("acme", frozenset({"doc:2"}))) == 1
    assert await backend.get(new.key) is None


async def test_a_stale_entry_is_still_returned_with_its_times(backend: CacheBackend, clock: FakeClock) -> None:
    entry = make_entry("acme/ns/m/1", fresh_s=10, keep_s=100)
    await backend.set(entry)

    clock.advance(50)  # past fresh_until, before keep_until: the tier chain serves it only on provider failure

    assert await backend.get(entry.key) == entry


async def test_past_keep_until_it_is_absent(backend: CacheBackend, clock: FakeClock) -> None:
    entry = make_entry("acme/ns/m/1", keep_s=100)
    await backend.set(entry)

    clock.advance(99.999)
    assert await backend.get(entry.key) == entry
    clock.advance(0.001)
    assert await backend.get(entry.key) is None
    clock.now = T0  # a backend may drop it when read past keep_until; it must never come back stale
    assert await backend.get(entry.key) in (None, entry)


async def test_past_keep_until_it_is_purged(backend: CacheBackend, clock: FakeClock) -> None:
    short = make_entry("acme/ns/m/short", keep_s=100, tags={"t"})
    long = make_entry("acme/ns/m/long", keep_s=1000, tags={"t"})
    await put(backend, short, long)

    clock.advance(100)  # exactly keep_until: gone

    purged = await backend.purge_expired()
    assert purged == (0 if backend.name == "redis" else 1)  # Redis expires entries by itself (PEXPIRE)
    assert await backend.purge_expired() == 0
    assert await backend.get(short.key) is None
    assert await backend.get(long.key) == long
    assert (await backend.stats()).entries == 1
    # the expired entry is no longer selected (and never counted), the live one is
    assert await backend.invalidate(Selector("acme", frozenset({"t"}))) == 1


async def test_an_expired_entry_is_not_counted_by_invalidate_or_flush(backend: CacheBackend, clock: FakeClock) -> None:
    await put(
        backend,
        make_entry("acme/ns/m/gone", keep_s=10, tags={"t"}),
        make_entry("acme/ns/m/live", keep_s=1000, tags={"t"}),
        make_entry("other/ns/m/gone", keep_s=10),
    )
    clock.advance(20)

    assert await backend.invalidate(Selector("acme", frozenset({"t"}))) == 1
    assert await backend.flush() == 0


async def test_setting_an_already_expired_entry_stores_nothing(backend: CacheBackend, clock: FakeClock) -> None:
    await backend.set(make_entry("acme/ns/m/1", keep_s=1000, tags={"t"}))
    clock.advance(500)

    await backend.set(make_entry("acme/ns/m/1", created_at=T0, keep_s=400, tags={"t"}))

    assert await backend.get("acme/ns/m/1") is None
    assert await backend.invalidate(Selector("acme", frozenset({"t"}))) == 0


# --- tenants ----------------------------------------------------------------------------------------


async def test_the_same_relative_key_in_two_tenants_is_two_entries(backend: CacheBackend) -> None:
    a = make_entry("a/ns/m/same", tags={"user:1"}, value=b"for a")
    b = make_entry("b/ns/m/same", tags={"user:1"}, value=b"for b")
    await put(backend, a, b)

    assert await backend.get(a.key) == a
    assert await backend.get(b.key) == b

    assert await backend.invalidate(Selector("a", frozenset({"user:1"}))) == 1
    assert await backend.get(a.key) is None
    assert await backend.get(b.key) == b
    assert await backend.invalidate(Selector("a", namespace="ns")) == 0
    assert await backend.invalidate(Selector("a", key_prefix="ns/")) == 0
    assert await backend.get(b.key) == b

    await backend.set(a)
    assert await backend.invalidate(Selector(None, frozenset({"user:1"}))) == 2
    assert await present(backend, [a.key, b.key]) == set()


@pytest.mark.parametrize(
    "selector",
    [
        Selector(None, namespace="ns"),
        Selector(None, key_prefix="ns/m/"),
        Selector(None, frozenset({"user:1"}), namespace="ns", key_prefix="ns/"),
    ],
    ids=["namespace", "key_prefix", "all"],
)
async def test_a_selector_of_every_tenant_reaches_every_tenant(backend: CacheBackend, selector: Selector) -> None:
    keys = await put(
        backend,
        make_entry("a/ns/m/1", tags={"user:1"}),
        make_entry("b/ns/m/1", tags={"user:1"}),
        make_entry("c/ns/m/1", tags={"user:1"}),
    )

    assert await backend.invalidate(selector) == 3
    assert await present(backend, keys) == set()


async def test_tenants_whose_names_prefix_each_other_stay_apart(backend: CacheBackend) -> None:
    # Tenant and tag names may hold ':' (so "x" + "y:z" and "x:y" + "z" could spell the same index name),
    # and one tenant's name may start another's ("a" and "ab").
    x = make_entry("x/ns/m/1", tags={"y:z"}, namespace="y:n")
    xy = make_entry("x:y/ns/m/1", tags={"z", "y:z"}, namespace="n")
    a = make_entry("a/b/m/1", tags={"z"})
    ab = make_entry("ab/b/m/1", tags={"z"})
    keys = await put(backend, x, xy, a, ab)

    assert await backend.invalidate(Selector("x", frozenset({"z"}))) == 0
    assert await backend.invalidate(Selector("x", namespace="n")) == 0
    assert await backend.invalidate(Selector("x:y", namespace="y:n")) == 0
    assert await backend.invalidate(Selector("a", key_prefix="b/")) == 1
    assert await present(backend, keys) == {x.key, xy.key, ab.key}
    assert await backend.invalidate(Selector("x", frozenset({"y:z"}))) == 1  # x:y's entry has it too: kept
    assert await present(backend, keys) == {xy.key, ab.key}
    assert await backend.invalidate(Selector("x:y", frozenset({"y:z"}))) == 1
    assert await present(backend, keys) == {ab.key}


# --- invalidation -----------------------------------------------------------------------------------


@pytest.fixture
async def catalog(backend: CacheBackend) -> list[Entry]:
    """Eight entries of tenant ``t`` (and one of ``u``) over two namespaces, two models and a few tags."""
    entries = [
        make_entry("t/ns1/gpt/1", namespace="ns1", tags={"user:1", "doc:1"}),
        make_entry("t/ns1/gpt/2", namespace="ns1", tags={"user:2"}),
        make_entry("t/ns1/mini/3", namespace="ns1", tags={"doc:1"}),
        make_entry("t/ns1/mini/4", namespace="ns1"),
        make_entry("t/ns2/gpt/5", namespace="ns2", tags={"user:1"}),
        make_entry("t/ns2/gpt/6", namespace="ns2", tags={"doc:2"}),
        make_entry("t/ns2/mini/7", namespace="ns2", tags={"user:2", "doc:2"}),
        make_entry("t/ns2/mini/8", namespace="ns2"),
        make_entry("u/ns1/gpt/1", namespace="ns1", tags={"user:1", "doc:1"}),
    ]
    await put(backend, *entries)
    return entries


CASES: list[tuple[str, Selector]] = [
    ("one tag", Selector("t", frozenset({"user:1"}))),
    ("any of several tags", Selector("t", frozenset({"user:2", "doc:1"}))),
    ("an unknown tag", Selector("t", frozenset({"nobody"}))),
    ("namespace", Selector("t", namespace="ns2")),
    ("unknown namespace", Selector("t", namespace="ns9")),
    ("key prefix", Selector("t", key_prefix="ns1/mini/")),
    ("key prefix mid-segment", Selector("t", key_prefix="ns2/g")),
    ("whole relative key", Selector("t", key_prefix="ns1/gpt/2")),
    ("empty key prefix", Selector("t", key_prefix="")),
    ("tags and namespace", Selector("t", frozenset({"user:1", "doc:2"}), namespace="ns2")),
    ("tags and key prefix", Selector("t", frozenset({"doc:1", "user:2"}), key_prefix="ns1/mini")),
    ("namespace and key prefix", Selector("t", namespace="ns1", key_prefix="ns1/gpt")),
    ("namespace and mismatching prefix", Selector("t", namespace="ns1", key_prefix="ns2/")),
    ("all three", Selector("t", frozenset({"user:2"}), namespace="ns2", key_prefix="ns2/mini/")),
    ("every tenant, tag", Selector(None, frozenset({"doc:1"}))),
    ("every tenant, tags and prefix", Selector(None, frozenset({"user:1"}), key_prefix="ns1/")),
]


@pytest.mark.parametrize(("case", "selector"), CASES, ids=[case for case, _ in CASES])
async def test_invalidate_drops_exactly_what_the_selector_matches(
    backend: CacheBackend, catalog: list[Entry], case: str, selector: Selector
) -> None:
    expected = {e.key for e in catalog if selector.matches(e)}

    dropped = await backend.invalidate(selector)

    assert dropped == len(expected), case
    assert await present(backend, [e.key for e in catalog]) == {e.key for e in catalog} - expected
    assert await backend.invalidate(selector) == 0  # nothing left to drop
    for entry in catalog:  # survivors are intact, tags included
        if entry.key not in expected:
            assert await backend.get(entry.key) == entry


async def test_flush_one_tenant_then_all(backend: CacheBackend, catalog: list[Entry]) -> None:
    assert await backend.flush("nobody") == 0
    assert await backend.flush("u") == 1
    assert await present(backend, [e.key for e in catalog]) == {e.key for e in catalog if e.tenant == "t"}

    await backend.set(catalog[-1])
    assert await backend.flush() == len(catalog)
    assert await present(backend, [e.key for e in catalog]) == set()
    assert (await backend.stats()).entries == 0

    await backend.set(catalog[0])  # usable after a flush, indexes included
    assert await backend.get(catalog[0].key) == catalog[0]
    assert await backend.invalidate(Selector("t", frozenset({"doc:1"}))) == 1


async def test_stats_count_entries_and_bytes(backend: CacheBackend, catalog: list[Entry]) -> None:
    before = await backend.stats()
    assert before.entries == len(catalog)
    assert before.bytes >= sum(len(e.value) for e in catalog)
    assert before.evictions == 0

    await backend.invalidate(Selector("t", namespace="ns1"))

    after = await backend.stats()
    assert after.entries == len(catalog) - 4
    assert 0 < after.bytes < before.bytes


async def test_ping_answers_while_the_store_is_reachable(backend: CacheBackend) -> None:
    await backend.ping()  # raises nothing (its failure is the next test)
    await backend.set(make_entry("t/ns/m/after-ping"))  # and leaves the backend usable
    assert await present(backend, ["t/ns/m/after-ping"]) == {"t/ns/m/after-ping"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["redis", "postgres", "sqlite"])
async def test_ping_raises_when_the_store_cannot_be_reached(kind: str, clock: FakeClock, tmp_path: Path) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from atajo.cache.redis import RedisBackend
    from atajo.cache.sql import SqlBackend

    port = _closed_port()
    unreachable: CacheBackend
    if kind == "redis":
        unreachable = RedisBackend(f"redis://127.0.0.1:{port}/0", clock, timeout_s=0.5)
    elif kind == "postgres":
        unreachable = SqlBackend(f"postgresql://postgres@127.0.0.1:{port}/test", clock)
    else:
        (tmp_path / "taken").write_text("a file where the database's folder should be")
        unreachable = SqlBackend(f"sqlite:///{tmp_path}/taken/cache.db", clock)
    with pytest.raises((RedisConnectionError, OSError)):
        await unreachable.ping()
    await unreachable.close()


# --- concurrency ------------------------------------------------------------------------------------


async def test_concurrent_writers_of_different_keys(backend: CacheBackend) -> None:
    entries = [make_entry(f"t/ns/m/{i}", tags={f"user:{i % 5}"}, value=f"v{i}".encode()) for i in range(50)]

    await asyncio.gather(*(backend.set(e) for e in entries))

    for entry in entries:
        assert await backend.get(entry.key) == entry
    assert await backend.invalidate(Selector("t", frozenset({"user:3"}))) == 10
    assert (await backend.stats()).entries == 40


async def test_concurrent_writers_of_one_key_leave_one_consistent_version(backend: CacheBackend) -> None:
    versions = [
        make_entry("t/ns/m/hot", tags={f"v:{i}", "shared"}, value=f"value {i}".encode(), created_at=T0 + i)
        for i in range(20)
    ]

    await asyncio.gather(*(backend.set(v) for v in versions))

    winner = await backend.get("t/ns/m/hot")
    assert winner in versions  # value, times and tags all from the same write
    assert winner is not None
    stale = frozenset(tag for v in versions for tag in v.tags) - winner.tags
    assert await backend.invalidate(Selector("t", stale)) == 0
    assert await backend.get("t/ns/m/hot") == winner
    assert (await backend.stats()).entries == 1
    assert await backend.invalidate(Selector("t", winner.tags - {"shared"})) == 1
    assert await backend.get("t/ns/m/hot") is None


async def test_two_instances_share_one_store(backend: CacheBackend, clock: FakeClock) -> None:
    if backend.name == "memory":
        pytest.skip("the memory tier is per-process")
    other = twin(backend, clock)
    await other.start()
    try:
        mine = [make_entry(f"t/ns/m/mine-{i}", tags={"user:1"}) for i in range(15)]
        theirs = [make_entry(f"t/ns/m/theirs-{i}", tags={"user:2"}) for i in range(15)]
        hot = [make_entry("t/ns/m/hot", tags={f"v:{i}"}, value=f"{i}".encode()) for i in range(10)]
        await asyncio.gather(*(backend.set(e) for e in mine + hot[::2]), *(other.set(e) for e in theirs + hot[1::2]))

        for entry in mine + theirs:
            assert await backend.get(entry.key) == entry
            assert await other.get(entry.key) == entry
        winner = await other.get("t/ns/m/hot")
        assert winner in hot and await backend.get("t/ns/m/hot") == winner
        assert await other.invalidate(Selector("t", frozenset({"user:1"}))) == 15
        assert await present(backend, [e.key for e in mine]) == set()
        assert await backend.invalidate(Selector("t", frozenset({f"v:{i}" for i in range(10)}))) == 1
        assert await other.get("t/ns/m/hot") is None
        assert (await other.stats()).entries == (await backend.stats()).entries == 15
    finally:
        await other.close()


# --- differential test against Selector.matches -------------------------------------------------------

TENANTS = ["a", "a:b", "ab"]
NAMESPACES = ["n", "b:n", "m"]
TAGS = ["t", "u", "b:t", "user:1"]
SEGMENTS = ["n", "m", "x", "b:n"]


def _random_entry(rng: random.Random) -> Entry:
    tenant = rng.choice(TENANTS)
    relative = "/".join(rng.choice(SEGMENTS) for _ in range(rng.randint(1, 3))) + f"/{rng.randrange(1000)}"
    return make_entry(
        f"{tenant}/{relative}",
        namespace=rng.choice(NAMESPACES),
        tags=rng.sample(TAGS, rng.randint(0, 3)),
        keep_s=rng.choice([50.0, 1000.0]),
    )


def _random_selector(rng: random.Random, entries: list[Entry]) -> Selector:
    while True:
        tags = frozenset(rng.sample(TAGS, rng.randint(0, 2))) if rng.random() < 0.6 else frozenset()
        namespace = rng.choice(NAMESPACES) if rng.random() < 0.4 else None
        key_prefix = None
        if rng.random() < 0.4:
            relative = rng.choice(entries).relative_key() if entries else "n/"
            key_prefix = relative[: rng.randint(0, len(relative))]
        if tags or namespace is not None or key_prefix is not None:
            return Selector(rng.choice([*TENANTS, None]), tags, namespace, key_prefix)


async def test_invalidation_agrees_with_selector_matches(backend: CacheBackend, clock: FakeClock) -> None:
    rng = random.Random(20_251_125)
    for round_ in range(12):
        await backend.flush()
        clock.now = T0
        model: dict[str, Entry] = {}
        for _ in range(rng.randint(5, 25)):
            entry = _random_entry(rng)
            model[entry.key] = entry  # a repeated key replaces the earlier entry
            await backend.set(entry)
        clock.advance(rng.choice([0.0, 100.0]))  # sometimes the short-lived ones have expired
        for step in range(3):
            selector = _random_selector(rng, list(model.values()))
            live = {k: e for k, e in model.items() if e.keep_until > clock()}
            expected = {k for k, e in live.items() if selector.matches(e)}

            dropped = await backend.invalidate(selector)

            context = f"round {round_} step {step}: {selector}"
            assert dropped == len(expected), context
            model = {k: e for k, e in model.items() if not selector.matches(e)}
            assert await present(backend, list(live)) == set(live) - expected, context
            for key in set(live) - expected:
                assert await backend.get(key) == live[key], context


async def test_replaced_entries_in_the_differential_model(backend: CacheBackend) -> None:
    """A key rewritten with other tags, namespace or value is selected only by what it holds now."""
    first = make_entry("a/n/1", namespace="n", tags={"t", "u"})
    second = replace(first, namespace="m", tags=frozenset({"b:t"}), value=b"second")
    await put(backend, first, second)

    for selector in [
        Selector("a", frozenset({"t", "u"})),
        Selector("a", namespace="n"),
        Selector(None, frozenset({"t"}), key_prefix="n/"),
    ]:
        assert not selector.matches(second)
        assert await backend.invalidate(selector) == 0, selector
    assert await backend.get(first.key) == second
    assert await backend.invalidate(Selector(None, namespace="m")) == 1
