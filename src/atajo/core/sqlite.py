"""Opening an SQLite file that other processes (``--workers``, other instances) may be opening at the same
moment."""

from __future__ import annotations

import asyncio
import sqlite3
import time
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
