"""Files and batches in SQL: SQLite (embedded default, via aiosqlite) or PostgreSQL (via asyncpg).

Tables, prefixed ``atajo_batch_``: ``files`` (uploads and results, content included), ``batches`` (the batch
object as JSON, plus its tenant, status, an ever-increasing ``seq`` for listing, and a lease: which
instance's worker drives it until when), ``items`` (one row per request line: the request, where it went,
its outcome and cost) and ``groups`` (one row per upstream batch a batch was split into).

The statements are written once with ``?`` placeholders and follow ``atajo.cache.sql``'s patterns (WAL and a
busy timeout on SQLite, one connection whose calls are serialized; a pool and schema creation under an
advisory lock on PostgreSQL). Mechanism packages may not import each other, so the few lines of connection
handling are this module's own. Every read that a client can cause is scoped by tenant.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from atajo.core.sqlite import PostgresDatabase, SqliteDatabase, numbered, sqlite_path
from atajo.errors import ServiceUnavailable
from atajo.types import JSONObject

SQLITE_BUSY_TIMEOUT_S = 5.0
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _schema(p: str, blob: str, serial: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {p}files (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, purpose TEXT NOT NULL,"
        f" filename TEXT NOT NULL, bytes BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
        f" expires_at DOUBLE PRECISION, content {blob} NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {p}files_tenant ON {p}files (tenant, created_at)",
        f"CREATE TABLE IF NOT EXISTS {p}batches (seq {serial}, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,"
        " status TEXT NOT NULL, data TEXT NOT NULL, owner TEXT, lease_until DOUBLE PRECISION NOT NULL DEFAULT 0)",
        f"CREATE INDEX IF NOT EXISTS {p}batches_tenant ON {p}batches (tenant, seq)",
        f"CREATE INDEX IF NOT EXISTS {p}batches_status ON {p}batches (status)",
        f"CREATE TABLE IF NOT EXISTS {p}items (batch_id TEXT NOT NULL, idx INTEGER NOT NULL,"
        " custom_id TEXT NOT NULL, model TEXT NOT NULL, body TEXT NOT NULL, state TEXT NOT NULL,"
        " grp TEXT, result TEXT, ok INTEGER, cost_micros BIGINT, sync_cost_micros BIGINT,"
        " input_tokens BIGINT, output_tokens BIGINT, PRIMARY KEY (batch_id, idx))",
        f"CREATE TABLE IF NOT EXISTS {p}groups (batch_id TEXT NOT NULL, grp TEXT NOT NULL,"
        " deployment TEXT NOT NULL, upstream_id TEXT, status TEXT NOT NULL, PRIMARY KEY (batch_id, grp))",
        f"CREATE TABLE IF NOT EXISTS {p}requests (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, key_name TEXT NOT NULL,"
        " endpoint TEXT NOT NULL, model TEXT NOT NULL, body TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
        " batch_id TEXT, idx INTEGER)",
        f"CREATE INDEX IF NOT EXISTS {p}requests_queued ON {p}requests (tenant, key_name, endpoint, created_at)"
        " WHERE batch_id IS NULL",
    ]


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: float
    expires_at: float | None


@dataclass(slots=True)
class Item:
    """One request line of a batch. ``state``: ``pending`` (not yet sent), ``submitted`` (in an upstream
    batch), ``done`` (``result`` holds the answer or the error; ``ok`` says which)."""

    idx: int
    custom_id: str
    model: str
    body: JSONObject
    state: str = "pending"
    grp: str | None = None
    result: JSONObject | None = None
    ok: bool | None = None
    cost_micros: int | None = None
    sync_cost_micros: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Group:
    """Part of a batch sent to one deployment's Batch API."""

    grp: str
    deployment: str
    upstream_id: str | None
    status: str


@dataclass(frozen=True, slots=True)
class Queued:
    """A request sent with ``x-atajo-priority: batch``, waiting in its collection (``batch_id`` None) or in
    the internal batch it became (its line ``idx`` there)."""

    id: str
    tenant: str
    key_name: str
    endpoint: str
    model: str
    body: JSONObject
    created_at: float
    batch_id: str | None = None
    idx: int | None = None


@dataclass(frozen=True, slots=True)
class Collection:
    """The queued requests of one (tenant, key, endpoint) not yet in a batch: how many, since when."""

    tenant: str
    key_name: str
    endpoint: str
    count: int
    oldest: float


