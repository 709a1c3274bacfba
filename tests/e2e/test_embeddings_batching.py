"""Embeddings micro-batching end to end, with the OpenAI SDK: concurrent single-string requests to one model
go upstream as list-input calls and every caller gets its own vector (the fake upstream's vectors depend on
the text, so a mix-up would show), its share of usage, and its cache entry; different options, tenants and
switched-off keys or models stay apart; a rejected batch falls back to one call per request."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai

from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
KEY_A, KEY_B, KEY_OFF = "sk-a", "sk-b", "sk-off"


def vector(text: str) -> list[float]:
    return [float(len(text)), float(sum(map(ord, text)) % 997), 1.0]


def config(up: LiveServer, **batch: Any) -> dict[str, Any]:
    return {
        "models": {"emb": openai_model(up.url), "emb-alone": openai_model(up.url)},
        "auth": {
            "keys": [
                {"name": "a", "key": KEY_A, "tenant": "acme"},
                {"name": "b", "key": KEY_B, "tenant": "globex"},
                {"name": "off", "key": KEY_OFF, "tenant": "acme", "coalesce": {"embeddings_batch": False}},
            ]
        },
        "cache": {"tiers": [{"url": "memory://", "ttl_s": 300}]},
        "coalesce": {
            "embeddings_batch": {"max_wait_ms": 100, "max_items": 10, **batch},
            "models": {"emb-alone": {"embeddings_batch": False}},
        },
    }


async def embed_all(gw: LiveServer, texts: list[str], key: str = KEY_A, model: str = "emb", **kw: Any) -> list[Any]:
    """One request per text, all at once. The client's connections are opened first (``GET /v1/models``,
    which never reaches the upstream), so the requests reach the gateway together even on a loaded machine,
    where opening a connection per request could take longer than the batching window."""
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    try:
        await asyncio.gather(*(sdk.models.list() for _ in texts))
        return list(
            await asyncio.gather(
                *(sdk.embeddings.with_raw_response.create(model=model, input=text, **kw) for text in texts)
            )
        )
    finally:
        await sdk.close()


async def test_concurrent_single_strings_go_upstream_as_list_calls_and_each_caller_gets_its_own_vector(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.embed_text = vector
    gw = gateway(config(up))
    texts = [f"document number {i} " + "x" * i for i in range(50)]

    raws = await embed_all(gw, texts)

    for text, raw in zip(texts, raws, strict=True):
        answer = raw.parse()
        assert [d.embedding for d in answer.data] == [vector(text)]
        assert answer.data[0].index == 0
    calls = [r.body["input"] for r in upstream.received]
    assert sorted(t for call in calls for t in call) == sorted(texts)  # every text sent once
    assert all(isinstance(call, list) and len(call) <= 10 for call in calls)
    assert len(calls) < 50
    sizes = [int(raw.headers.get("x-atajo-batch-size", "1")) for raw in raws]
    assert sum(1 for s in sizes if s > 1) >= 50 - len(calls)
    # usage is shared out: the callers' shares add up to what the provider billed
    assert sum(raw.parse().usage.prompt_tokens for raw in raws) == 3 * 50
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(gw.url + "/metrics")).text
    assert f'atajo_coalesce_calls_saved_total{{cause="batching"}} {float(50 - len(calls))}' in metrics
    assert f'atajo_coalesce_batch_size_count{{cause="batching"}} {float(len(calls))}' in metrics
    assert 'atajo_coalesce_added_wait_seconds_count{cause="batching"} 50.0' in metrics
    # each answer was stored under its own request's key
    again = await embed_all(gw, texts[:3])
    assert [raw.headers["x-atajo-cache"] for raw in again] == ["hit-memory"] * 3
    assert len(upstream.received) == len(calls)


async def test_requests_that_differ_in_options_or_tenant_are_never_batched_together(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up))
    await asyncio.gather(
        embed_all(gw, ["a", "b"], key=KEY_A),
        embed_all(gw, ["c", "d"], key=KEY_B),
        embed_all(gw, ["e", "f"], key=KEY_A, dimensions=2),
    )
    groups = sorted(sorted(r.body["input"]) for r in upstream.received)
    assert groups == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [r.body.get("dimensions") for r in upstream.received if "e" in r.body["input"]] == [2]


async def test_a_key_or_model_can_switch_batching_off(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up))
    await embed_all(gw, ["a", "b", "c"], key=KEY_OFF)
    await embed_all(gw, ["d", "e", "f"], model="emb-alone")
    assert sorted(r.body["input"] for r in upstream.received) == ["a", "b", "c", "d", "e", "f"]  # single strings


async def test_a_rejected_batch_falls_back_to_one_call_per_request(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(status=400, message="input 2 is too long"))
    gw = gateway(config(up))
    raws = await embed_all(gw, ["a", "b", "c"])
    assert [len(raw.parse().data) for raw in raws] == [1, 1, 1]
    assert sorted(upstream.received[0].body["input"]) == ["a", "b", "c"]  # one batch, in arrival order
    assert sorted(r.body["input"] for r in upstream.received[1:]) == ["a", "b", "c"]
