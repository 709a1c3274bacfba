"""The cascade with the OpenAI SDK: the cheap model answers first; an answer that fails a check (truncated,
refusal, invalid JSON, low confidence) is asked again of the strong model, and both calls are paid for."""

from __future__ import annotations

from typing import Any

import openai

from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
CHEAP = {"provider": "open", "kind": "chat", "input_per_1k": 0.001, "output_per_1k": 0.002, "context": 8192,
         "capabilities": ["json_mode"], "quality": {"general": 0.7}, "ttft_ms": 100, "tokens_per_s": 100}  # fmt: skip
STRONG = {**CHEAP, "input_per_1k": 0.01, "output_per_1k": 0.02, "quality": {"general": 0.9}}
HI: list[Any] = [{"role": "user", "content": "hi"}]
CHEAP_COST = (11 * 1000 + 7 * 2000) // 1000  # 25, for the upstream's 11 + 7 tokens
STRONG_COST = (11 * 10_000 + 7 * 20_000) // 1000  # 250


def config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "catalog": {"models": {"cheap": CHEAP, "strong": STRONG}},
        "models": {"cheap": openai_model(url, model="cheap"), "strong": openai_model(url, model="strong")},
        "routing": {"models": {"auto": {"cascade": {"enabled": True}}}},
        **extra,
    }


def client(gw: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_a_truncated_answer_escalates_and_both_costs_count(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url, budgets={"limits": [{"scope": "global", "period": "day", "max_cost": 1}]}))
    upstream.fail_next(Fault(finish_reason="length", content="Hello from the"))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=HI)
    answer = raw.parse()
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content == upstream.reply
    assert [r.body["model"] for r in upstream.received] == ["cheap", "strong"]
    assert raw.headers["x-atajo-cascade"] == "escalated; truncated"
    assert raw.headers["x-atajo-model"] == "strong"
    assert raw.headers["x-atajo-route-reason"].startswith("strong: escalated from cheap (truncated)")
    assert int(raw.headers["x-atajo-cost-micros"]) == CHEAP_COST + STRONG_COST
    budgets = gw.gateway.services.budgets
    (line,) = budgets.lines("default", "anonymous")
    assert gw.call(budgets.store.values([line.key])) == (CHEAP_COST + STRONG_COST,)
    metrics = gw.gateway.services.metrics.render().decode()
    assert 'atajo_route_cascade_total{outcome="truncated"} 1.0' in metrics


def test_a_good_cheap_answer_is_kept(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=HI)
    assert [r.body["model"] for r in upstream.received] == ["cheap"]
    assert raw.headers["x-atajo-cascade"] == "kept" and raw.headers["x-atajo-model"] == "cheap"
    assert int(raw.headers["x-atajo-cost-micros"]) == CHEAP_COST


def test_invalid_json_and_refusals_escalate(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    upstream.fail_next(Fault(content="{not json"), Fault(content='{"ok": true}'))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=HI, response_format={"type": "json_object"}
    )
    assert raw.headers["x-atajo-cascade"] == "escalated; invalid_json"
    assert raw.parse().choices[0].message.content == '{"ok": true}'
    upstream.fail_next(Fault(content="I'm sorry, but I can't help with that."))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=HI, user="again")
    assert raw.headers["x-atajo-cascade"] == "escalated; refusal"


def test_a_failed_escalation_serves_the_cheap_answer(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url, retry={"max_retries": 0}))
    upstream.fail_next(Fault(finish_reason="length", content="Hello"), Fault(status=500))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=HI)
    assert raw.parse().choices[0].message.content == "Hello"
    assert raw.headers["x-atajo-cascade"] == "escalation-failed; truncated"
    assert raw.headers["x-atajo-model"] == "cheap"


def test_streams_do_not_cascade(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    list(client(gw).chat.completions.create(model="auto", messages=HI, stream=True))
    assert [r.body["model"] for r in upstream.received] == ["cheap"]
