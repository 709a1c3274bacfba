"""The per-deployment adaptive concurrency cap (AIMD): its arithmetic with an injected clock, slot hand-over,
and, in a running gateway, a saturated deployment sending the request on to a fallback."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from atajo.errors import DeploymentSaturated, UpstreamTimeout, UpstreamUnavailable
from atajo.limits.concurrency import AIMD, distress
from atajo.settings import ConcurrencySettings
from tests.conftest import GatewayFactory, openai_model
from tests.doubles import FakeClock
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream


def test_distress_halves_the_cap_once_per_cooldown_and_successes_grow_it_by_one() -> None:
    clock = FakeClock()
    cap = AIMD(ConcurrencySettings(initial=16, min=2, max=20, cooldown_s=1.0), clock)
    for _ in range(16):
        assert cap.try_acquire()
    assert not cap.try_acquire()
    for _ in range(3):  # a burst of 429s: one cut, not three
        cap.release("distress")
    assert cap.cap == 8
    clock.advance(1.0)
    cap.release("distress")
    assert cap.cap == 4
    for _ in range(10):
        clock.advance(1.0)
        cap.try_acquire()
        cap.release("distress")
    assert cap.cap == 2  # never below min
    while cap.in_flight:
        cap.release("other")
    for _ in range(40):  # a busy cap grows by one per cap's worth of successes
        assert cap.try_acquire() and cap.try_acquire()
        cap.release("ok")
        cap.release("ok")
    assert cap.cap > 2
    idle = AIMD(ConcurrencySettings(initial=10, min=1, max=20), clock)
    for _ in range(100):  # one call at a time, far below the cap: it does not grow
        assert idle.try_acquire()
        idle.release("ok")
    assert idle.cap == 10


async def test_a_freed_slot_is_handed_to_the_first_waiter() -> None:
    cap = AIMD(ConcurrencySettings(initial=1, min=1, max=1, queue_timeout_s=30))
    assert await cap.acquire()
    waiting = asyncio.create_task(cap.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    cap.release("ok")
    assert await waiting and cap.in_flight == 1
    cap.release("ok")
    assert cap.in_flight == 0


async def test_no_queue_means_an_immediate_refusal() -> None:
    cap = AIMD(ConcurrencySettings(initial=1, min=1, max=1, queue_timeout_s=0))
    assert await cap.acquire()
    assert not await cap.acquire() and cap.saturated == 1


def test_what_counts_as_distress() -> None:
    assert distress(UpstreamUnavailable("busy", upstream_status=429))
    assert distress(UpstreamUnavailable("down", upstream_status=503))
    assert distress(UpstreamTimeout("slow"))
    assert not distress(UpstreamUnavailable("bad gateway", upstream_status=502))
    assert not distress(DeploymentSaturated("ours"))


def test_a_saturated_deployment_sends_requests_to_the_fallback(gateway: GatewayFactory) -> None:
    slow, spare = OpenAIUpstream(), OpenAIUpstream(reply="from the spare")
    slow.always = Fault(delay_s=0.5)  # holds its only slot while the second request arrives
    with LiveServer(slow.app()) as slow_server, LiveServer(spare.app()) as spare_server:
        config: dict[str, Any] = {
            "models": {
                "main": {**openai_model(slow_server.url), "fallbacks": ["spare"]},
                "spare": openai_model(spare_server.url),
            },
            "limits": {"concurrency": {"initial": 1, "min": 1, "max": 1, "queue_timeout_s": 0}},
        }
        gw = gateway(config)
        body = {"model": "main", "messages": [{"role": "user", "content": "hi"}]}

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                first = asyncio.create_task(client.post(gw.url + "/v1/chat/completions", json=body))
                for _ in range(1000):  # until the first holds the slot (the upstream runs on another thread)
                    if slow.received:
                        break
                    await asyncio.sleep(0.005)
                second = await client.post(gw.url + "/v1/chat/completions", json=body)
                return [await first, second]

        first, second = asyncio.run(both())
        assert first.status_code == second.status_code == 200
        assert first.headers["x-atajo-model"] == "main" and second.headers["x-atajo-model"] == "spare"
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'atajo_upstream_saturated_total{deployment="main/0:openai"} 1.0' in metrics
        assert 'atajo_upstream_concurrency_limit{deployment="main/0:openai"} 1.0' in metrics


def test_provider_429s_shrink_the_cap(
    gateway: GatewayFactory, openai_upstream: tuple[OpenAIUpstream, LiveServer]
) -> None:
    upstream, server = openai_upstream
    upstream.always = Fault(status=429)
    gw = gateway({"models": {"m": openai_model(server.url)}, "retry": {"max_retries": 0}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 429
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'atajo_upstream_concurrency_limit{deployment="m/0:openai"} 50.0' in metrics  # 100, halved
