"""What the SQL stores (cache tier, keys, batches, ledger) share: opening an SQLite file that other processes
(``--workers``, other instances) may be opening at the same moment, URL paths, and sessions with one calling
convention for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Sequence
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
