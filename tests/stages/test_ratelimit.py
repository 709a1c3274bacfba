"""The rate-limit stage in a running gateway (injected clock, in-process storage), with the openai SDK."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.doubles import FakeClock
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import OpenAIUpstream

MASTER = "sk-rl-master"
KEY = "sk-rl-key"
OTHER = "sk-rl-other"
BODY: dict[str, Any] = {"model": "fast", "messages": [{"role": "user", "content": "hello there"}]}


def _config(upstream_url: str, limits: dict[str, Any], **auth: Any) -> dict[str, Any]:
    keys = [
        {"name": "a", "key": KEY, "tenant": "acme", **auth},
        {"name": "b", "key": OTHER, "tenant": "acme"},
    ]
    return {
        "models": {"fast": openai_model(upstream_url)},
        "auth": {"master_key": MASTER, "keys": keys},
        "limits": limits,
    }


def _post(url: str, key: str = KEY, **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}
    return httpx.post(url + "/v1/chat/completions", json={**BODY, **extra}, headers=headers)


@pytest.fixture
def upstream(openai_upstream: tuple[OpenAIUpstream, LiveServer]) -> str:
    return openai_upstream[1].url


def test_requests_per_minute_with_headers_and_retry_after(gateway: GatewayFactory, upstream: str) -> None:
    clock = FakeClock()
    limits = {"keys": {"rpm": 3, "adaptive": False}}
    gw = gateway(_config(upstream, limits), clock=clock)
    answers = [_post(gw.url) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[2].headers["x-ratelimit-reset-requests"] == "1m0s"
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**BODY)
    resp = caught.value.response
    assert resp.headers["retry-after"] == "20"  # one request every 20 s
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    error = resp.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert "key 'a'" in error["message"] and KEY not in error["message"]
    assert _post(gw.url, OTHER).status_code == 200  # another key: its own bucket
    clock.advance(20)
    assert _post(gw.url).status_code == 200
    assert _post(gw.url).status_code == 429
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'atajo_ratelimit_decisions_total{outcome="rejected",scope="key"} 2.0' in metrics


def test_a_tenant_limit_is_shared_by_its_keys(gateway: GatewayFactory, upstream: str) -> None:
    gw = gateway(_config(upstream, {"tenants": {"acme": {"rpm": 2, "adaptive": False}}}), clock=FakeClock())
    assert [_post(gw.url, k).status_code for k in (KEY, OTHER, KEY, OTHER)] == [200, 200, 429, 429]
    assert "tenant 'acme'" in _post(gw.url).json()["error"]["message"]


def test_tokens_are_reserved_then_settled_to_the_usage(gateway: GatewayFactory, upstream: str) -> None:
    clock = FakeClock()
    gw = gateway(_config(upstream, {"keys": {"tpm": 1000, "adaptive": False}}), clock=clock)
    # the estimate: 11 characters ≈ 3 tokens + 4 per message, plus max_tokens 500: 507 reserved
    first = _post(gw.url, max_tokens=500)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "493"
    # the upstream reported 18 tokens: 489 were given back, so 507 fit again, and again
    second = _post(gw.url, max_tokens=500)
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-tokens"] == "475"
    third = _post(gw.url, max_tokens=500)
    assert third.status_code == 200
    too_big = _post(gw.url, max_tokens=5000)
    assert too_big.status_code == 429 and "Request too large" in too_big.json()["error"]["message"]


def test_cache_hits_count_as_requests_but_spend_no_tokens(gateway: GatewayFactory, upstream: str) -> None:
    config = _config(upstream, {"keys": {"rpm": 10, "tpm": 1000, "adaptive": False}})
    config["cache"] = {"tiers": [{"url": "memory://", "ttl_s": 60}]}
    gw = gateway(config, clock=FakeClock())
    miss = _post(gw.url, max_tokens=100)
    assert miss.headers["x-atajo-cache"] == "miss"
    hits = []
    for _ in range(50):  # the entry is written behind the response
        hit = _post(gw.url, max_tokens=100)
        hits.append(hit)
        if hit.headers["x-atajo-cache"].startswith("hit"):
            break
    assert hit.headers["x-atajo-cache"].startswith("hit")
    assert hit.headers["x-ratelimit-remaining-requests"] == str(10 - 1 - len(hits))
    after = _post(gw.url, max_tokens=100)
    # only the miss spent tokens (18); every hit's reservation was given back
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - 18 - 107


def test_shadow_mode_rejects_nothing_but_counts(gateway: GatewayFactory, upstream: str) -> None:
    gw = gateway(_config(upstream, {"shadow": True, "keys": {"rpm": 1, "adaptive": False}}), clock=FakeClock())
    assert [_post(gw.url).status_code for _ in range(3)] == [200, 200, 200]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'atajo_ratelimit_decisions_total{outcome="shadow_rejected",scope="key"} 2.0' in metrics


def test_a_key_may_use_only_its_models(gateway: GatewayFactory, upstream: str) -> None:
    config = _config(upstream, {}, models=["other"])
    config["models"]["other"] = openai_model(upstream)
    gw = gateway(config)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(**BODY)
    assert caught.value.response.json()["error"]["code"] == "model_not_allowed"
    assert client.chat.completions.create(**{**BODY, "model": "other"}).choices


def test_streams_settle_their_tokens_when_they_end(gateway: GatewayFactory, upstream: str) -> None:
    gw = gateway(_config(upstream, {"keys": {"tpm": 1000, "adaptive": False}}), clock=FakeClock())
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with client.chat.completions.with_streaming_response.create(**BODY, stream=True, max_tokens=500) as raw:
        assert raw.headers["x-ratelimit-remaining-tokens"] == "493"
        for _ in raw.parse():
            pass
    assert _post(gw.url, max_tokens=500).headers["x-ratelimit-remaining-tokens"] == "475"


def test_the_stage_joins_only_when_something_could_limit() -> None:
    from atajo.app import can_limit
    from atajo.settings import Settings

    assert not can_limit(Settings())
    assert can_limit(Settings.model_validate({"limits": {"gateway": {"tpm": 5}}}))
    assert can_limit(Settings.model_validate({"auth": {"keys": [{"name": "a", "key": "k", "models": ["m"]}]}}))
    assert can_limit(Settings.model_validate({"auth": {"master_key": "m"}}))  # virtual keys may carry limits
    assert not can_limit(Settings.model_validate({"auth": {"master_key": "m", "store": "off"}}))
