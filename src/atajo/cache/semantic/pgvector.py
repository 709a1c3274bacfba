"""The semantic tier's vectors in PostgreSQL with pgvector: one index shared by every instance.

One table (``atajo_semantic_vectors`` by default), created if absent at start with its indexes: an HNSW index
on the embedding for cosine distance, a btree on the partition (so a small partition is searched exactly,
through it), and what expiry and invalidation select on (keep_until; tenant and namespace; a GIN index on the
tags). Vectors travel in pgvector's binary format (the ``pgvector`` package's asyncpg codec).

Searching a partition inside a big shared table is a filtered nearest-neighbour search, which a plain HNSW
scan does badly: it returns ``hnsw.ef_search`` (40) candidates from the whole table and the partition filter
then drops most or all of them. Three things make it exact enough:

* the planner sees the actual partition (``plan_cache_mode = force_custom_plan``, since asyncpg prepares every
  statement): for a partition it estimates small it reads the partition's rows through the btree and sorts
  them by exact distance; for a big one it walks the HNSW graph;
* on pgvector >= 0.8 the graph walk is iterative (``hnsw.iterative_scan = relaxed_order``): it goes on past
  ``ef_search`` candidates until ``k`` rows pass the filter (or ``hnsw.max_scan_tuples`` were scanned);
* in the same statement, when the first search returned fewer than ``k`` rows, an exact search of the
  partition runs (fenced from the HNSW index); otherwise it does not run at all.

Results are merged and sorted by exact cosine in Python (a relaxed-order scan may return them slightly out of
order). Scores are ``1 - cosine distance``, computed by the server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from atajo.cache.backends import redact_url
from atajo.cache.entry import Selector
from atajo.cache.semantic.index import Neighbour, Vector
from atajo.cache.semantic.store import VectorEntry
from atajo.errors import ConfigError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
SCHEMA_TIMEOUT_S = 120.0
"""Creating the tables: building an index on an existing big table may take a while (once)."""


def _schema(t: str, dimension: int) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {t} ("
        " key TEXT PRIMARY KEY,"
        " tenant TEXT NOT NULL,"
        " namespace TEXT NOT NULL,"
        " partition TEXT NOT NULL,"
        " text TEXT NOT NULL,"
        f" embedding vector({dimension}) NOT NULL,"
        " keep_until DOUBLE PRECISION NOT NULL,"
        " tags TEXT[] NOT NULL DEFAULT '{}')",
        f"CREATE INDEX IF NOT EXISTS {t}_embedding ON {t} USING hnsw (embedding vector_cosine_ops)",
        f"CREATE INDEX IF NOT EXISTS {t}_partition ON {t} (partition)",
        f"CREATE INDEX IF NOT EXISTS {t}_keep_until ON {t} (keep_until)",
        f"CREATE INDEX IF NOT EXISTS {t}_tenant_namespace ON {t} (tenant, namespace)",
        f"CREATE INDEX IF NOT EXISTS {t}_tags ON {t} USING gin (tags)",
    ]


class PgVectorStore:
    """``VectorStore`` on PostgreSQL with pgvector, through an asyncpg pool."""

    name = "pgvector"

    def __init__(
        self,
        url: str,
        *,
        dimension: int = 384,
        timeout_s: float = 2.0,
        table: str = "atajo_semantic_vectors",
        pool_size: int = 10,
        setting: str = "cache.semantic.store",
    ) -> None:
        scheme = url.partition("://")[0].lower()
        if scheme not in ("postgresql", "postgres") or "://" not in url:
            raise ValueError("not a postgresql:// URL")
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table {table!r} is not a plain SQL identifier (letters, digits, _)")
        if not 1 <= dimension <= 16000:
            raise ValueError("dimension must be between 1 and 16000 (pgvector's limit)")
        self._url = url
        self.database = redact_url(url)
        self.dimension = dimension
        self.timeout_s = timeout_s
        self.table = table
        self.pool_size = pool_size
        self.setting = setting
        """The configuration path named in errors."""
        self.extension_version: tuple[int, ...] = ()
        """pgvector's version in the database, known after ``start``."""
        self._pool: Any = None
        self._opening = asyncio.Lock()
        t = table
        near = (
            f"SELECT key, text, embedding <=> $1 AS distance, embedding FROM {t}"
            " WHERE partition = $2 AND keep_until > $3 ORDER BY embedding <=> $1 LIMIT $4"
        )
        # ``OFFSET 0`` fences the inner query: its rows are sorted by exact distance, never read through HNSW
        exact = (
            f"SELECT key, text, distance, embedding FROM (SELECT key, text, embedding <=> $1 AS distance, embedding"
            f" FROM {t}"
            " WHERE partition = $2 AND keep_until > $3 AND (SELECT count(*) FROM near) < $4 OFFSET 0) AS p"
            " ORDER BY distance LIMIT $4"
        )
        self._search = f"WITH near AS MATERIALIZED ({near}) SELECT * FROM near UNION ALL ({exact})"
        self._upsert = (
            f"INSERT INTO {t} (key, tenant, namespace, partition, text, embedding, keep_until, tags)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key) DO UPDATE SET tenant = excluded.tenant,"
            " namespace = excluded.namespace, partition = excluded.partition, text = excluded.text,"
            " embedding = excluded.embedding, keep_until = excluded.keep_until, tags = excluded.tags"
        )

    def __repr__(self) -> str:
        return f"PgVectorStore({self.database!r}, table={self.table!r}, dimension={self.dimension})"

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._open()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _open(self) -> Any:
        """The pool, after the extension, the table and its indexes exist (again after a failed start)."""
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                import asyncpg
                from pgvector.asyncpg import register_vector

                schema = await self._prepare_database()
                settings = {"plan_cache_mode": "force_custom_plan", "synchronous_commit": "off"}
                if self.extension_version >= (0, 8):
                    settings["hnsw.iterative_scan"] = "relaxed_order"

                async def init(conn: Any) -> None:
                    await register_vector(conn, schema=schema)

                self._pool = await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=max(self.timeout_s, 1.0),
                    command_timeout=60.0,
                    server_settings=settings,
                    init=init,
                )
            return self._pool

    async def _prepare_database(self) -> str:
        """Create the extension (if absent), the table and its indexes, under an advisory lock so instances
        starting together do not race; check the table's dimension. The schema holding ``vector``."""
        import asyncpg

        conn = await asyncpg.connect(self._url, timeout=max(self.timeout_s, 1.0))
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"atajo:{self.table}")
                row = await conn.fetchrow(
                    "SELECT extversion, extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'"
                )
                if row is None:
                    try:
                        async with conn.transaction():  # a savepoint: report the failure, not a dead transaction
                            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                    except asyncpg.PostgresError as exc:
                        raise ConfigError(
                            f"{self.setting}: {self.database} has no pgvector extension and it could not be"
                            f" created ({exc.__class__.__name__}: {exc}). Install pgvector (0.8 or later) on that"
                            " PostgreSQL server and run CREATE EXTENSION vector in that database as a superuser,"
                            f" or point {self.setting} at a database that has it",
                            param=self.setting,
                        ) from None
                    row = await conn.fetchrow(
                        "SELECT extversion, extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'"
                    )
                    assert row is not None
                self.extension_version = _version(row[0])
                for statement in _schema(self.table, self.dimension):
                    await conn.execute(statement, timeout=SCHEMA_TIMEOUT_S)
                dimension = await conn.fetchval(
                    "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'embedding'",
                    self.table,
                )
                if dimension != self.dimension:
                    raise ConfigError(
                        f"{self.setting}: table {self.table} in {self.database} holds vectors of {dimension}"
                        f" dimensions, not {self.dimension}: use another table, or drop it",
                        param=self.setting,
                    )
            return str(row[1])
        finally:
            await conn.close()

    # --- searching and storing ----------------------------------------------------------------------

    async def search(self, partition: str, vector: Vector, k: int, now: float) -> list[Neighbour]:
        if k < 1:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        async with await self._connection() as conn:
            rows = await conn.fetch(self._search, query, partition, now, k, timeout=self.timeout_s)
        # The decision looks at the stored vectors too (the codec returns pgvector's ``Vector`` objects).
        best: dict[str, tuple[float, str, Vector]] = {}
        for key, text, distance, embedding in rows:
            if key not in best or distance < best[key][0]:
                best[key] = (distance, text, np.asarray(embedding.to_numpy(), dtype=np.float32))
        ranked = sorted(best.items(), key=lambda item: (item[1][0], item[0]))[:k]
        return [Neighbour(key, text, 1.0 - distance, stored) for key, (distance, text, stored) in ranked]

    async def add_many(self, entries: Sequence[VectorEntry]) -> None:
        """One pipelined ``executemany`` (one round trip, one transaction); a key twice: the last wins."""
        if not entries:
            return
        rows = []
        for e in entries:
            vector = np.asarray(e.vector, dtype=np.float32).reshape(-1)
            if vector.shape[0] != self.dimension:
                raise ValueError(f"expected a vector of {self.dimension} dimensions, got {vector.shape[0]}")
            rows.append((e.key, e.tenant, e.namespace, e.partition, e.text, vector, e.keep_until, sorted(e.tags)))
        async with await self._connection() as conn:
            await conn.executemany(self._upsert, rows, timeout=self.timeout_s)

    # --- dropping ---------------------------------------------------------------------------------

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return await self._delete("key = ANY($1::text[])", [list(keys)])

    async def invalidate(self, selector: Selector) -> int:
        """``selector_matches`` as one DELETE."""
        conditions: list[str] = []
        args: list[object] = []

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if selector.tenant is not None:
            conditions.append(f"tenant = {arg(selector.tenant)}")
        if selector.tags:
            conditions.append(f"tags && {arg(sorted(selector.tags))}::text[]")
        if selector.namespace is not None:
            conditions.append(f"namespace = {arg(selector.namespace)}")
        if selector.key_prefix is not None:
            length = arg(len(selector.key_prefix))
            conditions.append(f"substr(key, length(tenant) + 2, {length}) = {arg(selector.key_prefix)}")
        return await self._delete(" AND ".join(conditions), args)

    async def flush(self, tenant: str | None = None) -> int:
        if tenant is None:
            return await self._delete("true", [])
        return await self._delete("tenant = $1", [tenant])

    async def purge_expired(self, now: float) -> int:
        return await self._delete("keep_until <= $1", [now])

    async def count(self) -> int:
        async with await self._connection() as conn:
            return int(await conn.fetchval(f"SELECT count(*) FROM {self.table}", timeout=self.timeout_s))

    async def _delete(self, where: str, args: Sequence[object]) -> int:
        async with await self._connection() as conn:
            status = await conn.execute(f"DELETE FROM {self.table} WHERE {where}", *args, timeout=self.timeout_s)
        return int(status.rpartition(" ")[2])

    async def _connection(self) -> Any:
        """A pooled connection's context (``async with``), waited for at most ``timeout_s``, as each
        statement is."""
        pool = self._pool or await self._open()
        return pool.acquire(timeout=self.timeout_s)


def _version(text: str) -> tuple[int, ...]:
    """``0.8.1`` → (0, 8, 1); what is not a number ends it."""
    parts: list[int] = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)
