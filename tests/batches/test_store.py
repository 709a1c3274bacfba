"""The batch store's contract, the same assertions on SQLite and PostgreSQL: files and batches per tenant,
listing pages, items' outcomes and counts, the optimistic status write, the worker lease."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atajo.batches.store import BatchStore, Group, Item, StoredFile
from atajo.errors import ServiceUnavailable
from tests.cache.conftest import POSTGRES_URL, need_server


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BatchStore]:
    if request.param == "sqlite":
        s = BatchStore(f"sqlite:///{tmp_path}/b.db")
    else:
        need_server("PostgreSQL", "127.0.0.1", 5432)
        s = BatchStore(POSTGRES_URL, table_prefix=f"atajo_batch_t{secrets.token_hex(4)}_")
    await s.start()
    yield s
    if s.postgres:
        async with (await s._open()).session() as session:
            for table in ("files", "batches", "items", "groups", "requests"):
                await session.execute(f"DROP TABLE IF EXISTS {s.p}{table}")
    await s.close()


def batch(batch_id: str, status: str = "validating") -> dict[str, object]:
    return {"id": batch_id, "status": status, "_atajo": {"tenant": "t", "key": "k"}}


async def test_files_are_per_tenant(store: BatchStore) -> None:
    f = StoredFile("file-1", "alpha", "batch", "in.jsonl", 3, 100.0, 200.0)
    await store.put_file(f, b"abc")
    assert await store.get_file("alpha", "file-1") == f
    assert await store.file_content("alpha", "file-1") == b"abc"
    assert await store.get_file("beta", "file-1") is None and await store.file_content("beta", "file-1") is None
    assert [x.id for x in await store.list_files("alpha", None, 10)] == ["file-1"]
    assert await store.list_files("beta", None, 10) == []
    assert not await store.delete_file("beta", "file-1")
    assert await store.purge_files(150.0) == 0 and await store.purge_files(250.0) == 1
    assert await store.get_file("alpha", "file-1") is None


async def test_batches_items_and_counts(store: BatchStore) -> None:
    items = [Item(0, "a", "m", {"model": "m"}), Item(1, "b", "m", {"model": "m"})]
    for i in range(3):
        await store.create_batch("t", batch(f"batch_{i}"), items)
    assert await store.get_batch("other", "batch_0") is None
    assert [b["id"] for b in await store.list_batches("t", None, 2)] == ["batch_2", "batch_1"]
    assert [b["id"] for b in await store.list_batches("t", "batch_1", 2)] == ["batch_0"]
    assert await store.list_batches("other", None, 10) == []
    assert await store.active() == ["batch_0", "batch_1", "batch_2"]

    await store.assign("batch_0", [0], "dep", "submitted")
    await store.put_group("batch_0", Group("dep", "m/0:openai", "up_1", "in_progress"))
    assert await store.groups("batch_0") == [Group("dep", "m/0:openai", "up_1", "in_progress")]
    [first] = await store.items("batch_0", "submitted")
    first.result, first.ok, first.cost_micros, first.sync_cost_micros = {"status_code": 200}, True, 5, 10
    first.input_tokens, first.output_tokens = 7, 3
    second = (await store.items("batch_0", "pending"))[0]
    second.result, second.ok = {"error": {"code": "x"}}, False
    await store.finish("batch_0", [first, second])
    counts = await store.counts("batch_0")
    assert (counts.total, counts.completed, counts.failed) == (2, 1, 1)
    assert (counts.input_tokens, counts.output_tokens, counts.cost_micros, counts.sync_cost_micros) == (7, 3, 5, 10)
    assert [i.result for i in await store.items("batch_0")] == [{"status_code": 200}, {"error": {"code": "x"}}]

    b = await store.get_batch("t", "batch_0")
    assert b is not None
    b["status"] = "completed"
    assert not await store.save_batch(b, "in_progress")  # someone else moved it on: not overwritten
    assert await store.save_batch(b, "validating")
    assert await store.active() == ["batch_1", "batch_2"]


async def test_one_worker_holds_a_batch(store: BatchStore) -> None:
    await store.create_batch("t", batch("batch_x"), [Item(0, "a", "m", {})])
    assert await store.claim("batch_x", "w1", now=10, until=20)
    assert not await store.claim("batch_x", "w2", now=15, until=25)
    assert await store.claim("batch_x", "w1", now=15, until=25)  # renewed by its holder
    assert await store.claim("batch_x", "w2", now=30, until=40)  # lapsed: taken over
    await store.release("w2")
    assert await store.claim("batch_x", "w3", now=31, until=41)


async def test_an_unreachable_database_is_503() -> None:
    s = BatchStore("sqlite:////proc/no/such/dir/b.db")
    with pytest.raises(ServiceUnavailable, match="batch store is unavailable"):
        await s.start()


async def test_queued_requests_are_sealed_once_and_read_per_tenant(store: BatchStore) -> None:
    from atajo.batches.store import Queued

    def queued(i: int, tenant: str = "t") -> Queued:
        return Queued(f"batchreq_{tenant}{i}", tenant, "k", "/v1/embeddings", "m", {"model": "m", "input": str(i)},
                      100.0 + i)  # fmt: skip

    assert [await store.queue_request(queued(i)) for i in range(3)] == [1, 2, 3]
    assert await store.queue_request(queued(0, "u")) == 1  # another tenant: another collection
    found = {(c.tenant, c.count, c.oldest) for c in await store.collections()}
    assert found == {("t", 3, 100.0), ("u", 1, 100.0)}

    def make(rows: list[Queued]) -> tuple[dict[str, object], StoredFile, bytes]:
        content = b"".join(q.id.encode() + b"\n" for q in rows)
        f = StoredFile(f"file-{rows[0].id}", rows[0].tenant, "batch", "in.jsonl", len(content), 1.0, None)
        return batch(f"batch_{rows[0].id}"), f, content

    assert await store.seal("t", "k", "/v1/embeddings", 2, make) == "batch_batchreq_t0"  # the two oldest
    assert [(i.custom_id, i.body["input"]) for i in await store.items("batch_batchreq_t0")] == [
        ("batchreq_t0", "0"),
        ("batchreq_t1", "1"),
    ]
    assert await store.file_content("t", "file-batchreq_t0") == b"batchreq_t0\nbatchreq_t1\n"
    assert {(c.tenant, c.count) for c in await store.collections()} == {("t", 1), ("u", 1)}

    state = await store.queued("t", "batchreq_t1")
    assert state is not None and state.request.batch_id == "batch_batchreq_t0" and state.request.idx == 1
    assert state.batch_status == "validating" and state.item is not None and state.item.state == "pending"
    waiting = await store.queued("t", "batchreq_t2")
    assert waiting is not None and waiting.request.batch_id is None and waiting.item is None
    assert await store.queued("u", "batchreq_t1") is None  # another tenant's

    assert await store.seal("t", "k", "/v1/embeddings", 5, make) == "batch_batchreq_t2"
    assert await store.seal("t", "k", "/v1/embeddings", 5, make) is None  # nothing left to seal