@dataclass(frozen=True, slots=True)
class QueuedState:
    """A queued request as its owner reads it: the request, and once in a batch, the batch's status and the
    request's item (``None`` until it is)."""

    request: Queued
    batch_status: str | None
    item: Item | None


MakeBatch = Callable[[list[Queued]], tuple[JSONObject, StoredFile, bytes]]
"""The queued requests sealed into a batch → the batch object, its input file and the file's content."""


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    sync_cost_micros: int


class _Session(Protocol):
    async def execute(self, statement: str, *args: object) -> None: ...

    async def fetch(self, statement: str, *args: object) -> list[Sequence[Any]]: ...


class BatchStore:
    def __init__(self, url: str, *, table_prefix: str = "atajo_batch_", pool_size: int = 5) -> None:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if scheme == "sqlite" and sep:
            self.postgres = False
            self.database = sqlite_path(rest, "batches.url")
        elif scheme in ("postgresql", "postgres") and sep:
            self.postgres = True
            self.database = url
        else:
            raise ValueError("batches.url: not an sqlite:// or postgresql:// URL")
        self._url = url
        self._pool_size = pool_size
        self._db: SqliteDatabase | PostgresDatabase | None = None
        self._opening = asyncio.Lock()
        self.p = table_prefix

    def sql(self, statement: str) -> str:
        if not self.postgres:
            return statement
        return numbered(statement)

    async def start(self) -> None:
        await self._open()

    async def _open(self) -> SqliteDatabase | PostgresDatabase:
        """The database, connected and with its tables; opened at first use (again after a failure), so a
        database that is down at start-up delays the batch endpoints (503) rather than the gateway."""
        if self._db is not None:
            return self._db
        async with self._opening:
            if self._db is None:
                try:
                    if self.postgres:
                        schema = _schema(self.p, "BYTEA", "BIGSERIAL PRIMARY KEY")
                        self._db = await PostgresDatabase.open(
                            self._url, schema, max_size=self._pool_size, command_timeout=60.0
                        )
                    else:
                        schema = _schema(self.p, "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT")
                        self._db = await SqliteDatabase.open(
                            self.database, schema, busy_timeout_s=SQLITE_BUSY_TIMEOUT_S
                        )
                except (OSError, sqlite3.Error) as exc:
                    raise ServiceUnavailable(f"The batch store is unavailable ({type(exc).__name__}).") from exc
                except Exception as exc:  # asyncpg's errors (connection refused, auth) have no common base here
                    if type(exc).__module__.startswith("asyncpg"):
                        raise ServiceUnavailable(f"The batch store is unavailable ({type(exc).__name__}).") from exc
                    raise
            return self._db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def _fetch(self, statement: str, *args: object) -> list[Sequence[Any]]:
        async with (await self._open()).session() as s:
            return await s.fetch(self.sql(statement), *args)

    async def _execute(self, statement: str, *args: object) -> None:
        async with (await self._open()).session() as s:
            await s.execute(self.sql(statement), *args)

    # --- files --------------------------------------------------------------------------------------

    async def put_file(self, f: StoredFile, content: bytes) -> None:
        await self._execute(
            f"INSERT INTO {self.p}files (id, tenant, purpose, filename, bytes, created_at, expires_at, content)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            f.id, f.tenant, f.purpose, f.filename, f.bytes, f.created_at, f.expires_at, content,
        )  # fmt: skip

    _FILE_COLUMNS = "id, tenant, purpose, filename, bytes, created_at, expires_at"

    async def get_file(self, tenant: str, file_id: str) -> StoredFile | None:
        rows = await self._fetch(
            f"SELECT {self._FILE_COLUMNS} FROM {self.p}files WHERE id = ? AND tenant = ?", file_id, tenant
        )
        return _file(rows[0]) if rows else None

    async def file_content(self, tenant: str, file_id: str) -> bytes | None:
        rows = await self._fetch(f"SELECT content FROM {self.p}files WHERE id = ? AND tenant = ?", file_id, tenant)
        return bytes(rows[0][0]) if rows else None

    async def list_files(self, tenant: str, purpose: str | None, limit: int) -> list[StoredFile]:
        where, args = "tenant = ?", [tenant]
        if purpose is not None:
            where += " AND purpose = ?"
            args.append(purpose)
        rows = await self._fetch(
            f"SELECT {self._FILE_COLUMNS} FROM {self.p}files WHERE {where} ORDER BY created_at DESC, id LIMIT ?",
            *args,
            limit,
        )
        return [_file(row) for row in rows]

    async def delete_file(self, tenant: str, file_id: str) -> bool:
        async with (await self._open()).transaction() as tx:
            rows = await tx.fetch(
                self.sql(f"DELETE FROM {self.p}files WHERE id = ? AND tenant = ? RETURNING id"), file_id, tenant
            )
        return bool(rows)

    async def purge_files(self, now: float) -> int:
        async with (await self._open()).transaction() as tx:
            rows = await tx.fetch(
                self.sql(f"DELETE FROM {self.p}files WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING id"),
                now,
            )
        return len(rows)

    # --- batches ------------------------------------------------------------------------------------

    async def create_batch(self, tenant: str, batch: JSONObject, items: Sequence[Item]) -> None:
        ops: list[tuple[str, tuple[object, ...]]] = [
            (
                self.sql(f"INSERT INTO {self.p}batches (id, tenant, status, data) VALUES (?, ?, ?, ?)"),
                (batch["id"], tenant, batch["status"], orjson.dumps(batch).decode()),
            )
        ]
        insert = self.sql(
            f"INSERT INTO {self.p}items (batch_id, idx, custom_id, model, body, state) VALUES (?, ?, ?, ?, ?, ?)"
        )
        for item in items:
            ops.append(
                (
                    insert,
                    (batch["id"], item.idx, item.custom_id, item.model, orjson.dumps(item.body).decode(), "pending"),
                )
            )
        await (await self._open()).write_batch(ops)

    async def get_batch(self, tenant: str | None, batch_id: str) -> JSONObject | None:
        if tenant is None:
            rows = await self._fetch(f"SELECT data FROM {self.p}batches WHERE id = ?", batch_id)
        else:
            rows = await self._fetch(f"SELECT data FROM {self.p}batches WHERE id = ? AND tenant = ?", batch_id, tenant)
        return _json(rows[0][0]) if rows else None

    async def tenant_of(self, batch_id: str) -> str | None:
        rows = await self._fetch(f"SELECT tenant FROM {self.p}batches WHERE id = ?", batch_id)
        return str(rows[0][0]) if rows else None

    async def list_batches(self, tenant: str, after: str | None, limit: int) -> list[JSONObject]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        if after is None:
            rows = await self._fetch(
                f"SELECT data FROM {self.p}batches WHERE tenant = ? ORDER BY seq DESC LIMIT ?", tenant, limit
            )
        else:
            rows = await self._fetch(
                f"SELECT data FROM {self.p}batches WHERE tenant = ? AND seq < (SELECT seq FROM {self.p}batches"
                " WHERE id = ? AND tenant = ?) ORDER BY seq DESC LIMIT ?",
                tenant,
                after,
                tenant,
                limit,
            )
        return [_json(row[0]) for row in rows]

    async def save_batch(self, batch: JSONObject, expect: str) -> bool:
        """Write the batch if its stored status is still ``expect`` (a worker and a cancel may race)."""
        async with (await self._open()).transaction() as tx:
            rows = await tx.fetch(
                self.sql(f"UPDATE {self.p}batches SET status = ?, data = ? WHERE id = ? AND status = ? RETURNING id"),
                batch["status"],
                orjson.dumps(batch).decode(),
                batch["id"],
                expect,
            )
        return bool(rows)

    async def active(self) -> list[str]:
        """Ids of batches not yet in a final state, oldest first."""
        marks = ", ".join("?" for _ in TERMINAL)
        rows = await self._fetch(
            f"SELECT id FROM {self.p}batches WHERE status NOT IN ({marks}) ORDER BY seq", *TERMINAL
        )
        return [str(row[0]) for row in rows]

    async def claim(self, batch_id: str, owner: str, now: float, until: float) -> bool:
        """Take (or keep) the lease on a batch: one instance's worker drives it at a time."""
        async with (await self._open()).transaction() as tx:
            rows = await tx.fetch(
                self.sql(
                    f"UPDATE {self.p}batches SET owner = ?, lease_until = ? WHERE id = ?"
                    " AND (owner IS NULL OR owner = ? OR lease_until < ?) RETURNING id"
                ),
                owner,
                until,
                batch_id,
                owner,
                now,
            )
        return bool(rows)

    async def release(self, owner: str) -> None:
        await self._execute(f"UPDATE {self.p}batches SET owner = NULL, lease_until = 0 WHERE owner = ?", owner)

    # --- items and groups ---------------------------------------------------------------------------

    _ITEM_COLUMNS = (
        "idx, custom_id, model, body, state, grp, result, ok, cost_micros, sync_cost_micros, input_tokens,"
        " output_tokens"
    )

    async def items(self, batch_id: str, state: str | None = None) -> list[Item]:
        if state is None:
            rows = await self._fetch(
                f"SELECT {self._ITEM_COLUMNS} FROM {self.p}items WHERE batch_id = ? ORDER BY idx", batch_id
            )
        else:
            rows = await self._fetch(
                f"SELECT {self._ITEM_COLUMNS} FROM {self.p}items WHERE batch_id = ? AND state = ? ORDER BY idx",
                batch_id,
                state,
            )
        return [_item(row) for row in rows]

    async def assign(self, batch_id: str, idxs: Sequence[int], grp: str, state: str) -> None:
        statement = self.sql(f"UPDATE {self.p}items SET grp = ?, state = ? WHERE batch_id = ? AND idx = ?")
        await (await self._open()).write_batch([(statement, (grp, state, batch_id, idx)) for idx in idxs])

    async def finish(self, batch_id: str, items: Sequence[Item]) -> None:
        """Record the outcomes of ``items`` (state done)."""
        statement = self.sql(
            f"UPDATE {self.p}items SET state = 'done', result = ?, ok = ?, cost_micros = ?, sync_cost_micros = ?,"
            " input_tokens = ?, output_tokens = ? WHERE batch_id = ? AND idx = ?"
        )
        ops: list[tuple[str, tuple[object, ...]]] = [
            (
                statement,
                (
                    orjson.dumps(item.result).decode(),
                    int(bool(item.ok)),
                    item.cost_micros,
                    item.sync_cost_micros,
                    item.input_tokens,
                    item.output_tokens,
                    batch_id,
                    item.idx,
                ),
            )
            for item in items
        ]
        if ops:
            await (await self._open()).write_batch(ops)

    async def counts(self, batch_id: str) -> Counts:
        rows = await self._fetch(
            "SELECT count(*), coalesce(sum(CASE WHEN state = 'done' AND ok = 1 THEN 1 ELSE 0 END), 0),"
            " coalesce(sum(CASE WHEN state = 'done' AND ok = 0 THEN 1 ELSE 0 END), 0),"
            " coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),"
            " coalesce(sum(cost_micros), 0), coalesce(sum(sync_cost_micros), 0)"
            f" FROM {self.p}items WHERE batch_id = ?",
            batch_id,
        )
        return Counts(*(int(v) for v in rows[0]))

    async def groups(self, batch_id: str) -> list[Group]:
        rows = await self._fetch(
            f"SELECT grp, deployment, upstream_id, status FROM {self.p}groups WHERE batch_id = ? ORDER BY grp",
            batch_id,
        )
        return [Group(str(r[0]), str(r[1]), r[2], str(r[3])) for r in rows]

    async def put_group(self, batch_id: str, group: Group) -> None:
        await self._execute(
            f"INSERT INTO {self.p}groups (batch_id, grp, deployment, upstream_id, status) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (batch_id, grp) DO UPDATE SET deployment = excluded.deployment,"
            " upstream_id = excluded.upstream_id, status = excluded.status",
            batch_id,
            group.grp,
            group.deployment,
            group.upstream_id,
            group.status,
        )

    # --- requests queued with x-atajo-priority: batch ----------------------------------------------

    async def queue_request(self, request: Queued) -> int:
        """Store a queued request; how many requests its collection now holds (1: a window opens)."""
        r = request
        async with (await self._open()).transaction() as tx:
            await tx.execute(
                self.sql(
                    f"INSERT INTO {self.p}requests (id, tenant, key_name, endpoint, model, body, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)"
                ),
                r.id, r.tenant, r.key_name, r.endpoint, r.model, orjson.dumps(r.body).decode(), r.created_at,
            )  # fmt: skip
            rows = await tx.fetch(
                self.sql(
                    f"SELECT count(*) FROM {self.p}requests WHERE tenant = ? AND key_name = ? AND endpoint = ?"
                    " AND batch_id IS NULL"
                ),
                r.tenant,
                r.key_name,
                r.endpoint,
            )
        return int(rows[0][0])

    async def collections(self) -> list[Collection]:
        """Every collection of queued requests not yet in a batch."""
        rows = await self._fetch(
            f"SELECT tenant, key_name, endpoint, count(*), min(created_at) FROM {self.p}requests"
            " WHERE batch_id IS NULL GROUP BY tenant, key_name, endpoint"
        )
        return [Collection(str(r[0]), str(r[1]), str(r[2]), int(r[3]), float(r[4])) for r in rows]

    async def seal(self, tenant: str, key_name: str, endpoint: str, limit: int, make: MakeBatch) -> str | None:
        """Turn up to ``limit`` of a collection's queued requests (oldest first) into one batch, its input
        file and items, in one transaction: the id of the batch, or None when none was left (another
        instance sealed them)."""
        lock = " FOR UPDATE SKIP LOCKED" if self.postgres else ""
        async with (await self._open()).transaction() as tx:
            rows = await tx.fetch(
                self.sql(
                    f"SELECT {self._QUEUED_COLUMNS} FROM {self.p}requests WHERE tenant = ? AND key_name = ?"
                    f" AND endpoint = ? AND batch_id IS NULL ORDER BY created_at, id LIMIT ?{lock}"
                ),
                tenant,
                key_name,
                endpoint,
                limit,
            )
            if not rows:
                return None
            queued = [_queued(row) for row in rows]
            batch, f, content = make(queued)
            await tx.execute(
                self.sql(
                    f"INSERT INTO {self.p}files (id, tenant, purpose, filename, bytes, created_at, expires_at,"
                    " content) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                f.id, f.tenant, f.purpose, f.filename, f.bytes, f.created_at, f.expires_at, content,
            )  # fmt: skip
            await tx.execute(
                self.sql(f"INSERT INTO {self.p}batches (id, tenant, status, data) VALUES (?, ?, ?, ?)"),
                batch["id"], tenant, batch["status"], orjson.dumps(batch).decode(),
            )  # fmt: skip
            insert = self.sql(
                f"INSERT INTO {self.p}items (batch_id, idx, custom_id, model, body, state) VALUES (?, ?, ?, ?, ?, ?)"
            )
            mark = self.sql(f"UPDATE {self.p}requests SET batch_id = ?, idx = ? WHERE id = ?")
            for idx, q in enumerate(queued):
                await tx.execute(insert, batch["id"], idx, q.id, q.model, orjson.dumps(q.body).decode(), "pending")
                await tx.execute(mark, batch["id"], idx, q.id)
        return str(batch["id"])

    _QUEUED_COLUMNS = "id, tenant, key_name, endpoint, model, body, created_at, batch_id, idx"

    async def queued(self, tenant: str, request_id: str) -> QueuedState | None:
        """A queued request of ``tenant`` (another tenant's is None), with its batch's status and its item."""
        q = ", ".join(f"r.{c.strip()}" for c in self._QUEUED_COLUMNS.split(","))
        i = ", ".join(f"i.{c.strip()}" for c in self._ITEM_COLUMNS.split(","))
        rows = await self._fetch(
            f"SELECT {q}, b.status, {i} FROM {self.p}requests r"
            f" LEFT JOIN {self.p}batches b ON b.id = r.batch_id"
            f" LEFT JOIN {self.p}items i ON i.batch_id = r.batch_id AND i.idx = r.idx"
            " WHERE r.id = ? AND r.tenant = ?",
            request_id,
            tenant,
        )
        if not rows:
            return None
        row = tuple(rows[0])
        width = len(self._QUEUED_COLUMNS.split(","))
        item = _item(row[width + 1 :]) if row[width + 1] is not None else None
        return QueuedState(_queued(row[:width]), None if row[width] is None else str(row[width]), item)


def _queued(row: Sequence[Any]) -> Queued:
    return Queued(
        str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]), _json(row[5]), float(row[6]),
        None if row[7] is None else str(row[7]), None if row[8] is None else int(row[8]),
    )  # fmt: skip


def _file(row: Sequence[Any]) -> StoredFile:
    return StoredFile(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), float(row[5]), row[6])


def _json(raw: Any) -> JSONObject:
    data = orjson.loads(raw)
    assert isinstance(data, dict)
    return data


def _item(row: Sequence[Any]) -> Item:
    return Item(
        idx=int(row[0]),
        custom_id=str(row[1]),
        model=str(row[2]),
        body=_json(row[3]),
        state=str(row[4]),
        grp=row[5],
        result=_json(row[6]) if row[6] is not None else None,
        ok=None if row[7] is None else bool(row[7]),
        cost_micros=row[8],
        sync_cost_micros=row[9],
        input_tokens=row[10],
        output_tokens=row[11],
    )


# --- the two databases --------------------------------------------------------------------------------
