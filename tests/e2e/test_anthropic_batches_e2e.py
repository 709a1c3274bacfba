"""Batches for models served by Anthropic go through Anthropic's Message Batches API (a local upstream
speaking its wire format), driven with the official OpenAI SDK: OpenAI-shaped output lines under the client's
custom ids, priced at the batch discount, in the ledger with cause batching."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_batches_e2e import FAST, chat_line, client, finished, jsonl, ledger_rows, results, wait_for
from tests.upstreams.anthropic_batch_server import OUTPUT_TOKENS, MessageBatchUpstream
from tests.upstreams.live import LiveServer


@pytest.fixture
def anthropic_batches() -> Iterator[tuple[MessageBatchUpstream, LiveServer]]:
    upstream = MessageBatchUpstream()
    with LiveServer(upstream.app()) as server:
        yield upstream, server


def claude(url: str, **extra: Any) -> dict[str, Any]:
    deployment = {"provider": "anthropic", "base_url": url + "/v1", "api_key": "sk-ant-upstream",
                  "model": "claude-haiku-4-5", **extra}  # fmt: skip
    return {"deployments": [deployment]}


def test_batch_through_anthropic_message_batches(
    gateway: GatewayFactory, anthropic_batches: tuple[MessageBatchUpstream, LiveServer], tmp_path: Path
) -> None:
    upstream, up = anthropic_batches
    ledger = {"url": f"sqlite:///{tmp_path}/ledger.db", "flush_interval_s": 0.05}
    gw = gateway({"models": {"claude": claude(up.url, batch_api=True)}, "batches": FAST, "ledger": ledger})
    c = client(gw)
    as_json = chat_line("q-json", "claude", "where?")
    as_json["body"]["response_format"] = {"type": "json_object"}
    lines = [
        chat_line("q-paris", "claude", "capital of France?"),
        as_json,
        chat_line("q-fail", "claude", "please FAIL"),
        chat_line("q-late", "claude", "please EXPIRE"),
    ]
    file = c.files.create(file=("claude.jsonl", jsonl(lines)), purpose="batch")
    batch = finished(c, c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id)  # fmt: skip
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)

    # One Message Batch, Messages API params under our own custom ids (the JSON-mode one marked).
    assert len(upstream.submitted) == 1 and upstream.received == []  # nothing went through /v1/messages
    sent = upstream.submitted[0]
    assert [r["custom_id"] for r in sent] == ["0", "1_json", "2", "3"]
    assert {r["params"]["model"] for r in sent} == {"claude-haiku-4-5"}
    assert sent[0]["params"]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "capital of France?"}]}
    ]
    assert sent[1]["params"]["tool_choice"]["type"] == "tool"

    output = results(c, batch.output_file_id)
    assert set(output) == {"q-paris", "q-json"}
    paris = output["q-paris"]["response"]
    assert paris["status_code"] == 200 and output["q-paris"]["error"] is None
    assert paris["body"]["object"] == "chat.completion" and paris["body"]["model"] == "claude-haiku-4-5"
    assert paris["body"]["choices"][0]["message"]["content"] == "anthropic batch answer to: capital of France?"
    assert paris["body"]["choices"][0]["finish_reason"] == "stop"
    assert paris["body"]["usage"]["prompt_tokens"] == 10
    assert paris["body"]["usage"]["completion_tokens"] == OUTPUT_TOKENS
    assert json.loads(output["q-json"]["response"]["body"]["choices"][0]["message"]["content"]) == {"city": "Lima"}
    errors = results(c, batch.error_file_id)
    assert set(errors) == {"q-fail", "q-late"}
    assert errors["q-fail"]["response"]["status_code"] == 529
    assert errors["q-fail"]["response"]["body"]["error"]["type"] == "overloaded_error"
    assert errors["q-late"]["response"] is None and errors["q-late"]["error"]["code"] == "batch_expired"

    # claude-haiku-4-5: 10 input tokens at 0.001 / 1K (10 micros) + 1000 output at 0.005 / 1K (5000), half off.
    usage = batch.to_dict()["usage"]
    assert (usage["sync_cost_micros"], usage["cost_micros"], usage["saved_micros"]) == (10020, 5010, 5010)
    rows = wait_for(lambda: ledger_rows(tmp_path / "ledger.db", "batching"))
    assert sorted(r["request_id"] for r in rows) == [f"{batch.id}/q-json", f"{batch.id}/q-paris"]
    assert {(r["cost_micros"], r["baseline_micros"], r["response_model"]) for r in rows} == {
        (2505, 5010, "claude-haiku-4-5")
    }


def test_a_request_anthropic_cannot_take_sends_the_share_through_the_pipeline(
    gateway: GatewayFactory, anthropic_batches: tuple[MessageBatchUpstream, LiveServer]
) -> None:
    upstream, up = anthropic_batches
    gw = gateway({"models": {"claude": claude(up.url, batch_api=True)}, "batches": FAST})
    c = client(gw)
    two = chat_line("q-two", "claude", "twice")
    two["body"]["n"] = 2  # one choice per request is all Anthropic gives
    file = c.files.create(file=("c.jsonl", jsonl([chat_line("q-one", "claude", "once"), two])), purpose="batch")
    batch = finished(c, c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id)  # fmt: skip
    assert upstream.submitted == [] and len(upstream.received) == 1  # q-one answered by /v1/messages
    assert results(c, batch.output_file_id)["q-one"]["response"]["status_code"] == 200
    refused = results(c, batch.error_file_id)["q-two"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "n"


def test_cancel_a_message_batch(
    gateway: GatewayFactory, anthropic_batches: tuple[MessageBatchUpstream, LiveServer]
) -> None:
    upstream, up = anthropic_batches
    upstream.hold = True
    gw = gateway({"models": {"claude": claude(up.url, batch_api=True)}, "batches": FAST})
    c = client(gw)
    file = c.files.create(file=("c.jsonl", jsonl([chat_line("a", "claude", "x")])), purpose="batch")
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: upstream.polls >= 1)
    c.batches.cancel(batch.id)
    done = finished(c, batch.id)
    assert done.status == "cancelled"
    assert results(c, done.error_file_id)["a"]["error"]["code"] == "batch_cancelled"
