"""What only the PostgreSQL store has to get right: filtered search in a big shared table, several instances
on one table, and clear errors about the database (the contract itself: ``test_store_contract.py``)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import pytest
from pgvector.asyncpg import register_vector

from atajo.cache.entry import Selector
from atajo.cache.semantic.index import Vector
from atajo.cache.semantic.pgvector import PgVectorStore
from atajo.cache.semantic.store import VectorStore
from atajo.errors import ConfigError
from tests.cache.semantic.conftest import PgVectorServer
from tests.cache.semantic.test_store_contract import NOW, unit, ventry

BIG = 10_000
DIM = 32
"""The big table's vectors are short, so that building its HNSW index stays quick; the search is the same."""


@pytest.fixture
async def conn(pgvector_server: PgVectorServer) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(pgvector_server.url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def big_table(pgvector_server: PgVectorServer, conn: Any) -> AsyncIterator[tuple[str, dict[str, Vector]]]:
    """A table with a partition of ``BIG`` entries and one of 5, loaded without the HNSW index, which a
    restarted store then builds (as on a table that grew); dropped at the end. The vectors by key."""
    table = f"{pgvector_server.table}_big"
    store = PgVectorStore(pgvector_server.url, table=table, dimension=DIM, timeout_s=60)
    await store.start()
    try:
        await conn.execute(f"DROP INDEX {table}_embedding")
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((BIG + 5, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        entries = [ventry(f"t/ns/big/{i}", vectors[i], partition="big") for i in range(BIG)]
        entries += [ventry(f"t/ns/small/{i}", vectors[BIG + i], partition="small") for i in range(5)]
        for start in range(0, len(entries), 2000):
            await store.add_many(entries[start : start + 2000])
        await store.close()
        await store.start()  # creates the missing index
        assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = $1", f"{table}_embedding") == 1
        yield table, {e.key: e.vector for e in entries}
    finally:
        await store.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")


def exact_top(vectors: dict[str, Vector], prefix: str, query: Vector, k: int) -> list[str]:
    keys = [key for key in vectors if key.startswith(prefix)]
    return sorted(keys, key=lambda key: -float(vectors[key] @ query))[:k]


async def test_a_small_partition_inside_a_big_table_finds_all_its_entries(
    pgvector_server: PgVectorServer, conn: Any, big_table: tuple[str, dict[str, Vector]]
) -> None:
    table, vectors = big_table
    store = PgVectorStore(pgvector_server.url, table=table, dimension=DIM)
    await store.start()
    try:
        for analyzed in (False, True):  # before statistics exist (a freshly loaded table) and after
            for seed in range(5):
                query = unit(1000 + seed, DIM)
                found = await store.search("small", query, 3, NOW)
                assert [n.key for n in found] == exact_top(vectors, "t/ns/small/", query, 3), (analyzed, seed)
                for n in found:
                    assert n.score == pytest.approx(float(vectors[n.key] @ query), abs=1e-5)
                assert len(await store.search("small", query, 10, NOW)) == 5
            if not analyzed:
                await conn.execute(f"ANALYZE {table}")
        # the big partition is searched through the graph, and a near duplicate is found first
        target = vectors["t/ns/big/4321"]
        [first, *_] = await store.search("big", target, 2, NOW)
        assert first.key == "t/ns/big/4321" and first.score == pytest.approx(1.0, abs=1e-5)
    finally:
        await store.close()


async def test_forced_through_the_graph_a_plain_search_misses_the_small_partition_and_the_store_does_not(
    pgvector_server: PgVectorServer, conn: Any, big_table: tuple[str, dict[str, Vector]]
) -> None:
    """The case the store guards against, made certain: the planner is pushed onto the HNSW index (sorting
    is priced out), where a plain filtered search sees only ``ef_search`` candidates of the whole table."""
    table, vectors = big_table
    store = PgVectorStore(pgvector_server.url, table=table, dimension=DIM)
    await register_vector(conn)
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
        await conn.execute(f"SET {setting} = off")
    query = unit(77, DIM)
    plain = f"SELECT key FROM {table} WHERE partition = $1 AND keep_until > $2 ORDER BY embedding <=> $3 LIMIT $4"
    plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {plain}", "small", NOW, query, 5))
    assert f"{table}_embedding" in plan, plan

    await conn.execute("SET hnsw.iterative_scan = off")
    missed = await conn.fetch(plain, "small", NOW, query, 5)
    assert len(missed) < 5, "without iterative scans the graph walk stops at ef_search candidates"

    # the store's statement, on the same session: its exact fallback finds them all
    rows = await conn.fetch(store._search, query, "small", NOW, 5)
    assert sorted(row[0] for row in rows) == sorted(exact_top(vectors, "t/ns/small/", query, 5))

    # an iterative scan (pgvector >= 0.8) alone finds them too
    await conn.execute("SET hnsw.iterative_scan = relaxed_order")
    found = await conn.fetch(plain, "small", NOW, query, 5)
    assert sorted(row[0] for row in found) == sorted(exact_top(vectors, "t/ns/small/", query, 5))


async def test_two_instances_share_one_index(pgvector_server: PgVectorServer, pg_store: PgVectorStore) -> None:
    other = PgVectorStore(pgvector_server.url, table=pgvector_server.table)
    await other.start()
    try:
        await pg_store.add_many([ventry("t/ns/m/1", unit(1), tags={"user:1"}), ventry("t/ns/m/2", unit(2))])
        assert [n.key for n in await other.search("p", unit(1), 1, NOW)] == ["t/ns/m/1"]
        assert await other.invalidate(Selector("t", frozenset({"user:1"}))) == 1
        assert [n.key for n in await pg_store.search("p", unit(1), 1, NOW)] == ["t/ns/m/2"]
    finally:
        await other.close()


async def test_instances_starting_together_create_the_table_once(pgvector_server: PgVectorServer, conn: Any) -> None:
    table = f"{pgvector_server.table}_race"
    stores = [PgVectorStore(pgvector_server.url, table=table) for _ in range(4)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        await stores[0].add_many([ventry("t/ns/m/1", unit(1))])
        assert [await s.count() for s in stores] == [1, 1, 1, 1]
    finally:
        await asyncio.gather(*(s.close() for s in stores))
        await conn.execute(f"DROP TABLE IF EXISTS {table}")


async def test_a_table_of_another_dimension_is_refused_by_name(
    pgvector_server: PgVectorServer, pg_store: PgVectorStore
) -> None:
    store = PgVectorStore(pgvector_server.url, table=pgvector_server.table, dimension=768, setting="cache.x.store")
    with pytest.raises(ConfigError, match=r"cache\.x\.store: table atajo_vec_\w+ .* 384 dimensions, not 768"):
        await store.start()
    await store.close()


async def test_a_database_without_the_extension_is_reported_naming_the_setting(
    pgvector_server: PgVectorServer, conn: Any
) -> None:
    """A fresh database, and a role that may not create the extension (pgvector is not a trusted extension)."""
    name = f"atajo_novec_{secrets.token_hex(4)}"
    try:
        await conn.execute(f"CREATE ROLE {name} LOGIN")
        await conn.execute(f"CREATE DATABASE {name} OWNER {name}")
    except asyncpg.PostgresError as exc:
        pytest.skip(f"cannot create a role and a database on the test server ({exc})")
    try:
        host_port = pgvector_server.url.rpartition("@")[2].partition("/")[0]
        url = f"postgresql://{name}:secret@{host_port}/{name}"
        store = PgVectorStore(url, setting="cache.semantic.store")
        with pytest.raises(ConfigError) as raised:
            await store.start()
        message = str(raised.value)
        assert message.startswith(f"cache.semantic.store: postgresql://***@{host_port}/{name} has no pgvector")
        assert "CREATE EXTENSION vector" in message and "secret" not in message
        assert raised.value.param == "cache.semantic.store"
        await store.close()
    finally:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"DROP ROLE IF EXISTS {name}")


async def test_sessions_plan_per_partition_and_scan_iteratively(pg_store: PgVectorStore) -> None:
    async with await pg_store._connection() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
        if pg_store.extension_version >= (0, 8):
            assert await conn.fetchval("SHOW hnsw.iterative_scan") == "relaxed_order"


def test_bad_settings_are_refused_before_any_io() -> None:
    store: VectorStore = PgVectorStore("postgresql://u:pw@h/db")  # (mypy: it is a VectorStore)
    assert store.name == "pgvector"
    with pytest.raises(ValueError, match="postgresql://"):
        PgVectorStore("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="identifier"):
        PgVectorStore("postgresql://u@h/db", table="x; DROP TABLE y")
    assert "pw" not in repr(store)
