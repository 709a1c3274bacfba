"""Two gateway instances sharing a pgvector store and a Redis tier: a question answered through one is a
semantic hit through the other, and an invalidation through either reaches both (OpenAI SDK, real model,
real Redis and PostgreSQL with pgvector)."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import openai

from tests.cache.conftest import REDIS_URL, need_server
from tests.cache.semantic.conftest import PgVectorServer
from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import OpenAIUpstream

MASTER = "sk-master-test"
KEY = "sk-shared-semantic"


def ask(gw: LiveServer, text: str) -> Any:
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    return sdk.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": text}])


def drain(gw: LiveServer) -> None:
    cache = gw.gateway.services.cache
    assert cache is not None and cache.semantic is not None
    gw.call(cache.chain.drain())
    gw.call(cache.semantic.drain())


def test_instances_share_semantic_entries_and_their_invalidation(
    gateway: GatewayFactory,
    openai_upstream: tuple[OpenAIUpstream, LiveServer],
    pgvector_server: PgVectorServer,
    embedder: object,
) -> None:
    need_server("Redis", "127.0.0.1", 6379)
    upstream, up = openai_upstream
    tenant = f"t{secrets.token_hex(4)}"  # this run's entries only, in the shared Redis and table
    config = {
        "models": {"fast": openai_model(up.url)},
        "auth": {"master_key": MASTER, "keys": [{"name": "k", "key": KEY, "tenant": tenant}]},
        "cache": {
            "tiers": [{"url": "memory://", "ttl_s": 300}, {"url": REDIS_URL, "ttl_s": 600}],
            "semantic": {
                "enabled": True,
                "store": pgvector_server.url,
            },
        },
    }
    one, two = gateway(config), gateway(config)
    try:
        upstream.reply = "Use the reset link."
        assert ask(one, "How do I reset my password?").headers["x-atajo-cache"] == "miss"
        drain(one)
        upstream.reply = "an answer the cache must not show"
        raw = ask(two, "how do i reset my password")
        assert raw.headers["x-atajo-cache"] == "hit-semantic"
        assert raw.parse().choices[0].message.content == "Use the reset link."
        resp = httpx.post(
            two.url + "/v1/cache/invalidate",
            json={"key_prefix": "default/"},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert resp.status_code == 200 and resp.json()["tiers"]["semantic"] >= 1
        assert ask(one, "How can I reset my password please").headers["x-atajo-cache"] == "miss"
    finally:
        for gw in (one, two):
            cache = gw.gateway.services.cache
            assert cache is not None
            gw.call(cache.flush(tenant))
