"""Exactness under concurrency, through the whole gateway with the openai SDK:

- 1,000 concurrent requests against a limit of 100 per minute let exactly 100 through: in one process (the
  clock injected, so no refill happens during the run), and in three ``atajo serve`` processes sharing Redis
  (on Redis's clock: exactly 100 plus one per 600 ms the run took, which the test measures on Redis's clock).
- A token limit holds within 5 % under 50 concurrent requests (tokens reserved before the call, at an estimate
  that the simulated provider's count of the same text matches to a few tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from atajo.core.requests import ChatRequest
from atajo.limits.estimate import estimate_tokens
from tests.cache.conftest import REDIS_URL, need_server
from tests.conftest import GatewayFactory
from tests.doubles import FakeClock
from tests.e2e.test_cache_multi_instance import serving

INSTANT: dict[str, Any] = {"provider": "simulated", "simulated": {"ttft_ms": 0, "tokens_per_s": 1e6, "jitter": 0}}


async def _storm(urls: list[str], key: str, n: int, **body: Any) -> list[int]:
    """``n`` concurrent chat requests spread over ``urls``; their status codes."""
    clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60) for url in urls]

    async def one(i: int) -> int:
        client = clients[i % len(clients)]
        try:
            await client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": f"question {i}"}], **body
            )
            return 200
        except openai.RateLimitError:
            return 429

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for client in clients:
            await client.close()


def test_1000_concurrent_requests_against_100_per_minute_one_process(gateway: GatewayFactory) -> None:
    config = {
        "models": {"fast": {"deployments": [INSTANT]}},
        "auth": {"master_key": "sk-m", "keys": [{"name": "storm", "key": "sk-storm", "limits": {"rpm": 100}}]},
        "limits": {"adaptive": {"enabled": False}},
    }
    gw = gateway(config, clock=FakeClock())
    statuses = asyncio.run(_storm([gw.url], "sk-storm", 1000))
    assert statuses.count(200) == 100 and statuses.count(429) == 900


@pytest.fixture
def three_gateways(tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    need_server("Redis", "127.0.0.1", 6379)
    key_name = f"storm-{uuid.uuid4().hex[:10]}"  # this run's own bucket in the shared Redis
    config = {
        "log_level": "warning",
        "models": {"fast": {"deployments": [INSTANT]}},
        "auth": {"master_key": "sk-m", "store": "off", "keys": [{"name": key_name, "key": "sk-storm"}]},
        "cache": {"enabled": False},
        # a generous storage timeout: this test is about one limit shared exactly, not about failing open when
        # a CPU-starved machine makes 1,000 checks queue for the pool longer than the default 0.5 s
        "limits": {"storage": REDIS_URL, "timeout_s": 10, "keys": {"rpm": 100, "adaptive": False}},
    }
    try:
        with serving(config, tmp_path, 3) as urls:
            yield urls, key_name
    finally:
        redis.Redis.from_url(REDIS_URL).delete(f"{{atajo-rl}}:key:{key_name}:r")


def _redis_now_us() -> float:
    seconds, micros = redis.Redis.from_url(REDIS_URL).time()
    return seconds * 1e6 + micros


def test_1000_concurrent_requests_against_100_per_minute_three_processes_sharing_redis(
    three_gateways: tuple[list[str], str],
) -> None:
    urls, _ = three_gateways
    started = _redis_now_us()
    statuses = asyncio.run(_storm(urls, "sk-storm", 1000))
    elapsed_us = _redis_now_us() - started
    admitted = statuses.count(200)
    assert statuses.count(429) == 1000 - admitted
    refills = int(elapsed_us // 600_000)  # GCRA gives one back every 600 ms of Redis time
    print(f"admitted {admitted} of 1000 in {elapsed_us / 1e6:.2f} s (at most {refills} refills)")
    assert 100 <= admitted <= 100 + refills  # not 300: the limit is one limit across the three processes


def test_a_token_limit_holds_within_5_percent_under_50_concurrent_requests(gateway: GatewayFactory) -> None:
    prompt = "x" * 600  # 150 tokens + 4 of framing, as both the estimate and the simulated provider count
    max_tokens = 150
    request = ChatRequest(
        "fast", {"model": "fast", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    )
    estimate = estimate_tokens(request, 0)
    tpm = 20 * estimate
    answers: list[Any] = []
    simulated = {**INSTANT, "simulated": {**INSTANT["simulated"], "output_tokens": 10 * max_tokens}}
    config = {
        "models": {"fast": {"deployments": [simulated]}},
        "auth": {"master_key": "sk-m", "keys": [{"name": "t", "key": "sk-tok", "limits": {"tpm": tpm}}]},
        "limits": {"adaptive": {"enabled": False}},
    }
    gw = gateway(config, clock=FakeClock())

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-tok", max_retries=0)

        async def one(i: int) -> None:
            with contextlib.suppress(openai.RateLimitError):
                answers.append(
                    await client.chat.completions.create(
                        model="fast",
                        messages=[{"role": "user", "content": prompt[:-3] + f"{i:03d}"}],
                        max_tokens=max_tokens,
                    )
                )

        await asyncio.gather(*(one(i) for i in range(50)))
        await client.close()

    asyncio.run(run())
    used = sum(a.usage.total_tokens for a in answers if a.usage)
    # 20 estimates fit; answers that came back already settled their real usage (a few tokens above the
    # estimate each), so the last may not have fitted: 19 or 20 admitted, and what they used within 5 %
    assert len(answers) in (19, 20)
    assert abs(used - tpm) <= 0.05 * tpm, (used, tpm)


def test_a_limit_whose_redis_is_unreachable_fails_open_and_counts_it(gateway: GatewayFactory) -> None:
    # nothing listens on port 1: every check fails at once, so a 1-per-minute key is not enforced, each
    # request is admitted, and the failures show in the metric operators alert on
    config = {
        "models": {"fast": {"deployments": [INSTANT]}},
        "auth": {"master_key": "sk-m", "keys": [{"name": "open", "key": "sk-open", "limits": {"rpm": 1}}]},
        "cache": {"enabled": False},
        "limits": {"storage": "redis://127.0.0.1:1/0", "timeout_s": 0.2, "adaptive": {"enabled": False}},
    }
    gw = gateway(config, clock=FakeClock())
    statuses = asyncio.run(_storm([gw.url], "sk-open", 5))
    assert statuses == [200] * 5
    metrics = httpx.get(gw.url + "/metrics").text
    assert "atajo_ratelimit_storage_errors_total 5.0" in metrics
