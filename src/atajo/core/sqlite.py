"""What the SQL stores (cache tier, keys, batches, ledger) share: opening an SQLite file that other processes
(``--workers``, other instances) may be opening at the same moment, URL paths, and sessions with one calling
convention for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_S = 5.0


async def prepare(conn: Any, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
    """Set the busy timeout, then WAL mode, on an aiosqlite connection.

    The timeout goes first, so every later statement waits for a lock instead of failing. Switching the
    journal mode is retried: when another process is setting up the same file, SQLite can refuse it at once
    ("database is locked") without waiting through the busy handler."""
    await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


def numbered(statement: str) -> str:
    """``statement`` written with ``?`` placeholders (which no statement here holds otherwise) in PostgreSQL's
    ``$1, $2, …``."""
    parts = statement.split("?")
    return "".join(part + (f"${i}" if i < len(parts) else "") for i, part in enumerate(parts, 1))


def sqlite_path(rest: str, setting: str = "") -> str:
    """The file of an ``sqlite://`` URL's rest: ``/rel.db`` → ``rel.db``, ``//abs.db`` → ``/abs.db``, ``~``
    expanded; ``:memory:`` (or ``/:memory:``) as is. ``setting`` prefixes the error (``batches.url: …``)."""
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/") or rest == "/":
        prefix = f"{setting}: " if setting else ""
        raise ValueError(f"{prefix}an SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return os.path.expanduser(rest[1:])


def run_ops(conn: sqlite3.Connection, ops: Sequence[tuple[str, tuple[object, ...]]]) -> None:
    """In aiosqlite's thread: the statements of one write transaction (one trip for the whole batch)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement, args in ops:
            conn.execute(statement, args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteSession:
    """Statements on an aiosqlite connection, with the same calls as ``PostgresSession``."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, statement: str, *args: object) -> None:
        await self._conn.execute(statement, args)

    async def fetch(self, statement: str, *args: object) -> list[Sequence[Any]]:
        async with self._conn.execute(statement, args) as cursor:
            return list(await cursor.fetchall())


class PostgresSession:
    """Statements on an asyncpg connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, statement: str, *args: object) -> None:
        await self._conn.execute(statement, *args)

    async def fetch(self, statement: str, *args: object) -> list[Sequence[Any]]:
        return list(await self._conn.fetch(statement, *args))


class DirectSession:
    """Reads on the calling thread (the event loop), through a plain ``sqlite3`` connection: a primary-key
    read of a local file that WAL mode never makes wait takes less than aiosqlite's two thread hand-offs."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, statement: str, *args: object) -> None:
        raise RuntimeError("the direct session only reads")

    async def fetch(self, statement: str, *args: object) -> list[Sequence[Any]]:
        return self._conn.execute(statement, args).fetchall()


Session = SqliteSession | PostgresSession | DirectSession


class SqliteDatabase:
    """One aiosqlite connection in autocommit mode whose transactions are explicit (BEGIN IMMEDIATE), calls
    serialized by a lock; optionally (``reader``) a plain ``sqlite3`` connection for reads on the event loop."""

    def __init__(self, conn: Any, reader: sqlite3.Connection | None = None) -> None:
        self._conn = conn
        self._reader = reader
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, path: str, schema: Sequence[str], *, reader: bool = False, busy_timeout_s: float = BUSY_TIMEOUT_S
    ) -> SqliteDatabase:
        import aiosqlite

        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await prepare(conn, busy_timeout_s)
            db = cls(conn)
            async with db.transaction() as tx:
                for statement in schema:
                    await tx.execute(statement)
            if reader and path != ":memory:":  # a second connection to :memory: would be another database
                direct = sqlite3.connect(path, isolation_level=None)
                direct.execute("PRAGMA query_only=ON")
                db._reader = direct
        except BaseException:
            await conn.close()
            raise
        return db

    @contextlib.asynccontextmanager
    async def read_session(self) -> AsyncIterator[Session]:
        if self._reader is None:
            async with self.session() as s:
                yield s
        else:
            yield DirectSession(self._reader)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        async with self._lock:
            await self._settle()
            yield SqliteSession(self._conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        async with self._lock:
            await self._settle()
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteSession(self._conn)
            except BaseException:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def write_batch(self, ops: Sequence[tuple[str, tuple[object, ...]]]) -> None:
        """``ops`` in one transaction, in ONE trip to aiosqlite's thread rather than one per statement (each
        trip costs a thread hand-off both ways; measured in docs/benchmarks.md). aiosqlite has no public call
        for running a function in its thread; ``_execute`` is the one its own methods use."""
        async with self._lock:
            await self._settle()
            await self._conn._execute(run_ops, self._conn._conn, ops)

    async def _settle(self) -> None:
        """Roll back what a cancelled call left open (its statements still ran, in aiosqlite's thread), so
        the file's write lock is not held and the next BEGIN does not fail."""
        if self._conn.in_transaction:
            await self._conn.execute("ROLLBACK")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        await self._conn.close()


class PostgresDatabase:
    """An asyncpg pool; the schema is created under an advisory lock, so instances starting together agree."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, schema: Sequence[str], **pool: Any) -> PostgresDatabase:
        """``pool``: asyncpg ``create_pool`` options (``max_size``, ``timeout``, ``command_timeout``, …)."""
        import asyncpg

        created = await asyncpg.create_pool(url, min_size=1, **pool)
        try:
            db = cls(created)
            async with db.transaction() as tx:
                await tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema[0])
                for statement in schema:
                    await tx.execute(statement)
        except BaseException:
            await created.close()
            raise
        return db

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        async with self._pool.acquire() as conn:
            yield PostgresSession(conn)

    def read_session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        return self.session()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresSession(conn)

    async def write_batch(self, ops: Sequence[tuple[str, tuple[object, ...]]]) -> None:
        async with self.transaction() as tx:
            for statement, args in ops:
                await tx.execute(statement, *args)

    async def close(self) -> None:
        await self._pool.close()
