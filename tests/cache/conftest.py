"""Every tier backend on a real store (memory, Redis, SQLite, PostgreSQL), each test isolated.

Redis and PostgreSQL are the servers on 127.0.0.1 (ARCHITECTURE: started before each session). A test that
needs one skips, naming it, when it cannot be reached, except under ``CI=true``, where that fails the test.
Redis tests use a key prefix of their own and delete it afterwards; PostgreSQL tests use tables of this test
run, emptied before each test and dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import pytest

from atajo.cache.entry import CacheBackend, Entry
from atajo.cache.memory import MemoryBackend
from tests.conftest import IN_CI
from tests.doubles import FakeClock

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ["memory", "redis", "sqlite", "postgres"]
T0 = 10_000.0
"""Where every test's FakeClock starts."""


def need_server(what: str, host: str, port: int) -> None:
    """Skip (fail under CI=true) when nothing listens at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return
    except OSError as exc:
        reason = f"{what} is not reachable at {host}:{port} ({exc.__class__.__name__})"
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


def make_entry(
    key: str,
    *,
    tags: Iterable[str] = (),
    namespace: str = "ns",
    value: bytes | None = None,
    created_at: float = T0,
    fresh_s: float = 60.0,
    keep_s: float = 600.0,
) -> Entry:
    """An entry under ``key`` (``{tenant}/…``: the tenant is what precedes the first ``/``)."""
    tenant = key.split("/", 1)[0]
    return Entry(
        key=key,
        tenant=tenant,
        namespace=namespace,
        value=value if value is not None else f"answer for {key}".encode(),
        created_at=created_at,
        fresh_until=created_at + fresh_s,
        keep_until=created_at + keep_s,
        tags=frozenset(tags),
    )


async def present(backend: CacheBackend, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` the backend still returns."""
    return {key for key in keys if await backend.get(key) is not None}


def twin(backend: CacheBackend, clock: FakeClock) -> CacheBackend:
    """A second instance on the same store as ``backend`` (as another process would open it)."""
    from atajo.cache.redis import RedisBackend
    from atajo.cache.sql import SqlBackend

    if isinstance(backend, RedisBackend):
        return RedisBackend(REDIS_URL, clock, prefix=backend.prefix, timeout_s=2.0)
    if isinstance(backend, SqlBackend):
        url = POSTGRES_URL if backend.dialect.name == "postgresql" else f"sqlite:///{backend.database}"
        return SqlBackend(url, clock, table_prefix=backend.table_prefix)
    raise TypeError(f"{backend!r} is per-process")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


async def _redis_backend(clock: FakeClock) -> AsyncIterator[CacheBackend]:
    need_server("Redis", "127.0.0.1", 6379)
    from redis.asyncio import Redis

    from atajo.cache.redis import RedisBackend

    prefix = f"atajo:test:{secrets.token_hex(6)}:"
    backend = RedisBackend(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()
        client = Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest.fixture(scope="session")
def postgres_tables() -> Iterator[str]:
    """A table prefix of this test run; its tables are dropped at the end (emptied before each test)."""
    table_prefix = f"atajo_cache_t{secrets.token_hex(5)}_"
    yield table_prefix

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL, timeout=2)
        try:
            await conn.execute(
                f"DROP TABLE IF EXISTS {table_prefix}entries, {table_prefix}tags, {table_prefix}invalidations"
            )
        finally:
            await conn.close()

    with contextlib.suppress(OSError):  # nothing to drop when PostgreSQL was not there
        asyncio.run(drop())


async def _postgres_backend(clock: FakeClock, table_prefix: str) -> AsyncIterator[CacheBackend]:
    need_server("PostgreSQL", "127.0.0.1", 5432)
    import asyncpg

    from atajo.cache.sql import SqlBackend

    backend = SqlBackend(POSTGRES_URL, clock, table_prefix=table_prefix)
    await backend.start()
    try:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f"DELETE FROM {table_prefix}entries; DELETE FROM {table_prefix}tags")
        finally:
            await conn.close()
        yield backend
    finally:
        await backend.close()


async def _sqlite_backend(clock: FakeClock, tmp_path: Path) -> AsyncIterator[CacheBackend]:
    from atajo.cache.sql import SqlBackend

    backend = SqlBackend(f"sqlite:///{tmp_path}/cache.db", clock)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path, postgres_tables: str
) -> AsyncIterator[CacheBackend]:
    """A started backend of each kind, empty, on ``clock``."""
    kind = request.param
    if kind == "memory":
        yield MemoryBackend(16 * 1024 * 1024, clock)
    elif kind == "redis":
        async for started in _redis_backend(clock):
            yield started
    elif kind == "sqlite":
        async for started in _sqlite_backend(clock, tmp_path):
            yield started
    else:
        async for started in _postgres_backend(clock, postgres_tables):
            yield started
