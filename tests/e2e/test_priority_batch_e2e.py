"""``x-atajo-priority: batch`` end to end: requests sent with the header through the official OpenAI SDK are
answered 202 with a handle, collected per tenant into one internal batch (closed by count or by time), run
through a local upstream speaking OpenAI's Batch API, and each handle resolves to its own answer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.e2e.test_batches_e2e import FAST, batch_upstream, client, wait_for
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_batch_server import BatchUpstream, answer_for

__all__ = ["batch_upstream"]  # the fixture, shared

BATCH = {"x-atajo-priority": "batch"}


def defer(c: openai.OpenAI, question: str, model: str = "mini", **extra: Any) -> dict[str, Any]:
    """Send a chat request with the header; its 202 handle."""
    raw = c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], extra_headers=BATCH, **extra
    )
    assert raw.status_code == 202
    handle: dict[str, Any] = raw.http_response.json()
    assert raw.headers["location"] == f"/v1/batches/requests/{handle['id']}"
    return handle


def get(gw: LiveServer, request_id: str, key: str = "unused") -> httpx.Response:
    return httpx.get(f"{gw.url}/v1/batches/requests/{request_id}", headers={"authorization": f"Bearer {key}"})


def resolved(gw: LiveServer, request_id: str, key: str = "unused") -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        handle: dict[str, Any] = get(gw, request_id, key).json()
        return handle if handle["status"] not in ("queued", "in_progress") else None

    result: dict[str, Any] = wait_for(done)
    return result


def test_requests_with_the_header_become_one_upstream_batch(
    gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer]
) -> None:
    upstream, up = batch_upstream
    models = {"mini": openai_model(up.url, model="gpt-4o-mini", batch_api=True)}
    gw = gateway({"models": models, "batches": {**FAST, "collect_max": 3, "collect_window_s": 3600}})
    c = client(gw)
    questions = ["capital of France?", "capital of Peru?", "capital of Chile?"]
    handles = [defer(c, q) for q in questions]
    assert {(h["object"], h["status"], h["batch_id"], h["model"]) for h in handles} == {
        ("batch.request", "queued", None, "mini")
    }
    assert len({h["id"] for h in handles}) == 3 and all(h["id"].startswith("batchreq_") for h in handles)

    # The third filled the collection (collect_max 3): one batch, one upstream batch of three lines.
    answers = [resolved(gw, h["id"]) for h in handles]
    assert len(upstream.uploads) == 1
    assert [line["body"]["messages"][0]["content"] for line in upstream.uploads[0]["lines"]] == questions
    for question, answer in zip(questions, answers, strict=True):
        assert answer["status"] == "completed" and answer["error"] is None
        assert answer["response"]["status_code"] == 200
        content = answer["response"]["body"]["choices"][0]["message"]["content"]
        assert content == answer_for({"messages": [{"content": question}]})
    assert len({a["batch_id"] for a in answers}) == 1

    # The internal batch is the tenant's like any other, its input file the queued requests.
    batch = c.batches.retrieve(answers[0]["batch_id"])
    assert batch.status == "completed" and batch.metadata == {"source": "x-atajo-priority: batch"}
    assert batch.request_counts is not None and batch.request_counts.completed == 3
    output = c.files.content(batch.output_file_id or "").text
    assert all(h["id"] in output for h in handles)

    # A fourth request opens a new collection that stays queued: its window is an hour.
    fourth = defer(c, "capital of Spain?")
    time.sleep(0.3)  # several collector passes (poll_interval_s 0.05): it must still wait
    assert get(gw, fourth["id"]).json()["status"] == "queued" and len(upstream.uploads) == 1


def test_the_window_closes_by_time(gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer]) -> None:
    upstream, up = batch_upstream
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    models = {"mini": openai_model(up.url, model="gpt-4o-mini", batch_api=True)}
    gw = gateway({"models": models, "batches": {**FAST, "collect_window_s": 60}}, wall_clock=clock)
    c = client(gw)
    first, second = defer(c, "one"), defer(c, "two")
    time.sleep(0.3)
    assert get(gw, first["id"]).json()["status"] == "queued" and upstream.uploads == []
    offset[0] = 61.0  # the window (opened by the first request) is over
    done = [resolved(gw, h["id"]) for h in (first, second)]
    assert [d["status"] for d in done] == ["completed", "completed"]
    assert [d["response"]["body"]["choices"][0]["message"]["content"] for d in done] == [
        "batch answer to: one",
        "batch answer to: two",
    ]
    assert len(upstream.uploads) == 1 and len(upstream.uploads[0]["lines"]) == 2


def test_refusals_and_tenancy(gateway: GatewayFactory) -> None:
    keys = [{"name": "a", "key": "sk-a", "tenant": "alpha"}, {"name": "b", "key": "sk-b", "tenant": "beta"}]
    models = {"sim": {"deployments": [{"provider": "simulated", "simulated": {"ttft_ms": 0, "jitter": 0}}]}}
    gw = gateway({"auth": {"keys": keys}, "models": models, "batches": {**FAST, "collect_window_s": 3600}})
    alpha, beta = client(gw, "sk-a"), client(gw, "sk-b")
    with pytest.raises(openai.BadRequestError, match="cannot stream") as err:
        alpha.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], stream=True, extra_headers=BATCH
        )
    assert err.value.param == "stream"
    with pytest.raises(openai.NotFoundError, match="model `nope`"):
        alpha.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], extra_headers=BATCH)
    with pytest.raises(openai.BadRequestError):  # the body is checked as without the header
        alpha.chat.completions.create(model="sim", messages=[], extra_headers=BATCH)
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-wrong").chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], extra_headers=BATCH
        )

    handle = defer(alpha, "secret", model="sim")
    assert get(gw, handle["id"], "sk-a").json()["status"] == "queued"
    for key, request_id in (("sk-b", handle["id"]), ("sk-a", "batchreq_nope")):
        missing = get(gw, request_id, key)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"
    assert get(gw, handle["id"], "sk-wrong").status_code == 401
    assert beta.batches.list().data == []


def test_embeddings_with_the_header_through_the_pipeline(gateway: GatewayFactory) -> None:
    gw = gateway({"batches": {**FAST, "collect_max": 1}})
    c = client(gw)
    raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"], extra_headers=BATCH)
    assert raw.status_code == 202
    handle = raw.http_response.json()
    assert handle["endpoint"] == "/v1/embeddings"
    done = resolved(gw, handle["id"])
    assert done["status"] == "completed" and len(done["response"]["body"]["data"]) == 2


def test_queued_requests_survive_a_restart(
    gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer], tmp_path: Path
) -> None:
    upstream, up = batch_upstream
    db = f"sqlite:///{tmp_path}/batches.db"
    models = {"mini": openai_model(up.url, model="gpt-4o-mini", batch_api=True)}
    first = gateway({"models": models, "batches": {**FAST, "url": db, "collect_window_s": 3600}})
    handle = defer(client(first), "still there?")
    first.stop()
    assert upstream.uploads == []

    second = gateway({"models": models, "batches": {**FAST, "url": db, "collect_window_s": 0.01}})
    done = resolved(second, handle["id"])
    assert done["status"] == "completed"
    assert done["response"]["body"]["choices"][0]["message"]["content"] == "batch answer to: still there?"


def test_cancelling_the_internal_batch_cancels_its_requests(
    gateway: GatewayFactory, batch_upstream: tuple[BatchUpstream, LiveServer]
) -> None:
    upstream, up = batch_upstream
    upstream.hold = True  # the upstream batch stays in progress until cancelled
    models = {"mini": openai_model(up.url, model="gpt-4o-mini", batch_api=True)}
    gw = gateway({"models": models, "batches": {**FAST, "collect_max": 1}})
    c = client(gw)
    handle = defer(c, "never mind")
    batch_id = wait_for(lambda: get(gw, handle["id"]).json()["batch_id"])
    wait_for(lambda: upstream.polls >= 1)
    assert get(gw, handle["id"]).json()["status"] == "in_progress"
    c.batches.cancel(batch_id)
    done = resolved(gw, handle["id"])
    assert done["status"] == "cancelled" and done["error"]["code"] == "batch_cancelled" and done["response"] is None
