"""Virtual keys and tenants in SQL: SQLite (embedded default, via aiosqlite) or PostgreSQL (via asyncpg).

Three tables, prefixed ``atajo_auth_``: ``tenants`` (name, limits), ``keys`` (id, SHA-256 digest of the secret,
tenant, settings as JSON, dates) and ``events``, an append-only log of what changed a lookup (a key revoked,
rotated or created; a tenant's limits changed) that every instance polls to drop what it holds in memory. The
secret itself is never stored: only its digest and a hint (``sk-atajo-…`` and its last four characters).

The statements are written once with ``?`` placeholders, as in ``atajo.cache.sql`` (whose patterns this
follows: WAL and a short busy timeout on SQLite, a pool and schema creation under an advisory lock on
PostgreSQL). Revoked keys stay in the table (``revoked_at`` set), for the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import orjson

from atajo.core.sqlite import PostgresDatabase, SqliteDatabase, numbered
from atajo.settings import CachePolicy, RateLimit, Trust

Clock = Callable[[], float]
EVENTS_KEEP_S = 3600.0
"""Change-log rows older than this are pruned; an instance that could not read the log longer forgets every
lookup it holds (it cannot know what it missed)."""
SQLITE_BUSY_TIMEOUT_S = 2.0


def _schema(p: str, serial: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {p}events (id {serial}, at DOUBLE PRECISION NOT NULL,"
        " kind TEXT NOT NULL, subject TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {p}tenants (name TEXT PRIMARY KEY, limits TEXT,"
        " created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {p}keys (id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE,"
        " tenant TEXT NOT NULL, name TEXT, hint TEXT NOT NULL, config TEXT NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL, rotated_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION)",
        f"CREATE INDEX IF NOT EXISTS {p}keys_tenant ON {p}keys (tenant)",
    ]


@dataclass(frozen=True, slots=True)
class TenantRecord:
    name: str
    limits: RateLimit | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A virtual key as stored: everything but the secret."""

    id: str
    tenant: str
    digest: str = field(repr=False)
    hint: str
    name: str | None = None
    models: tuple[str, ...] | None = None
    limits: RateLimit | None = None
    budget_micros: int | None = None
    cache: CachePolicy | None = None
    trust: Trust = "auto"
    created_at: float = 0.0
    rotated_at: float | None = None
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def config_json(self) -> str:
        config: dict[str, Any] = {
            "models": list(self.models) if self.models is not None else None,
            "limits": self.limits.model_dump(exclude_none=True) if self.limits is not None else None,
            "budget_micros": self.budget_micros,
            "cache": self.cache.model_dump(exclude_none=True) if self.cache is not None else None,
            "trust": self.trust,
        }
        return orjson.dumps(config).decode()

    @staticmethod
    def config_fields(raw: str) -> dict[str, Any]:
        config = orjson.loads(raw)
        return {
            "models": tuple(config["models"]) if config.get("models") is not None else None,
            "limits": RateLimit.model_validate(config["limits"]) if config.get("limits") is not None else None,
            "budget_micros": config.get("budget_micros"),
            "cache": CachePolicy.model_validate(config["cache"]) if config.get("cache") is not None else None,
            "trust": config.get("trust", "auto"),
        }


class KeyStoreError(Exception):
    """The store could not be read or written (the database is down, say)."""


class DuplicateKey(KeyStoreError):
    pass


class _Session(Protocol):
    async def execute(self, statement: str, *args: object) -> None: ...

    async def fetch(self, statement: str, *args: object) -> list[Sequence[Any]]: ...


