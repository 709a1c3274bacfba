"""The durable tier on SQL: SQLite (embedded default, via aiosqlite) or PostgreSQL (scale-out, via asyncpg).

Two tables, named ``{table_prefix}entries`` and ``{table_prefix}tags`` (``atajo_cache_`` by default),
created if absent at start (see ``_schema``). The statements are written once, with ``?`` placeholders; the
two dialects differ only in what ``_Dialect`` holds: the binary type, the placeholder style, how a list
travels as one parameter, and how a key's tags are aggregated.

``set`` replaces the entry and its tags in one transaction; ``invalidate`` deletes the matching entries and
their tag rows in one transaction. Rows past ``keep_until`` (by the injected clock) are absent to ``get``
and are deleted by ``purge_expired``; ``invalidate`` and ``flush`` delete them too but count only live ones.

SQLite: one connection in WAL mode with a short busy timeout (other processes may share the file); calls
are serialized with a lock, so no statement runs inside another call's transaction. PostgreSQL: a pool;
the tables are created under an advisory lock so instances starting together do not race.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from atajo.cache.backends import redact_url
from atajo.cache.entry import Clock, Entry, Selector, TierStats
from atajo.core.sqlite import PostgresDatabase, SqliteDatabase, numbered, sqlite_path

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
SQLITE_BUSY_TIMEOUT_S = 0.5
"""How long an SQLite write waits for another process's transaction before failing (the tier is skipped)."""


def _schema(p: str, blob: str, serial: str) -> list[str]:
    """The whole schema. ``p``: the table prefix; ``blob``: the dialect's binary type; ``serial``: an
    ever-increasing integer key (never reused, so pollers of the invalidation log miss nothing)."""
    return [
        f"CREATE TABLE IF NOT EXISTS {p}invalidations ("
        f" id {serial},"
        " at DOUBLE PRECISION NOT NULL,"
        f" message {blob} NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {p}entries ("
        " key TEXT PRIMARY KEY,"
        " tenant TEXT NOT NULL,"
        " namespace TEXT NOT NULL,"
        f" value {blob} NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL,"
        " fresh_until DOUBLE PRECISION NOT NULL,"
        " keep_until DOUBLE PRECISION NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {p}entries_tenant_namespace ON {p}entries (tenant, namespace)",
        f"CREATE INDEX IF NOT EXISTS {p}entries_keep_until ON {p}entries (keep_until)",
        f"CREATE TABLE IF NOT EXISTS {p}tags ("
        " tenant TEXT NOT NULL,"
        " tag TEXT NOT NULL,"
        " key TEXT NOT NULL,"
        " PRIMARY KEY (tenant, tag, key))",
        f"CREATE INDEX IF NOT EXISTS {p}tags_key ON {p}tags (key)",
    ]


@dataclass(frozen=True, slots=True)
class _Dialect:
    name: str
    blob: str
    list_table: str
    """A table ``l`` with one text column ``value``, from one parameter (``list_arg`` of a list)."""
    tag_list: str
    """Aggregate of ``t.tag`` as one value (``tags_of`` reads it back)."""
    serial: str

    def sql(self, statement: str) -> str:
        """``statement`` with this dialect's placeholders (written with ``?``, which no statement holds
        otherwise)."""
        if self.name == "sqlite":
            return statement
        return numbered(statement)

    def list_arg(self, items: Sequence[str]) -> object:
        return orjson.dumps(list(items)).decode() if self.name == "sqlite" else list(items)

    def tags_of(self, raw: Any) -> frozenset[str]:
        if raw is None:
            return frozenset()
        return frozenset(orjson.loads(raw) if self.name == "sqlite" else raw)


SQLITE = _Dialect("sqlite", "BLOB", "json_each(?) AS l", "json_group_array(t.tag)", "INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES = _Dialect(
    "postgresql", "BYTEA", "unnest(CAST(? AS TEXT[])) AS l(value)", "array_agg(t.tag)", "BIGSERIAL PRIMARY KEY"
)
INVALIDATION_LOG_KEEP_S = 3600.0
"""Invalidation log rows older than this are pruned: an instance away longer flushes its memory tier."""


