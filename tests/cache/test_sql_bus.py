"""The invalidation bus over a shared SQL database (no Redis): a log table every instance polls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from atajo.cache.bus import BusMessage, SqlBus
from atajo.cache.entry import Selector
from atajo.cache.sql import SqlBackend
from tests.cache.conftest import _postgres_backend, _sqlite_backend
from tests.doubles import FakeClock


@pytest.fixture(params=["sqlite", "postgresql"])
async def sql(request: pytest.FixtureRequest, tmp_path: Path, postgres_tables: str) -> AsyncIterator[SqlBackend]:
    clock = FakeClock()
    backends = (
        _sqlite_backend(clock, tmp_path) if request.param == "sqlite" else _postgres_backend(clock, postgres_tables)
    )
    async for backend in backends:
        assert isinstance(backend, SqlBackend)
        yield backend


async def _until(condition: Callable[[], object], timeout_s: float = 3.0) -> None:
    """Poll for what a background poller does (no event to wait on: it lives in another object's task)."""
    async with asyncio.timeout(timeout_s):
        for _ in range(int(timeout_s / 0.01) + 1):
            if condition():
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the poller never got there")


async def test_a_published_invalidation_reaches_the_other_instance_only(sql: SqlBackend) -> None:
    got_a: list[BusMessage] = []
    got_b: list[BusMessage] = []
    flushes: list[str] = []

    async def flushed() -> None:
        flushes.append("flush")

    async def on_a(message: BusMessage) -> None:
        got_a.append(message)

    async def on_b(message: BusMessage) -> None:
        got_b.append(message)

    a, b = SqlBus(sql, poll_s=0.01), SqlBus(sql, poll_s=0.01)
    await sql.append_invalidation(BusMessage(None, "old").encode("someone"))  # before start: not replayed
    await a.start(on_a, flushed)
    await b.start(on_b, flushed)
    try:
        selector = Selector("acme", frozenset({"user:42"}), "support", None)
        await a.publish(BusMessage(selector))
        await b.publish(BusMessage(None, "globex"))
        await _until(lambda: got_a and got_b)
        await asyncio.sleep(0.05)
        assert [m.selector for m in got_b] == [selector], "b hears a, not itself"
        assert [(m.selector, m.tenant) for m in got_a] == [(None, "globex")]
        assert not flushes
    finally:
        await a.close()
        await b.close()


async def test_an_instance_that_lost_the_log_flushes_its_local_tier(sql: SqlBackend) -> None:
    flushes: list[str] = []

    async def flushed() -> None:
        flushes.append("flush")

    async def ignore(_: BusMessage) -> None:
        pass

    bus = SqlBus(sql, poll_s=0.01)
    await bus.start(ignore, flushed)
    try:
        await asyncio.sleep(0.05)
        db = sql._db
        assert db is not None
        await db.write_batch([(f"DROP TABLE {sql.table_prefix}invalidations", ())])  # the log goes away...
        await asyncio.sleep(0.1)
        assert not flushes
        await sql.close()
        await sql.start()  # ...and comes back (the schema is created again)
        await _until(lambda: flushes)
        assert flushes == ["flush"], "one flush when the log is readable again"
    finally:
        await bus.close()
