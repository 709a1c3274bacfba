"""The cost ledger: one row per request that reached the pipeline, written in batches off the request path.

``record`` only appends to a list in memory; a background task writes what is pending every
``flush_interval_s`` in one transaction, and ``close`` (a clean stop) writes the rest. Rows survive a crash
of the provider (a failed request is a row too) and of this process once written: a kill -9 loses at most
the rows of the last interval. A failed write keeps its rows for the next try (counted in
``atajo_ledger_write_failures_total``); beyond ``max_pending`` rows waiting, new ones are dropped and
counted (``atajo_ledger_dropped_total``), so a database outage cannot exhaust memory.

SQLite (embedded default; WAL, so a reader such as ``atajo report costs`` never blocks the writer) through
aiosqlite, or PostgreSQL through asyncpg. One table, ``atajo_ledger`` (``COLUMNS``), created if absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

from atajo.core.sqlite import prepare

log = logging.getLogger("atajo.ledger")

TABLE = "atajo_ledger"
CAUSES = ("cache", "routing", "coalescing", "batching", "none")


@dataclass(slots=True)
class LedgerRecord:
    at: float
    """Unix time the request was answered (or failed)."""
    request_id: str
    tenant: str
    key_name: str
    operation: str
    requested_model: str
    routed_model: str | None
    response_model: str | None
    """The model the answer says it came from."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micros: int
    """What the provider calls cost at catalog prices (0 for cache hits and coalesced followers)."""
    baseline_micros: int
    """What the request would have cost on the requested model with no cache and no routing."""
    cache_status: str
    cause: str
    """What saved money, if anything: cache, coalescing, routing, or none."""
    latency_ms: float
    outcome: str
    """ok, or the error code the client got (cancelled when it left first)."""
    stream: bool


COLUMNS = tuple(f.name for f in fields(LedgerRecord))
_ROW = attrgetter(*COLUMNS)
"""A record's values in column order (``dataclasses.astuple`` deep-copies every field: most of a write's cost)."""
_TYPES = {"at": "DOUBLE PRECISION", "latency_ms": "DOUBLE PRECISION", "stream": "BOOLEAN"}
_INTS = {"prompt_tokens", "completion_tokens", "cached_tokens", "cost_micros", "baseline_micros"}


def schema() -> list[str]:
    columns = ", ".join(
        f"{name} {_TYPES.get(name, 'BIGINT' if name in _INTS else 'TEXT')}"
        + (" NOT NULL" if name not in ("routed_model", "response_model") else "")
        for name in COLUMNS
    )
    return [
        f"CREATE TABLE IF NOT EXISTS {TABLE} ({columns})",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_at ON {TABLE} (at)",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_tenant_at ON {TABLE} (tenant, at)",
    ]


class LedgerObserver(Protocol):
    def ledger_written(self, rows: int) -> None: ...

    def ledger_failed(self) -> None: ...

    def ledger_dropped(self, rows: int) -> None: ...


class LedgerDatabase(Protocol):
    async def write(self, rows: Sequence[tuple[Any, ...]]) -> None: ...

    async def close(self) -> None: ...


class Ledger:
    def __init__(self, url: str, *, flush_interval_s: float, max_pending: int, observer: LedgerObserver) -> None:
        self.url = url
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.observer = observer
        self._pending: list[LedgerRecord] = []
        self._db: LedgerDatabase | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._db = await open_database(self.url)
        self._task = asyncio.get_running_loop().create_task(self._flush_every())

    def record(self, record: LedgerRecord) -> None:
        if len(self._pending) >= self.max_pending:
            self.observer.ledger_dropped(1)
            return
        self._pending.append(record)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending in one transaction; on failure keep it for the next try (counted)."""
        async with self._lock:
            if not self._pending or self._db is None:
                return
            batch, self._pending = self._pending, []
            try:
                await self._db.write([_ROW(r) for r in batch])
            except Exception as exc:  # fail-open, counted: the rows wait for the next flush
                self.observer.ledger_failed()
                log.warning("ledger write of %d rows failed (kept for the next try): %s", len(batch), exc)
                keep = batch[: max(0, self.max_pending - len(self._pending))]
                if len(keep) < len(batch):
                    self.observer.ledger_dropped(len(batch) - len(keep))
                self._pending = keep + self._pending
                return
            self.observer.ledger_written(len(batch))

    async def close(self) -> None:
        """A clean stop: every pending row is written (one try), then the database is closed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self._db is not None:
            await self._db.close()
            self._db = None


async def open_database(url: str) -> LedgerDatabase:
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        return await _Sqlite.open(sqlite_path(rest))
    return await _Postgres.open(url)


def sqlite_path(rest: str) -> str:
    """``sqlite:///rel.db`` → ``rel.db``, ``sqlite:////abs.db`` → ``/abs.db``, ``~`` expanded."""
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    return os.path.expanduser(rest[1:] if rest.startswith("/") else rest)


_INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class _Sqlite:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: str) -> _Sqlite:
        import aiosqlite

        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await prepare(conn)
            await conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed batch survives a process crash
            for statement in schema():
                await conn.execute(statement)
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        # One trip to aiosqlite's thread for the whole batch (see cache/sql.py for why).
        await self._conn._execute(_write_batch, self._conn._conn, rows)

    async def close(self) -> None:
        await self._conn.close()


def _write_batch(conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT, rows)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _Postgres:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> _Postgres:
        import asyncpg

        pool = await asyncpg.create_pool(url, min_size=1, max_size=2, timeout=5.0, command_timeout=60.0)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", TABLE)
                for statement in schema():
                    await conn.execute(statement)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self._pool.acquire() as conn:
            await conn.copy_records_to_table(TABLE, records=rows, columns=list(COLUMNS))

    async def close(self) -> None:
        await self._pool.close()