class SqlBackend:
    name = "sql"

    def __init__(
        self,
        url: str,
        clock: Clock,
        *,
        table_prefix: str = "atajo_cache_",
        timeout_s: float = 5.0,
        pool_size: int = 10,
    ) -> None:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not _IDENTIFIER.match(table_prefix):
            raise ValueError(f"table_prefix {table_prefix!r} is not a plain SQL identifier (letters, digits, _)")
        self._url = url
        self._clock = clock
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self.table_prefix = table_prefix
        self.database: str
        """The SQLite file (or ``:memory:``); for PostgreSQL, the URL without credentials."""
        if scheme == "sqlite" and sep:
            self.dialect = SQLITE
            self.database = sqlite_path(rest)
        elif scheme in ("postgresql", "postgres") and sep:
            self.dialect = POSTGRES
            self.database = redact_url(url)
        else:
            raise ValueError("not an sqlite:// or postgresql:// URL")
        self._db: SqliteDatabase | PostgresDatabase | None = None
        self._opening = asyncio.Lock()
        p = table_prefix
        d = self.dialect
        self._get = d.sql(
            "SELECT e.tenant, e.namespace, e.value, e.created_at, e.fresh_until, e.keep_until,"
            f" (SELECT {d.tag_list} FROM {p}tags t WHERE t.key = e.key)"
            f" FROM {p}entries e WHERE e.key = ?"
        )
        self._upsert = d.sql(
            f"INSERT INTO {p}entries (key, tenant, namespace, value, created_at, fresh_until, keep_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET tenant = excluded.tenant,"
            " namespace = excluded.namespace, value = excluded.value, created_at = excluded.created_at,"
            " fresh_until = excluded.fresh_until, keep_until = excluded.keep_until"
        )
        self._delete_entry = d.sql(f"DELETE FROM {p}entries WHERE key = ?")
        self._delete_tags_of_key = d.sql(f"DELETE FROM {p}tags WHERE key = ?")
        self._insert_tags = d.sql(
            f"INSERT INTO {p}tags (tenant, tag, key) SELECT CAST(? AS TEXT), l.value, CAST(? AS TEXT)"
            f" FROM {d.list_table}"
        )
        self._delete_tags_of_keys = d.sql(f"DELETE FROM {p}tags WHERE key IN (SELECT l.value FROM {d.list_table})")
        self._stats = d.sql(
            f"SELECT (SELECT count(*) FROM {p}entries),"
            f" (SELECT coalesce(sum(length(value) + length(key)), 0) FROM {p}entries),"
            f" (SELECT coalesce(sum(length(tag)), 0) FROM {p}tags)"
        )

        self._log_append = d.sql(f"INSERT INTO {p}invalidations (at, message) VALUES (?, ?)")
        self._log_prune = d.sql(f"DELETE FROM {p}invalidations WHERE at < ?")
        self._log_after = d.sql(f"SELECT id, message FROM {p}invalidations WHERE id > ? ORDER BY id LIMIT 1000")
        self._log_last = d.sql(f"SELECT coalesce(max(id), 0), coalesce(min(id), 0) FROM {p}invalidations")

    def __repr__(self) -> str:
        return f"SqlBackend({self.dialect.name}: {self.database!r}, table_prefix={self.table_prefix!r})"

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._open()

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def ping(self) -> None:
        async with (await self._open()).session() as s:
            await s.fetch("SELECT 1")

    async def _open(self) -> SqliteDatabase | PostgresDatabase:
        """The database, connected and with its tables (again after a failed start: it recovers)."""
        if self._db is not None:
            return self._db
        async with self._opening:
            if self._db is None:
                schema = _schema(self.table_prefix, self.dialect.blob, self.dialect.serial)
                if self.dialect is SQLITE:
                    self._db = await SqliteDatabase.open(
                        self.database, schema, reader=True, busy_timeout_s=SQLITE_BUSY_TIMEOUT_S
                    )
                else:
                    self._db = await PostgresDatabase.open(
                        self._url,
                        schema,
                        max_size=self.pool_size,
                        timeout=max(self.timeout_s, 1.0),
                        command_timeout=60.0,
                        # a cache: a crash may lose the last moments of writes (never consistency), commits
                        # need no flush
                        server_settings={"synchronous_commit": "off"},
                    )
            return self._db

    # --- reads and writes -------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        db = self._db or await self._open()
        async with db.read_session() as s:
            rows = await s.fetch(self._get, key)
        if not rows:
            return None
        tenant, namespace, value, created_at, fresh_until, keep_until, tags = rows[0]
        if self._clock() >= keep_until:
            return None
        return Entry(
            key=key,
            tenant=tenant,
            namespace=namespace,
            value=bytes(value),
            created_at=created_at,
            fresh_until=fresh_until,
            keep_until=keep_until,
            tags=self.dialect.tags_of(tags),
        )

    async def set(self, entry: Entry) -> None:
        await self.set_many([entry])

    async def set_many(self, entries: Sequence[Entry]) -> None:
        """One transaction for the batch: on SQLite every statement is a hop to aiosqlite's thread, so a
        batch of N costs the hops of one."""
        if not entries:
            return
        db = self._db or await self._open()
        now = self._clock()
        ops: list[tuple[str, tuple[object, ...]]] = []
        for entry in entries:
            alive = entry.keep_until > now
            if not alive:  # already gone: only the replaced version has to go
                ops.append((self._delete_entry, (entry.key,)))
            else:
                row = (entry.key, entry.tenant, entry.namespace, entry.value)
                ops.append((self._upsert, (*row, entry.created_at, entry.fresh_until, entry.keep_until)))
            ops.append((self._delete_tags_of_key, (entry.key,)))
            if entry.tags and alive:
                ops.append((self._insert_tags, (entry.tenant, entry.key, self.dialect.list_arg(sorted(entry.tags)))))
        await db.write_batch(ops)

    # --- the invalidation log (the bus between instances that share this database and no Redis) ------

    async def append_invalidation(self, message: bytes) -> None:
        db = self._db or await self._open()
        now = time.time()  # real time: rows age out for every instance alike, whatever clock tests inject
        await db.write_batch([(self._log_append, (now, message)), (self._log_prune, (now - INVALIDATION_LOG_KEEP_S,))])

    async def invalidations_after(self, after_id: int) -> list[tuple[int, bytes]]:
        db = self._db or await self._open()
        async with db.read_session() as s:
            rows = await s.fetch(self._log_after, after_id)
        return [(int(row[0]), bytes(row[1])) for row in rows]

    async def invalidation_ids(self) -> tuple[int, int]:
        """(last, first) ids in the log, 0 when empty."""
        db = self._db or await self._open()
        async with db.read_session() as s:
            rows = await s.fetch(self._log_last)
        return int(rows[0][0]), int(rows[0][1])

    # --- dropping ---------------------------------------------------------------------------------

    async def invalidate(self, selector: Selector) -> int:
        where, args = self._where(selector)
        return await self._delete(where, args, live_only=True)

    async def flush(self, tenant: str | None = None) -> int:
        if tenant is None:
            return await self._delete("1 = 1", [], live_only=True)
        return await self._delete("tenant = ?", [tenant], live_only=True)

    async def purge_expired(self) -> int:
        return await self._delete("keep_until <= ?", [self._clock()], live_only=False)

    async def stats(self) -> TierStats:
        db = self._db or await self._open()
        async with db.session() as s:
            rows = await s.fetch(self._stats)
        entries, entry_bytes, tag_bytes = rows[0]
        return TierStats(entries=int(entries), bytes=int(entry_bytes) + int(tag_bytes) + 64 * int(entries))

    def _where(self, selector: Selector) -> tuple[str, list[object]]:
        """``Selector.matches`` as a condition on the entries table (unaliased, as DELETE wants)."""
        conditions: list[str] = []
        args: list[object] = []
        if selector.tenant is not None:
            conditions.append("tenant = ?")
            args.append(selector.tenant)
        if selector.namespace is not None:
            conditions.append("namespace = ?")
            args.append(selector.namespace)
        if selector.key_prefix is not None:
            conditions.append("substr(key, length(tenant) + 2, ?) = ?")
            args += [len(selector.key_prefix), selector.key_prefix]
        if selector.tags:
            tenant = " AND t.tenant = ?" if selector.tenant is not None else ""
            conditions.append(
                f"key IN (SELECT t.key FROM {self.table_prefix}tags t"
                f" WHERE t.tag IN (SELECT l.value FROM {self.dialect.list_table}){tenant})"
            )
            args.append(self.dialect.list_arg(sorted(selector.tags)))
            if selector.tenant is not None:
                args.append(selector.tenant)
        return " AND ".join(conditions), args

    async def _delete(self, where: str, args: list[object], *, live_only: bool) -> int:
        """Delete the entries ``where`` selects and their tags, in one transaction; count them (or only
        those not yet past ``keep_until``)."""
        statement = self.dialect.sql(f"DELETE FROM {self.table_prefix}entries WHERE {where} RETURNING key, keep_until")
        db = self._db or await self._open()
        now = self._clock()
        async with db.transaction() as tx:
            gone = await tx.fetch(statement, *args)
            if gone:
                await tx.execute(self._delete_tags_of_keys, self.dialect.list_arg([row[0] for row in gone]))
        return sum(1 for row in gone if row[1] > now) if live_only else len(gone)


# --- the two databases --------------------------------------------------------------------------------
