"""The shared keep-alive pool: connections are reused, the per-host limit holds under concurrency, and
waiting for a free connection is not mistaken for failing to connect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest
from atajo.errors import UpstreamConnectError
from atajo.providers.openai import OpenAIProvider
from atajo.providers.pool import HttpPool
from atajo.settings import DeploymentSettings, PoolSettings
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import CountingUpstream, Fault


@pytest.fixture
def counting_upstream() -> Iterator[tuple[CountingUpstream, LiveServer]]:
    upstream = CountingUpstream()
    with LiveServer(upstream.app()) as server:
        yield upstream, server


async def started(**settings: Any) -> HttpPool:
    pool = HttpPool(PoolSettings(**settings))
    await pool.start()
    return pool


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    pool = await started()
    yield pool
    await pool.close()


def deployment(server: LiveServer, **extra: Any) -> Deployment:
    settings = DeploymentSettings.model_validate(
        {"provider": "openai", "base_url": server.url + "/v1", "api_key": "k", **extra}
    )
    return Deployment.from_settings("m", 0, settings, PoolSettings())


def chat(stream: bool = False) -> ChatRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return ChatRequest(model="m", body=body, stream=stream)


async def test_session_needs_start_and_start_is_idempotent() -> None:
    pool = HttpPool(PoolSettings())
    with pytest.raises(RuntimeError, match="start"):
        _ = pool.session
    assert pool.connections() == (0, 0)
    await pool.start()
    session = pool.session
    await pool.start()
    assert pool.session is session
    await pool.close()
    await pool.close()
    assert pool.connections() == (0, 0)


async def test_sequential_requests_reuse_one_connection(
    pool: HttpPool, counting_upstream: tuple[CountingUpstream, LiveServer]
) -> None:
    upstream, server = counting_upstream
    provider, dep = OpenAIProvider(pool), deployment(server)
    for _ in range(25):
        await provider.chat(chat(), dep, "x")
    for _ in range(25):
        assert [c async for c in provider.chat_stream(chat(stream=True), dep, "x")]
    assert len(upstream.received) == 50
    assert upstream.connections == 1
    assert pool.opened == {f"127.0.0.1:{server.port}": 1}
    assert pool.sent == {f"127.0.0.1:{server.port}": 50}  # same key: reuse is opened / sent
    assert pool.connections() == (1, 0)  # one idle, kept alive


async def test_per_host_limit_holds_under_concurrency(counting_upstream: tuple[CountingUpstream, LiveServer]) -> None:
    upstream, server = counting_upstream
    upstream.always = Fault(delay_s=0.1)
    pool = await started(max_connections_per_host=2)
    provider, dep = OpenAIProvider(pool), deployment(server)
    try:
        results = await asyncio.gather(*(provider.chat(chat(), dep, "x") for _ in range(10)))
    finally:
        await pool.close()
    assert len(results) == 10
    assert upstream.peak == 2  # never more than two at once, and the two were used
    assert upstream.connections <= 2 and sum(pool.opened.values()) <= 2


async def test_waiting_for_a_free_connection_is_not_a_connect_timeout(
    counting_upstream: tuple[CountingUpstream, LiveServer],
) -> None:
    upstream, server = counting_upstream
    upstream.always = Fault(delay_s=0.25)
    pool = await started(max_connections_per_host=1)
    provider = OpenAIProvider(pool)
    dep = deployment(server, connect_timeout_s=0.05, timeout_s=10)
    try:
        # The last of four waits three answers' time for the one connection, far over connect_timeout_s.
        results = await asyncio.gather(*(provider.chat(chat(), dep, "x") for _ in range(4)))
    finally:
        await pool.close()
    assert len(results) == 4 and upstream.peak == 1


async def test_a_stream_waits_for_a_free_connection_at_most_timeout_s(
    counting_upstream: tuple[CountingUpstream, LiveServer],
) -> None:
    upstream, server = counting_upstream
    upstream.fail_next(Fault(chunk_delay_s=0.15))  # holds the only connection for about a second
    pool = await started(max_connections_per_host=1)
    provider = OpenAIProvider(pool)
    dep = deployment(server, timeout_s=0.3)
    try:
        slow = provider.chat_stream(chat(stream=True), dep, "x")
        await anext(slow)
        with pytest.raises(UpstreamConnectError, match="pool full"):
            await anext(provider.chat_stream(chat(stream=True), dep, "x"))
        assert len(upstream.received) == 1
        await slow.aclose()
    finally:
        await pool.close()


async def test_connections_reports_idle_and_in_use(
    pool: HttpPool, counting_upstream: tuple[CountingUpstream, LiveServer]
) -> None:
    upstream, server = counting_upstream
    provider, dep = OpenAIProvider(pool), deployment(server)
    upstream.fail_next(Fault(chunk_delay_s=0.05))
    stream = provider.chat_stream(chat(stream=True), dep, "x")
    await anext(stream)
    assert pool.connections() == (0, 1)
    assert [c async for c in stream]
    assert pool.connections() == (1, 0)


async def test_a_stream_left_early_closes_its_connection(
    pool: HttpPool, counting_upstream: tuple[CountingUpstream, LiveServer]
) -> None:
    upstream, server = counting_upstream
    provider, dep = OpenAIProvider(pool), deployment(server)
    upstream.fail_next(Fault(chunk_delay_s=0.05))
    stream = provider.chat_stream(chat(stream=True), dep, "x")
    await anext(stream)
    await stream.aclose()  # unread bytes on it: it cannot go back to the pool
    assert pool.connections() == (0, 0)
    await provider.chat(chat(), dep, "x")
    assert upstream.connections == 2


def test_timeouts_per_kind_of_call() -> None:
    pool = HttpPool(PoolSettings())
    settings = DeploymentSettings(provider="openai", base_url="http://127.0.0.1:1", timeout_s=30, connect_timeout_s=2)
    dep = Deployment.from_settings("m", 0, settings, PoolSettings())
    plain = pool.timeout(dep, streaming=False)
    assert (plain.total, plain.sock_connect, plain.connect, plain.sock_read) == (30, 2, None, None)
    stream = pool.timeout(dep, streaming=True)
    assert (stream.total, stream.sock_connect, stream.connect, stream.sock_read) == (None, 2, 30, 30)
    assert pool.timeout(dep, streaming=True) is stream  # built once per deployment
