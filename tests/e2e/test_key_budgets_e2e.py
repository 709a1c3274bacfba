"""A virtual key's own budget (``budget_micros``: money per calendar month) end to end with the OpenAI SDK: keys
created through the admin API, held to their budget by the same reservations and settlements as configured
budgets, so concurrent requests cannot overspend.

As in ``test_budgets_e2e``, a request with ``max_tokens: 7`` to ``meter`` reserves and costs exactly 7,000."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_budgets_e2e import HI, Upstream, config
from tests.upstreams.live import LiveServer

MASTER = "sk-master-key-budgets"


def start(gateway: GatewayFactory, upstream: Upstream) -> LiveServer:
    return gateway(config(upstream[1].url, {}, auth={"master_key": MASTER}))


def create_key(gw: LiveServer, **fields: Any) -> tuple[str, str]:
    created = httpx.post(
        gw.url + "/admin/keys", json={"tenant": "acme", **fields}, headers={"authorization": f"Bearer {MASTER}"}
    )
    assert created.status_code == 201, created.text
    return created.json()["key"], created.json()["id"]


async def race(url: str, secret: str, n: int) -> tuple[list[int], list[dict[str, Any]], list[Any]]:
    """``n`` requests at once with one key: (costs of the answers, refusals' bodies, other errors)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)

    async def one() -> tuple[str, Any]:
        try:
            raw = await client.chat.completions.with_raw_response.create(model="meter", messages=HI, max_tokens=7)
        except openai.RateLimitError as err:
            return "refused", err.body
        except openai.APIStatusError as err:
            return "error", err.body
        return "ok", int(raw.headers["x-atajo-cost-micros"])

    try:
        outcomes = await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()
    return ([v for what, v in outcomes if what == "ok"], [v for what, v in outcomes if what == "refused"],
            [v for what, v in outcomes if what == "error"])  # fmt: skip


def spent(gw: LiveServer, key_id: str, budget_micros: int) -> int:
    budgets = gw.gateway.services.budgets
    (line,) = budgets.lines("acme", key_id, budget_micros)
    gw.call(asyncio.sleep(0))  # let the settlements scheduled by the last answers run
    (value,) = gw.call(budgets.store.values([line.key]))
    return value


def test_a_key_is_answered_until_its_budget_is_spent(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    gw = start(gateway, openai_upstream)
    secret, key_id = create_key(gw, budget_micros=21_000)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="meter", messages=HI, max_tokens=7)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="meter", messages=HI, max_tokens=7)
    assert caught.value.status_code == 429
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "insufficient_quota" and caught.value.body["code"] == "budget_exceeded"
    message = caught.value.body["message"]
    assert f"Budget `key:{key_id}/month` would be exceeded: 0.021000 USD of 0.021000 USD" in message
    assert "this month" in message
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert len(openai_upstream[0].received) == 3
    assert spent(gw, key_id, 21_000) == 21_000
    metrics = gw.gateway.services.metrics.render().decode()
    assert f'atajo_budget_rejections_total{{budget="key:{key_id}/month"}} 1.0' in metrics


def test_twenty_requests_race_for_a_key_budget_that_fits_five(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    gw = start(gateway, openai_upstream)
    secret, key_id = create_key(gw, budget_micros=35_000)
    costs, refused, errors = asyncio.run(race(gw.url, secret, 20))
    assert errors == []
    assert len(costs) == 5 and len(refused) == 15
    for body in refused:
        assert body["code"] == "budget_exceeded" and f"key:{key_id}/month" in body["message"], body
    assert sum(costs) == 35_000
    assert len(openai_upstream[0].received) == 5
    assert spent(gw, key_id, 35_000) == 35_000


def test_a_key_without_a_budget_is_unaffected(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    gw = start(gateway, openai_upstream)
    budgeted, _ = create_key(gw, budget_micros=7_000)
    costs, refused, _ = asyncio.run(race(gw.url, budgeted, 3))
    assert len(costs) == 1 and len(refused) == 2  # the budgeted key (same tenant) is spent
    secret, key_id = create_key(gw)
    costs, refused, errors = asyncio.run(race(gw.url, secret, 20))
    assert len(costs) == 20 and refused == [] and errors == []
    assert gw.gateway.services.budgets.lines("acme", key_id) == []  # no budget configured: no counter at all