class KeyStore:
    """The keys and tenants, in the database named by ``url`` (``sqlite:///path`` or ``postgresql://…``)."""

    def __init__(self, url: str, *, clock: Clock = time.time, table_prefix: str = "atajo_auth_") -> None:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$", table_prefix):
            raise ValueError(f"table_prefix {table_prefix!r} is not a plain SQL identifier")
        scheme, sep, rest = url.partition("://")
        if scheme == "sqlite" and sep:
            self.kind = "sqlite"
            self.path = _sqlite_path(rest)
        elif scheme in ("postgresql", "postgres") and sep:
            self.kind = "postgresql"
            self.path = ""
        else:
            raise ValueError("auth.store: not an sqlite:// or postgresql:// URL")
        self.url = url
        self.clock = clock
        self.prefix = p = table_prefix
        self._db: SqliteDatabase | PostgresDatabase | None = None
        self._opening = asyncio.Lock()
        key_columns = "k.id, k.digest, k.tenant, k.name, k.hint, k.config, k.created_at, k.rotated_at, k.revoked_at"
        self._key_columns = key_columns
        sql = self._sql
        self.q_find = sql(
            f"SELECT {key_columns}, t.name, t.limits, t.created_at, t.updated_at FROM {p}keys k"
            f" LEFT JOIN {p}tenants t ON t.name = k.tenant WHERE k.digest = ? AND k.revoked_at IS NULL"
        )
        self.q_get = sql(f"SELECT {key_columns} FROM {p}keys k WHERE k.id = ?")
        self.q_list = sql(f"SELECT {key_columns} FROM {p}keys k ORDER BY k.created_at, k.id")
        self.q_list_tenant = sql(f"SELECT {key_columns} FROM {p}keys k WHERE k.tenant = ? ORDER BY k.created_at, k.id")
        self.q_insert = sql(
            f"INSERT INTO {p}keys (id, digest, tenant, name, hint, config, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self.q_revoke = sql(f"UPDATE {p}keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
        self.q_rotate = sql(
            f"UPDATE {p}keys SET digest = ?, hint = ?, rotated_at = ? WHERE id = ? AND revoked_at IS NULL"
        )
        self.q_tenant_ensure = sql(
            f"INSERT INTO {p}tenants (name, limits, created_at, updated_at) VALUES (?, NULL, ?, ?)"
            " ON CONFLICT (name) DO NOTHING"
        )
        self.q_tenant_put = sql(
            f"INSERT INTO {p}tenants (name, limits, created_at, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET limits = excluded.limits, updated_at = excluded.updated_at"
        )
        self.q_tenant_get = sql(f"SELECT name, limits, created_at, updated_at FROM {p}tenants WHERE name = ?")
        self.q_tenants = sql(f"SELECT name, limits, created_at, updated_at FROM {p}tenants ORDER BY name")
        self.q_event = sql(f"INSERT INTO {p}events (at, kind, subject) VALUES (?, ?, ?)")
        self.q_event_prune = sql(f"DELETE FROM {p}events WHERE at < ?")
        self.q_events_after = sql(f"SELECT id, kind, subject FROM {p}events WHERE id > ? ORDER BY id LIMIT 1000")
        self.q_event_ids = sql(f"SELECT coalesce(max(id), 0), coalesce(min(id), 0) FROM {p}events")

    def _sql(self, statement: str) -> str:
        if self.kind == "sqlite":
            return statement
        return numbered(statement)

    def __repr__(self) -> str:
        return f"KeyStore({self.kind})"

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._open()

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def _open(self) -> SqliteDatabase | PostgresDatabase:
        if self._db is not None:
            return self._db
        async with self._opening:
            if self._db is None:
                try:
                    if self.kind == "sqlite":
                        schema = _schema(self.prefix, "INTEGER PRIMARY KEY AUTOINCREMENT")
                        self._db = await SqliteDatabase.open(self.path, schema, busy_timeout_s=SQLITE_BUSY_TIMEOUT_S)
                    else:
                        self._db = await PostgresDatabase.open(
                            self.url,
                            _schema(self.prefix, "BIGSERIAL PRIMARY KEY"),
                            max_size=5,
                            timeout=5.0,
                            command_timeout=10.0,
                        )
                except Exception as exc:
                    raise KeyStoreError(f"cannot open the key store ({type(exc).__name__})") from exc
            return self._db

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Session]:
        db = await self._open()
        try:
            async with db.transaction() as tx:
                yield tx
        except KeyStoreError:
            raise
        except Exception as exc:
            if "unique" in str(exc).lower():
                raise DuplicateKey("a key with this digest or id exists") from exc
            raise KeyStoreError(f"key store operation failed ({type(exc).__name__})") from exc

    async def _fetch(self, statement: str, *args: object) -> list[Sequence[Any]]:
        async with self._transaction() as tx:
            return await tx.fetch(statement, *args)

    async def _event(self, tx: _Session, kind: str, subject: str) -> None:
        now = time.time()  # real time: rows age out for every instance alike, whatever clock tests inject
        await tx.execute(self.q_event, now, kind, subject)
        await tx.execute(self.q_event_prune, now - EVENTS_KEEP_S)

    # --- keys -------------------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> KeyRecord:
        """Store a new key (and its tenant, without limits, if new). A creation is logged too: instances that
        cached the digest as unknown forget that."""
        now = self.clock()
        record = replace(record, created_at=now)
        async with self._transaction() as tx:
            await tx.execute(self.q_tenant_ensure, record.tenant, now, now)
            await tx.execute(
                self.q_insert,
                record.id,
                record.digest,
                record.tenant,
                record.name,
                record.hint,
                record.config_json(),
                record.created_at,
            )
            await self._event(tx, "key", record.digest)
        return record

    async def find(self, digest: str) -> tuple[KeyRecord, TenantRecord | None] | None:
        """The live (not revoked) key with this digest, and its tenant."""
        rows = await self._fetch(self.q_find, digest)
        if not rows:
            return None
        row = rows[0]
        tenant = _tenant(row[9:]) if row[9] is not None else None
        return _key(row[:9]), tenant

    async def get_key(self, key_id: str) -> KeyRecord | None:
        rows = await self._fetch(self.q_get, key_id)
        return _key(rows[0]) if rows else None

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        rows = await (self._fetch(self.q_list) if tenant is None else self._fetch(self.q_list_tenant, tenant))
        return [_key(row) for row in rows]

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoke the key (None if there is no such key); revoking a revoked key changes nothing."""
        async with self._transaction() as tx:
            rows = await tx.fetch(self.q_get, key_id)
            if not rows:
                return None
            record = _key(rows[0])
            if record.revoked:
                return record
            now = self.clock()
            await tx.execute(self.q_revoke, now, key_id)
            await self._event(tx, "key", record.digest)
        return replace(record, revoked_at=now)

    async def rotate(self, key_id: str, digest: str, hint: str) -> KeyRecord | None:
        """Give the key a new secret (its digest and hint); the old one stops working. None if there is no
        such live key."""
        async with self._transaction() as tx:
            rows = await tx.fetch(self.q_get, key_id)
            if not rows or _key(rows[0]).revoked:
                return None
            record = _key(rows[0])
            now = self.clock()
            await tx.execute(self.q_rotate, digest, hint, now, key_id)
            await self._event(tx, "key", record.digest)
            await self._event(tx, "key", digest)
        return replace(record, digest=digest, hint=hint, rotated_at=now)

    # --- tenants ----------------------------------------------------------------------------------

    async def put_tenant(self, name: str, limits: RateLimit | None) -> tuple[TenantRecord, bool]:
        """Create the tenant or replace its limits; (the tenant, whether it is new)."""
        now = self.clock()
        raw = orjson.dumps(limits.model_dump(exclude_none=True)).decode() if limits is not None else None
        async with self._transaction() as tx:
            existing = await tx.fetch(self.q_tenant_get, name)
            await tx.execute(self.q_tenant_put, name, raw, now, now)
            await self._event(tx, "tenant", name)
            rows = await tx.fetch(self.q_tenant_get, name)
        return _tenant(rows[0]), not existing

    async def get_tenant(self, name: str) -> TenantRecord | None:
        rows = await self._fetch(self.q_tenant_get, name)
        return _tenant(rows[0]) if rows else None

    async def list_tenants(self) -> list[TenantRecord]:
        return [_tenant(row) for row in await self._fetch(self.q_tenants)]

    # --- the change log ---------------------------------------------------------------------------

    async def events_after(self, after_id: int) -> list[tuple[int, str, str]]:
        return [(int(r[0]), str(r[1]), str(r[2])) for r in await self._fetch(self.q_events_after, after_id)]

    async def event_ids(self) -> tuple[int, int]:
        """(last, first) ids in the change log, 0 when empty."""
        rows = await self._fetch(self.q_event_ids)
        return int(rows[0][0]), int(rows[0][1])


def _key(row: Sequence[Any]) -> KeyRecord:
    key_id, digest, tenant, name, hint, config, created_at, rotated_at, revoked_at = row
    return KeyRecord(
        id=key_id,
        tenant=tenant,
        digest=digest,
        hint=hint,
        name=name,
        created_at=float(created_at),
        rotated_at=float(rotated_at) if rotated_at is not None else None,
        revoked_at=float(revoked_at) if revoked_at is not None else None,
        **KeyRecord.config_fields(config),
    )


def _tenant(row: Sequence[Any]) -> TenantRecord:
    name, limits, created_at, updated_at = row
    parsed = RateLimit.model_validate(orjson.loads(limits)) if limits else None
    return TenantRecord(name, parsed, float(created_at), float(updated_at))


def _sqlite_path(rest: str) -> str:
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    path = rest[1:] if rest.startswith("/") else rest
    return str(Path(path).expanduser()) if path.startswith("~") else path
