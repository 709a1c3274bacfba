"""Routing with the official OpenAI SDK against a local OpenAI-format upstream: ``model: auto`` becomes the
cheapest configured model meeting the request's constraints, and the answer says which and why.

The catalog is overridden from config with three made-up models, so prices and capabilities are known here:
``tiny`` (cheapest, no tools), ``small`` (tools, json mode), ``large`` (dearest, best).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]

CATALOG: dict[str, Any] = {
    "models": {
        "tiny": {"provider": "open", "kind": "chat", "input_per_1k": 0.0001, "output_per_1k": 0.0001, "context": 8192,
                 "capabilities": [], "quality": {"general": 0.7, "code": 0.6}, "ttft_ms": 200, "tokens_per_s": 100},
        "small": {"provider": "open", "kind": "chat", "input_per_1k": 0.0002, "output_per_1k": 0.0004,
                  "context": 8192, "capabilities": ["tools", "json_mode"], "quality": {"general": 0.8, "code": 0.8},
                  "ttft_ms": 300, "tokens_per_s": 100},
        "large": {"provider": "open", "kind": "chat", "input_per_1k": 0.002, "output_per_1k": 0.008, "context": 8192,
                  "capabilities": ["tools", "json_mode", "vision"], "quality": {"general": 0.9, "code": 0.92},
                  "ttft_ms": 800, "tokens_per_s": 50},
    }
}  # fmt: skip
HI: list[Any] = [{"role": "user", "content": "hi"}]
CODE: list[Any] = [{"role": "user", "content": "Write a Python function that reverses a linked list."}]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
]


def config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "catalog": CATALOG,
        "models": {name: openai_model(url, model=name) for name in ("tiny", "small", "large")},
        **extra,
    }


def client(gw: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_auto_picks_the_cheapest_candidate(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=HI)
    assert raw.parse().choices[0].message.content == upstream.reply
    assert upstream.received[-1].body["model"] == "tiny"
    assert raw.headers["x-atajo-model"] == "tiny"
    assert raw.headers["x-atajo-route-reason"].startswith("tiny: cheapest of 3 eligible")
    # 1 input-ish token count and a typical 300-token answer at 0.0001 / 1K: tens of micro-units
    estimate = int(raw.headers["x-atajo-cost-estimate-micros"])
    assert 30 <= estimate < 100
    # the upstream reports 11 + 7 tokens: (11 * 100 + 7 * 100) // 1000 = 1
    assert raw.headers["x-atajo-cost-micros"] == "1"
    assert "auto" in [m.id for m in client(gw).models.list()]


def test_tools_exclude_models_without_them(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=HI, tools=TOOLS)
    assert upstream.received[-1].body["model"] == "small"
    assert "tiny: no tools" in raw.headers["x-atajo-route-reason"]


def test_json_mode_is_a_required_capability(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    client(gw).chat.completions.create(model="auto", messages=HI, response_format={"type": "json_object"})
    assert upstream.received[-1].body["model"] == "small"


def test_code_wants_a_strong_model_and_a_tight_cost_cap_picks_a_cheaper_one(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=CODE)
    assert upstream.received[-1].body["model"] == "large"  # code wants quality >= 0.88: only large has it
    assert "quality>=0.88" in raw.headers["x-atajo-route-reason"]
    large_estimate = int(raw.headers["x-atajo-cost-estimate-micros"])
    # A cap under large's estimate: the best model within it is chosen instead, and the reason says so.
    cap = f"{(large_estimate - 1) / 1e6:.6f}"
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=CODE, extra_headers={"x-atajo-max-cost": cap}
    )
    assert upstream.received[-1].body["model"] == "small"
    reason = raw.headers["x-atajo-route-reason"]
    assert reason.startswith("small: best quality (0.8)") and "large: cost" in reason
    assert int(raw.headers["x-atajo-cost-estimate-micros"]) < large_estimate


def test_a_cost_cap_nothing_meets_is_rejected_naming_the_header(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(model="auto", messages=HI, extra_headers={"x-atajo-max-cost": "0.000001"})
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "no_model_meets_constraints"
    assert error["param"] == "x-atajo-max-cost"
    assert "x-atajo-max-cost" in error["message"]
    assert upstream.received == []
    # A model named directly is held to the cap too.
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(model="large", messages=HI, extra_headers={"x-atajo-max-cost": "0.0001"})
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "x-atajo-max-cost"
    assert upstream.received == []
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(model="auto", messages=HI, extra_headers={"x-atajo-max-cost": "cheap"})
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "x-atajo-max-cost"


def test_latency_and_quality_headers(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    client(gw).chat.completions.create(model="auto", messages=HI, extra_headers={"x-atajo-min-quality": "0.75"})
    assert upstream.received[-1].body["model"] == "small"
    # large: 800 ms + 300 tokens at 50/s = 6.8 s; small: 0.3 + 3 s
    client(gw).chat.completions.create(
        model="auto", messages=HI, extra_headers={"x-atajo-min-quality": "0.85", "x-atajo-max-latency-ms": "10000"}
    )
    assert upstream.received[-1].body["model"] == "large"
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(
            model="auto", messages=HI, extra_headers={"x-atajo-min-quality": "0.85", "x-atajo-max-latency-ms": "5000"}
        )
    error = caught.value.body
    assert isinstance(error, dict) and "large: latency" in error["message"]
    assert error["param"] in ("x-atajo-max-latency-ms", "x-atajo-min-quality")


def test_key_defaults_apply_and_headers_win(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    keys = [{"name": "picky", "key": "sk-picky", "route": {"min_quality": 0.85}}]
    gw = gateway(config(up.url, auth={"keys": keys}))
    picky = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-picky", max_retries=0)
    picky.chat.completions.create(model="auto", messages=HI)
    assert upstream.received[-1].body["model"] == "large"
    picky.chat.completions.create(model="auto", messages=HI, extra_headers={"x-atajo-min-quality": "0"})
    assert upstream.received[-1].body["model"] == "tiny"


def test_an_open_breaker_excludes_its_model(
    gateway: GatewayFactory, openai_upstream: Upstream, closed_port: int
) -> None:
    upstream, up = openai_upstream
    cfg = config(up.url, breaker={"failure_threshold": 1, "cooldown_s": 600}, retry={"max_retries": 0})
    cfg["models"]["large"] = openai_model(f"http://127.0.0.1:{closed_port}", model="large")
    gw = gateway(cfg)
    with pytest.raises(openai.APIStatusError):
        client(gw).chat.completions.create(model="large", messages=HI)  # refused: large's circuit opens
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=CODE)
    assert upstream.received[-1].body["model"] == "small"
    assert "large: circuit open" in raw.headers["x-atajo-route-reason"]
    # Only large meets x-atajo-min-quality 0.85, and it is down: 503, not a 400 about the request.
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw).chat.completions.create(model="auto", messages=HI, extra_headers={"x-atajo-min-quality": "0.85"})
    assert caught.value.status_code == 400  # quality excluded tiny and small: that is the binding constraint
    cfg_only_large = config(up.url, breaker={"failure_threshold": 1, "cooldown_s": 600}, retry={"max_retries": 0})
    cfg_only_large["models"]["large"] = openai_model(f"http://127.0.0.1:{closed_port}", model="large")
    cfg_only_large["routing"] = {"models": {"auto": {"candidates": ["large"]}}}
    gw2 = gateway(cfg_only_large)
    with pytest.raises(openai.APIStatusError):
        client(gw2).chat.completions.create(model="large", messages=HI)
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw2).chat.completions.create(model="auto", messages=HI)
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "no_healthy_model"


def test_streams_are_routed_too(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url))
    chunks = list(client(gw).chat.completions.create(model="auto", messages=HI, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == upstream.reply
    assert upstream.received[-1].body["model"] == "tiny"


def test_a_bad_catalog_override_names_the_field(gateway: GatewayFactory) -> None:
    from atajo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"catalog\.models\.gpt-4o\.input_per_1k: must be a number"):
        gateway({"catalog": {"models": {"gpt-4o": {"input_per_1k": "cheap"}}}})
