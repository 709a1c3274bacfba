"""Single-flight across two gateway instances sharing Redis (in one process, each on its own event loop and
port): 200 concurrent identical requests split across both make one upstream call; with Redis unreachable,
at most one per instance."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import IN_CI, GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
HI: Any = [{"role": "user", "content": "What is the capital of Peru?"}]


@pytest.fixture
def redis_up() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        if IN_CI:
            pytest.fail("Redis is not reachable on 127.0.0.1:6379 (CI=true: it must be there)")
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")


def config(up: LiveServer, redis_url: str, timeout_s: float = 0.2) -> dict[str, Any]:
    """``timeout_s`` bounds each Redis call; a call past it counts as Redis being down (each instance then
    calls the provider itself), so the Redis-up test allows for a loaded machine."""
    return {
        "models": {"fast": openai_model(up.url)},
        "cache": {
            "tiers": [{"url": "memory://", "ttl_s": 300}, {"url": redis_url, "ttl_s": 300, "timeout_s": timeout_s}]
        },
        "coalesce": {"lease": {"timeout_s": timeout_s}},
    }


async def burst(urls: list[str], n: int, namespace: str) -> list[tuple[str | None, str, str | None]]:
    """``n`` identical requests at once, alternating between the gateways."""
    sdks = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-any", max_retries=0, timeout=30) for url in urls]

    async def one(i: int) -> tuple[str | None, str, str | None]:
        raw = await sdks[i % len(sdks)].chat.completions.with_raw_response.create(
            model="fast", messages=HI, extra_headers={"x-atajo-cache-namespace": namespace}
        )
        return (
            raw.parse().choices[0].message.content,
            raw.headers["x-atajo-cache"],
            raw.headers.get("x-atajo-coalesced"),
        )

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for sdk in sdks:
            await sdk.close()


async def test_200_identical_requests_across_two_instances_sharing_redis_make_one_upstream_call(
    redis_up: None, gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.always = Fault(delay_s=0.3)  # every copy arrives while the first is in flight
    redis = "redis://127.0.0.1:6379/0"
    first, second = gateway(config(up, redis, timeout_s=5.0)), gateway(config(up, redis, timeout_s=5.0))
    namespace = "t" + uuid.uuid4().hex[:12]  # this run's own entries and leases in the shared Redis

    results = await burst([first.url, second.url], 200, namespace)

    assert len(upstream.received) == 1
    assert {content for content, _, _ in results} == {upstream.reply}
    # every request but one shared a call or found its answer (the waiting instance's leader did both)
    assert sum(1 for _, status, flag in results if flag == "true" or status.startswith("hit")) == 199
    assert Counter(status for _, status, _ in results)["miss"] >= 1
    async with httpx.AsyncClient() as http:
        waited = [(await http.get(gw.url + "/metrics")).text for gw in (first, second)]
    # one instance took the lease; the other waited and found the answer in Redis
    assert sum('atajo_coalesce_leases_total{outcome="acquired"} 1.0' in m for m in waited) == 1
    assert sum('atajo_coalesce_leases_total{outcome="waited_hit"} 1.0' in m for m in waited) == 1


async def test_with_redis_unreachable_each_instance_calls_at_most_once(
    gateway: GatewayFactory, openai_upstream: Upstream, closed_port: int
) -> None:
    upstream, up = openai_upstream
    upstream.always = Fault(delay_s=0.3)
    down = f"redis://127.0.0.1:{closed_port}/0"
    first, second = gateway(config(up, down)), gateway(config(up, down))

    results = await burst([first.url, second.url], 200, "down")

    assert 1 <= len(upstream.received) <= 2
    assert {content for content, _, _ in results} == {upstream.reply}
