"""The deferred lane end to end with the official OpenAI SDK: files and batches through Atajo, run through a
local upstream speaking OpenAI's Batch API, or through the normal pipeline where a deployment has none."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_batch_server import BatchUpstream, answer_for

FAST = {"poll_interval_s": 0.05}


@pytest.fixture
def batch_upstream() -> Iterator[tuple[BatchUpstream, LiveServer]]:
    upstream = BatchUpstream()
    with LiveServer(upstream.app()) as server:
        yield upstream, server


def client(gw: LiveServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def chat_line(custom_id: str, model: str, question: str, url: str = "/v1/chat/completions") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": question}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def wait_for(check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy (the worker runs in the gateway's background)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def finished(c: openai.OpenAI, batch_id: str) -> Any:
    def done() -> Any:
        batch = c.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "expired", "cancelled") else None

    return wait_for(done)


def results(c: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    lines = [orjson.loads(line) for line in c.files.content(file_id).content.splitlines()]
    return {line["custom_id"]: line for line in lines}


def test_batch_through_the_upstream_batch_api(
    gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer], tmp_path: Path
) -> None:
    upstream, up = batch_upstream
    ledger = {"url": f"sqlite:///{tmp_path}/ledger.db", "flush_interval_s": 0.05}
    models = {"mini": openai_model(up.url, model="gpt-4o-mini", batch_api=True)}
    gw = gateway({"models": models, "batches": FAST, "ledger": ledger})
    c = client(gw)
    lines = [
        chat_line("q-paris", "mini", "capital of France?"),
        chat_line("q-lima", "mini", "capital of Peru?"),
        chat_line("q-fail", "mini", "please FAIL"),
        chat_line("q-drop", "mini", "please DROP"),
    ]
    uploaded = c.files.create(file=("questions.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert c.files.retrieve(uploaded.id).filename == "questions.jsonl"
    assert c.files.content(uploaded.id).content == jsonl(lines)

    created = c.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "geo"}
    )
    assert created.status == "validating" and created.metadata == {"job": "geo"}
    assert created.request_counts is not None and created.request_counts.total == 4
    batch = finished(c, created.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)

    # One upstream batch, with our own custom ids and the deployment's model name: the client's ids stay here.
    assert len(upstream.uploads) == 1 and upstream.uploads[0]["purpose"] == "batch"
    sent = upstream.uploads[0]["lines"]
    assert [line["custom_id"] for line in sent] == ["0", "1", "2", "3"]
    assert all(line["body"]["model"] == "gpt-4o-mini" and line["url"] == "/v1/chat/completions" for line in sent)
    assert upstream.polls >= 3

    output = results(c, batch.output_file_id)
    assert set(output) == {"q-paris", "q-lima"}
    for custom_id, question in (("q-paris", "capital of France?"), ("q-lima", "capital of Peru?")):
        response = output[custom_id]["response"]
        assert response["status_code"] == 200 and output[custom_id]["error"] is None
        assert response["body"]["choices"][0]["message"]["content"] == answer_for({"messages": [{"content": question}]})
    errors = results(c, batch.error_file_id)
    assert set(errors) == {"q-fail", "q-drop"}
    assert errors["q-fail"]["response"]["status_code"] == 400
    assert errors["q-drop"]["response"] is None and errors["q-drop"]["error"]["code"] == "batch_completed"

    # gpt-4o-mini: 1000 input tokens at 0.00015 / 1K and 1000 output at 0.0006 / 1K = 750 micros each, half off.
    usage = batch.to_dict()["usage"]
    assert usage["input_tokens"] == 2000 and usage["output_tokens"] == 2000
    assert (usage["sync_cost_micros"], usage["cost_micros"], usage["saved_micros"]) == (1500, 750, 750)
    metrics = _metrics(gw)
    assert 'atajo_batch_saved_micros_total{gen_ai_request_model="mini"} 750.0' in metrics
    assert 'atajo_batch_requests_total{gen_ai_request_model="mini",path="batch_api"} 2.0' in metrics
    with pytest.raises(openai.ConflictError, match="status is completed"):
        c.batches.cancel(batch.id)
    # The ledger has a row per answered request, at the batch price, saved against the synchronous price.
    rows = wait_for(lambda: ledger_rows(tmp_path / "ledger.db", "batching"))
    assert sorted(r["request_id"] for r in rows) == [f"{batch.id}/q-lima", f"{batch.id}/q-paris"]
    assert {(r["cost_micros"], r["baseline_micros"], r["requested_model"]) for r in rows} == {(375, 750, "mini")}


def ledger_rows(path: Path, cause: str) -> list[dict[str, Any]]:
    import sqlite3

    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM atajo_ledger WHERE cause = ?", (cause,))]
    except sqlite3.OperationalError:  # the table is created with the first write
        return []
    finally:
        conn.close()


def _metrics(gw: LiveServer) -> str:
    import urllib.request

    with urllib.request.urlopen(gw.url + "/metrics") as resp:
        return str(resp.read().decode())


def test_deployments_without_a_batch_api_go_through_the_pipeline(
    gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer], openai_upstream: Any
) -> None:
    upstream, up = batch_upstream
    plain, plain_server = openai_upstream
    gw = gateway(
        {
            "models": {
                "batched": openai_model(up.url, model="gpt-4o-mini", batch_api=True),
                "plain": openai_model(plain_server.url),  # a local OpenAI-compatible server: no Batch API
                "sim": {"deployments": [{"provider": "simulated", "simulated": {"ttft_ms": 0, "jitter": 0}}]},
            },
            "batches": {**FAST, "concurrency": 2},
        }
    )
    c = client(gw)
    lines = [chat_line("a", "batched", "one"), chat_line("b", "plain", "two"), chat_line("c", "sim", "three"),
             chat_line("d", "plain", "four")]  # fmt: skip
    file = c.files.create(file=("mixed.jsonl", jsonl(lines)), purpose="batch")
    batch = finished(c, c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id)  # fmt: skip
    assert batch.status == "completed" and batch.error_file_id is None
    output = results(c, batch.output_file_id)
    assert set(output) == {"a", "b", "c", "d"}
    assert output["a"]["response"]["body"]["choices"][0]["message"]["content"] == "batch answer to: one"
    assert output["b"]["response"]["body"]["choices"][0]["message"]["content"] == plain.reply
    assert output["c"]["response"]["body"]["system_fingerprint"] == "atajo-simulated"
    assert [line["body"]["messages"][0]["content"] for line in upstream.uploads[0]["lines"]] == ["one"]
    asked = sorted(r.body["messages"][0]["content"] for r in plain.received)
    assert asked == ["four", "two"]  # the plain deployment got its two requests one by one


def test_embeddings_batch(gateway: GatewayFactory) -> None:
    gw = gateway({"batches": FAST})
    c = client(gw)
    line = {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["a", "b"]}}  # fmt: skip
    file = c.files.create(file=("e.jsonl", jsonl([line])), purpose="batch")
    batch = finished(c, c.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h").id)
    body = results(c, batch.output_file_id)["e1"]["response"]["body"]
    assert body["object"] == "list" and len(body["data"]) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
         b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}}\n{not json\n', "Line 2"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n', "Line 1: 'method'"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n', "Line 1: 'url'"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n',
         "Line 1: "),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
         b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}}\n', "cannot stream"),
        (b"\n\n", "no requests"),
    ],
)  # fmt: skip
def test_malformed_input_files_are_refused_naming_the_line(
    gateway: GatewayFactory, content: bytes, expected: str
) -> None:
    c = client(gateway())
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("bad.jsonl", content), purpose="batch")
    assert expected in err.value.message
    assert err.value.body is not None and isinstance(err.value.body, dict) and err.value.body["param"] == "file"


def test_duplicate_custom_ids_are_refused(gateway: GatewayFactory) -> None:
    c = client(gateway())
    lines = [chat_line("same", "gpt-4o-mini", "a"), chat_line("same", "gpt-4o-mini", "b")]
    with pytest.raises(openai.BadRequestError, match="Line 2: custom_id 'same' is used twice"):
        c.files.create(file=("dup.jsonl", jsonl(lines)), purpose="batch")


def test_batch_creation_errors(gateway: GatewayFactory, openai_upstream: Any) -> None:
    _, up = openai_upstream
    gw = gateway({"models": {"known": openai_model(up.url)}})
    c = client(gw)
    unknown = c.files.create(file=("u.jsonl", jsonl([chat_line("a", "known", "x"), chat_line("b", "nope", "y")])),
                             purpose="batch")  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="Line 2: the model `nope` does not exist"):
        c.batches.create(input_file_id=unknown.id, endpoint="/v1/chat/completions", completion_window="24h")
    chat = c.files.create(file=("c.jsonl", jsonl([chat_line("a", "known", "x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="Line 1: url /v1/chat/completions does not match"):
        c.batches.create(input_file_id=chat.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="'endpoint' must be one of"):
        c.batches.create(input_file_id=chat.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        c.batches.create(input_file_id=chat.id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError, match="No file found"):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError, match="No batch found"):
        c.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("c.jsonl", jsonl([chat_line("a", "known", "x")])), purpose="fine-tune")


def test_tenants_never_see_each_others_files_or_batches(gateway: GatewayFactory) -> None:
    keys = [{"name": "a", "key": "sk-a", "tenant": "alpha"}, {"name": "b", "key": "sk-b", "tenant": "beta"}]
    gw = gateway({"auth": {"keys": keys}, "batches": FAST})
    alpha, beta = client(gw, "sk-a"), client(gw, "sk-b")
    file = alpha.files.create(file=("a.jsonl", jsonl([chat_line("a", "gpt-4o-mini", "secret")])), purpose="batch")
    batch = alpha.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        lambda: beta.files.retrieve(file.id),
        lambda: beta.files.content(file.id),
        lambda: beta.files.delete(file.id),
        lambda: beta.batches.retrieve(batch.id),
        lambda: beta.batches.cancel(batch.id),
        lambda: beta.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert beta.batches.list().data == [] and beta.files.list().data == []
    done = finished(alpha, batch.id)
    assert done.output_file_id is not None
    with pytest.raises(openai.NotFoundError):
        beta.files.content(done.output_file_id)
    assert [b.id for b in alpha.batches.list().data] == [batch.id]
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-wrong").batches.list()


def test_list_pages_newest_first(gateway: GatewayFactory) -> None:
    gw = gateway({"batches": {"poll_interval_s": 60}})
    c = client(gw)
    file = c.files.create(file=("a.jsonl", jsonl([chat_line("a", "gpt-4o-mini", "x")])), purpose="batch")
    ids = [c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h").id
           for _ in range(3)]  # fmt: skip
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == [ids[2], ids[1]] and first.has_more
    second = c.batches.list(limit=2, after=ids[1])
    assert [b.id for b in second.data] == [ids[0]] and not second.has_more
    assert [b.id for b in c.batches.list()] == ids[::-1]  # the SDK's auto-pagination
    deleted = c.files.delete(file.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(file.id)


def test_cancel(gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer]) -> None:
    upstream, up = batch_upstream
    upstream.hold = True  # the upstream batch stays in progress until cancelled
    gw = gateway({"models": {"mini": openai_model(up.url, batch_api=True)}, "batches": FAST})
    c = client(gw)
    file = c.files.create(file=("a.jsonl", jsonl([chat_line("a", "mini", "x"), chat_line("b", "mini", "y")])),
                          purpose="batch")  # fmt: skip
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: upstream.polls >= 2)
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = finished(c, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None and upstream.cancels == 1
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (0, 2)
    assert done.output_file_id is None
    errors = results(c, done.error_file_id)
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"} and set(errors) == {"a", "b"}
    assert c.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing


def test_oversized_file_is_413(gateway: GatewayFactory) -> None:
    c = client(gateway({"batches": {"max_file_bytes": 2048}}))
    lines = [chat_line(f"q{i}", "gpt-4o-mini", "x" * 100) for i in range(40)]
    with pytest.raises(openai.APIStatusError) as err:
        c.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
    assert err.value.status_code == 413


def test_state_survives_a_restart(
    gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer], tmp_path: Path
) -> None:
    upstream, up = batch_upstream
    db = f"sqlite:///{tmp_path}/batches.db"
    models = {"mini": openai_model(up.url, model="gpt-4o-mini", batch_api=True)}
    first = gateway({"models": models, "batches": {"url": db, "poll_interval_s": 3600}})
    c = client(first)
    file = c.files.create(file=("a.jsonl", jsonl([chat_line("k", "mini", "survive?")])), purpose="batch")
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(batch.id).status == "in_progress")
    assert len(upstream.batches) == 1 and upstream.polls == 1  # submitted and read once; the next read is in an hour
    first.stop()

    second = gateway({"models": models, "batches": {"url": db, "poll_interval_s": 0.05}})
    c2 = client(second)
    done = finished(c2, batch.id)
    assert done.status == "completed"
    assert len(upstream.batches) == 1  # resumed polling the same upstream batch, not submitted again
    out = results(c2, done.output_file_id)
    assert out["k"]["response"]["body"]["choices"][0]["message"]["content"] == "batch answer to: survive?"
