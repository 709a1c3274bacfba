"""Budgets end to end with the OpenAI SDK: reserved before the call, reconciled after it, so concurrent requests
cannot overspend, in one process and across two instances sharing Redis.

The model ``meter`` costs nothing per input token and 1.0 per 1K output tokens (1,000 micro-units a token);
with ``max_tokens: 7`` a request reserves exactly 7,000 and the local upstream answers 7 completion tokens,
so a budget of 0.07 fits exactly ten requests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.cache.conftest import need_server
from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
METER = {"provider": "open", "kind": "chat", "input_per_1k": 0, "output_per_1k": 1.0, "context": 8192,
         "ttft_ms": 100, "tokens_per_s": 100}  # fmt: skip
HI: list[Any] = [{"role": "user", "content": "hi"}]


def config(url: str, budgets: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "catalog": {"models": {"meter": METER}},
        "models": {"meter": openai_model(url, model="meter")},
        "budgets": budgets,
        **extra,
    }


async def race(urls: list[str], n: int) -> tuple[int, int, list[int], list[dict[str, Any]]]:
    """``n`` requests at once, spread over the gateways: (successes, budget refusals, costs, other errors)."""
    clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) for url in urls]

    async def one(i: int) -> tuple[str, Any]:
        try:
            raw = await clients[i % len(clients)].chat.completions.with_raw_response.create(
                model="meter", messages=HI, max_tokens=7
            )
        except openai.RateLimitError as err:
            return "refused", err.body
        except openai.APIStatusError as err:
            return "error", err.body
        return "ok", int(raw.headers["x-atajo-cost-micros"])

    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients:
            await c.close()
    ok = [v for what, v in outcomes if what == "ok"]
    refused = [v for what, v in outcomes if what == "refused"]
    for body in refused:
        assert body["code"] == "budget_exceeded" and "global/day" in body["message"], body
    return len(ok), len(refused), ok, [v for what, v in outcomes if what == "error"]


def test_fifty_requests_race_for_a_budget_that_fits_ten(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up.url, {"limits": [{"scope": "global", "period": "day", "max_cost": 0.07}]}))
    ok, refused, costs, errors = asyncio.run(race([gw.url], 50))
    assert errors == []
    assert ok == 10 and refused == 40
    assert sum(costs) == 70_000
    assert len(upstream.received) == 10  # refused requests never reached the provider
    budgets = gw.gateway.services.budgets
    (line,) = budgets.lines("default", "anonymous")
    gw.call(asyncio.sleep(0))  # let the settlements scheduled by the last answers run
    (spent,) = gw.call(budgets.store.values([line.key]))
    assert spent == 70_000 <= line.limit


def test_reservation_is_reconciled_with_the_actual_cost(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    # max_tokens 100 reserves 100,000; the answer uses 7 tokens (7,000): the rest is given back after the call.
    gw = gateway(config(up.url, {"limits": [{"scope": "global", "period": "day", "max_cost": 0.12}]}))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="meter", messages=HI, max_tokens=100)
    budgets = gw.gateway.services.budgets
    (line,) = budgets.lines("default", "anonymous")
    assert gw.call(budgets.store.values([line.key])) == (21_000,)
    # Now only 99,000 are left: a request that may use 100 tokens (100,000) is refused, naming the budget.
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="meter", messages=HI, max_tokens=100)
    assert caught.value.status_code == 429
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "insufficient_quota" and caught.value.body["code"] == "budget_exceeded"
    assert "Budget `global/day` would be exceeded: 0.021000 USD of 0.120000 USD" in caught.value.body["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert len(upstream.received) == 3


def test_per_key_tokens_budget_and_soft_alert(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    _, up = openai_upstream
    keys = [{"name": "a", "key": "sk-a"}, {"name": "b", "key": "sk-b"}]
    limits = [{"scope": "key", "period": "month", "max_tokens": 100, "alert_at": 0.5}]
    gw = gateway(config(up.url, {"limits": limits}, auth={"keys": keys}))
    a = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-a", max_retries=0)
    b = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-b", max_retries=0)
    # Each call reserves its input tokens plus max_tokens 30 and settles at 11 + 7 = 18 tokens.
    first = a.chat.completions.with_raw_response.create(model="meter", messages=HI, max_tokens=30)
    assert "x-atajo-budget-warning" not in first.headers
    for _ in range(2):
        a.chat.completions.create(model="meter", messages=HI, max_tokens=30)
    warned = a.chat.completions.with_raw_response.create(model="meter", messages=HI, max_tokens=30)
    assert warned.headers["x-atajo-budget-warning"].startswith("key:a/month tokens at")
    # 4 x 18 = 72 tokens used; the next one may need 8 + 30 more: past 100
    with pytest.raises(openai.RateLimitError, match="key:a/month"):
        a.chat.completions.create(model="meter", messages=HI, max_tokens=30)
    b.chat.completions.create(model="meter", messages=HI, max_tokens=30)  # b has its own budget
    metrics = gw.gateway.services.metrics.render().decode()
    assert 'atajo_budget_alerts_total{budget="key:a/month"} 1.0' in metrics
    assert 'atajo_budget_rejections_total{budget="key:a/month"} 1.0' in metrics
    assert 'atajo_budget_used_ratio{budget="key:b/month",unit="tokens"}' in metrics


@pytest.fixture
def redis_budgets() -> Iterator[dict[str, Any]]:
    need_server("Redis", "127.0.0.1", 6379)
    prefix = f"atajo:test:budget:{uuid.uuid4().hex}:"
    yield {"store": "redis://127.0.0.1:6379/0", "redis_prefix": prefix}

    async def drop() -> None:
        from redis.asyncio import Redis

        client = Redis.from_url("redis://127.0.0.1:6379/0")
        keys = [k async for k in client.scan_iter(prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    asyncio.run(drop())


def test_two_instances_share_a_budget_through_redis(
    gateway: GatewayFactory, openai_upstream: Upstream, redis_budgets: dict[str, Any]
) -> None:
    upstream, up = openai_upstream
    budgets = {**redis_budgets, "limits": [{"scope": "global", "period": "day", "max_cost": 0.07}]}
    one, two = gateway(config(up.url, budgets)), gateway(config(up.url, budgets))
    ok, refused, costs, errors = asyncio.run(race([one.url, two.url], 50))
    assert errors == []
    assert ok == 10 and refused == 40
    assert sum(costs) == 70_000
    assert len(upstream.received) == 10
    store = one.gateway.services.budgets
    (line,) = store.lines("default", "anonymous")
    assert one.call(store.store.values([line.key])) == (70_000,)


def test_redis_down_rejects_or_lets_through_as_configured(
    gateway: GatewayFactory, openai_upstream: Upstream, closed_port: int
) -> None:
    upstream, up = openai_upstream
    limits = [{"scope": "global", "period": "day", "max_cost": 1}]
    down = {"store": f"redis://127.0.0.1:{closed_port}/0", "limits": limits, "timeout_s": 0.2}
    gw = gateway(config(up.url, down))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="meter", messages=HI, max_tokens=7)
    assert caught.value.status_code == 503 and "Budgets cannot be checked" in caught.value.message
    assert upstream.received == []
    open_gw = gateway(config(up.url, {**down, "on_store_error": "allow"}))
    client = openai.OpenAI(base_url=open_gw.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="meter", messages=HI, max_tokens=7)
    assert len(upstream.received) == 1
    metrics = open_gw.gateway.services.metrics.render().decode()
    assert 'atajo_budget_store_errors_total{operation="reserve"} 1.0' in metrics
