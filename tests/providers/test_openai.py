"""The OpenAI-compatible adapter against real local servers: what it sends, what it reads back, and how every
way an upstream can fail comes out as the gateway's own errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from atajo.providers.openai import OpenAIProvider
from atajo.providers.pool import HttpPool
from atajo.settings import DeploymentSettings, PoolSettings
from atajo.types import JSONObject
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]


@pytest.fixture
async def provider() -> AsyncIterator[OpenAIProvider]:
    pool = HttpPool(PoolSettings())
    await pool.start()
    yield OpenAIProvider(pool)
    await pool.close()


def deployment(base_url: str, **extra: Any) -> Deployment:
    settings = DeploymentSettings.model_validate(
        {"provider": "openai", "base_url": base_url, "api_key": "sk-up", **extra}
    )
    return Deployment.from_settings("m", 0, settings, PoolSettings())


def at(upstream: LiveServer, **extra: Any) -> Deployment:
    return deployment(upstream.url + "/v1", **extra)


def chat(stream: bool = False, **body: Any) -> ChatRequest:
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    if stream:
        full["stream"] = True
    return ChatRequest(model="m", body=full, stream=stream)


async def stream_all(provider: OpenAIProvider, request: ChatRequest, dep: Deployment) -> list[JSONObject]:
    return [chunk async for chunk in provider.chat_stream(request, dep, "up-model")]


async def until_error(chunks: AsyncIterator[JSONObject]) -> tuple[list[JSONObject], Exception]:
    """The chunks a stream gave before it failed, and how it failed."""
    got: list[JSONObject] = []
    try:
        async for chunk in chunks:
            got.append(chunk)
    except Exception as exc:
        return got, exc
    raise AssertionError(f"the stream ended normally after {len(got)} chunks")


def text_of(chunks: list[JSONObject]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- what goes out ------------------------------------------------------------------------------------


async def test_chat_sends_upstream_model_and_credentials(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    request = chat(temperature=0.5, stream_options={"include_usage": True})
    request.body["stream"] = False
    completion = await provider.chat(request, at(up), "gpt-4o-mini-2024-07-18")
    assert completion.body["choices"][0]["message"]["content"] == upstream.reply
    assert completion.usage is not None and completion.usage.total_tokens == 18
    sent = upstream.received[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "gpt-4o-mini-2024-07-18" and sent.body["temperature"] == 0.5
    assert "stream" not in sent.body and "stream_options" not in sent.body
    assert sent.headers["Authorization"] == "Bearer sk-up"
    assert sent.headers["User-Agent"] == "atajo"
    assert request.body["model"] == "m"  # the client's request is not modified


@pytest.mark.parametrize(
    ("auth_header", "expected"), [("api-key", "sk-up"), ("x-api-key", "sk-up"), ("authorization", "Bearer sk-up")]
)
async def test_auth_header_styles(
    provider: OpenAIProvider, openai_upstream: Upstream, auth_header: str, expected: str
) -> None:
    upstream, up = openai_upstream
    await provider.chat(chat(), at(up, auth_header=auth_header), "x")
    headers = {k.lower(): v for k, v in upstream.received[-1].headers.items()}
    assert headers[auth_header] == expected
    assert sum(k in headers for k in ("authorization", "api-key", "x-api-key")) == 1


async def test_azure_style_api_version_and_extra_headers(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    dep = at(up, api_version="2024-06-01", headers={"x-org": "acme"})
    await provider.chat(chat(), dep, "x")
    await provider.embeddings(EmbeddingsRequest(model="m", body={"model": "m", "input": "a"}), dep, "emb")
    assert [r.query for r in upstream.received] == [{"api-version": "2024-06-01"}] * 2
    assert all(r.headers["x-org"] == "acme" for r in upstream.received)


async def test_no_api_key_sends_no_credentials(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    dep = Deployment.from_settings(
        "m", 0, DeploymentSettings(provider="openai", base_url=up.url + "/v1"), PoolSettings()
    )
    await provider.chat(chat(), dep, "x")
    assert "Authorization" not in upstream.received[-1].headers


async def test_stream_asks_for_usage_and_keeps_the_clients_options(
    provider: OpenAIProvider, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    chunks = await stream_all(provider, chat(stream=True, stream_options={"include_obfuscation": False}), at(up))
    assert text_of(chunks) == upstream.reply
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert upstream.received[-1].body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert upstream.received[-1].body["model"] == "up-model" and upstream.received[-1].body["stream"] is True


async def test_stream_without_usage_when_the_deployment_says_so(
    provider: OpenAIProvider, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    chunks = await stream_all(provider, chat(stream=True), at(up, stream_usage=False))
    assert "stream_options" not in upstream.received[-1].body
    assert all("usage" not in c for c in chunks)


async def test_embeddings(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    request = EmbeddingsRequest(model="m", body={"model": "m", "input": ["a", "b"], "encoding_format": "float"})
    result = await provider.embeddings(request, at(up), "text-embedding-3-small")
    assert len(result.body["data"]) == 2 and result.usage is not None and result.usage.prompt_tokens == 6
    assert upstream.received[-1].path == "/v1/embeddings"
    assert upstream.received[-1].body["model"] == "text-embedding-3-small"


# --- how failures come back ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
async def test_rejection_keeps_status_and_message(
    provider: OpenAIProvider, openai_upstream: Upstream, status: int
) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(status=status, message="'temperature' must be at most 2"))
    with pytest.raises(UpstreamRejected) as info:
        await provider.chat(chat(), at(up), "x")
    assert info.value.status == status and info.value.message == "'temperature' must be at most 2"


@pytest.mark.parametrize("status", [401, 403])
async def test_credential_failure_never_echoes_the_upstream(
    provider: OpenAIProvider, openai_upstream: Upstream, status: int
) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(status=status, message="Incorrect API key provided: sk-up"))
    with pytest.raises(UpstreamError) as info:
        await provider.chat(chat(), at(up), "x")
    assert type(info.value) is UpstreamError and info.value.status == 502
    assert "sk-up" not in info.value.message and "Incorrect" not in info.value.message


async def test_rate_limit_carries_retry_after(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(status=429, retry_after="4"))
    with pytest.raises(UpstreamUnavailable) as info:
        await provider.chat(chat(), at(up), "x")
    assert (info.value.status, info.value.retry_after_s, info.value.retryable) == (429, 4.0, True)


async def test_server_error_status_on_a_stream(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(status=503, message="overloaded"))
    with pytest.raises(UpstreamUnavailable) as info:
        await stream_all(provider, chat(stream=True), at(up))
    assert info.value.upstream_status == 503 and "overloaded" in info.value.message


async def test_invalid_json_is_a_retryable_502(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(invalid_json=True))
    with pytest.raises(UpstreamUnavailable) as info:
        await provider.chat(chat(), at(up), "x")
    assert info.value.status == 502 and info.value.retryable and "invalid JSON" in info.value.message


async def test_dropped_connection(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(drop=True), Fault(drop=True))
    with pytest.raises(UpstreamUnavailable) as info:
        await provider.chat(chat(), at(up), "x")
    assert info.value.retryable and "dropped" in info.value.message
    with pytest.raises(UpstreamUnavailable):
        await stream_all(provider, chat(stream=True), at(up))  # before the headers: still retryable
    assert len(upstream.received) == 2


async def test_timeout(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(delay_s=2.0), Fault(delay_s=2.0))
    with pytest.raises(UpstreamTimeout) as info:
        await provider.chat(chat(), at(up, timeout_s=0.2), "x")
    assert info.value.status == 504 and info.value.retryable and "0.2 s" in info.value.message
    with pytest.raises(UpstreamTimeout):
        await stream_all(provider, chat(stream=True), at(up, timeout_s=0.2))


async def test_connect_error(provider: OpenAIProvider, closed_port: int) -> None:
    with pytest.raises(UpstreamConnectError) as info:
        await provider.chat(chat(), deployment(f"http://127.0.0.1:{closed_port}/v1"), "x")
    assert info.value.retryable and f"127.0.0.1:{closed_port}" in info.value.message
    assert provider.pool.sent[f"127.0.0.1:{closed_port}"] == 1


async def test_stream_cut_midway(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(stream_break_after=3))
    got, err = await until_error(provider.chat_stream(chat(stream=True), at(up), "x"))
    assert isinstance(err, UpstreamStreamBroken)
    assert len(got) == 3 and text_of(got) == "Hello from"


async def test_error_event_midway(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(stream_break_after=2, stream_error_event=True))
    got, err = await until_error(provider.chat_stream(chat(stream=True), at(up), "x"))
    assert isinstance(err, UpstreamStreamBroken)
    assert len(got) == 2 and "overloaded mid-stream" in err.message


async def test_stream_stalling_midway_times_out(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(chunk_delay_s=1.0))
    got, err = await until_error(provider.chat_stream(chat(stream=True), at(up, timeout_s=0.2), "x"))
    assert isinstance(err, UpstreamTimeout)
    assert len(got) == 1 and "stalled" in err.message


async def test_slow_stream_longer_than_the_timeout_completes(
    provider: OpenAIProvider, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.fail_next(Fault(chunk_delay_s=0.08))  # 6 gaps of 0.08 s: the whole stream outlasts timeout_s
    chunks = await stream_all(provider, chat(stream=True), at(up, timeout_s=0.3))
    assert text_of(chunks) == upstream.reply


# --- odd upstreams ------------------------------------------------------------------------------------


def raw_sse_upstream(body: bytes) -> LiveServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return LiveServer(app)


def chunk_event(content: str) -> bytes:
    return b'data: {"choices": [{"index": 0, "delta": {"content": "' + content.encode() + b'"}}]}\n\n'


async def test_sse_framing_variants(provider: OpenAIProvider) -> None:
    body = (
        b": keep-alive comment\r\n\r\n"
        + b"event: message\r\n"
        + b'data:{"choices": [{"index": 0, "delta": {"content": "a"}}]}\r\n\r\n'
        + b"event: \xff\xfe\n"  # an event name that is not UTF-8 must not break the stream
        + chunk_event("b")
        + b"data: [DONE]\n\n"
    )
    with raw_sse_upstream(body) as up:
        chunks = await stream_all(provider, chat(stream=True), at(up))
    assert text_of(chunks) == "ab"


async def test_stream_ending_without_done_is_broken(provider: OpenAIProvider) -> None:
    with raw_sse_upstream(chunk_event("a")) as up:
        got, err = await until_error(provider.chat_stream(chat(stream=True), at(up), "x"))
    assert isinstance(err, UpstreamStreamBroken)
    assert text_of(got) == "a" and "[DONE]" in err.message


async def test_chunk_that_is_not_json_is_broken(provider: OpenAIProvider) -> None:
    with raw_sse_upstream(chunk_event("a") + b"data: {oops\n\n") as up:
        got, err = await until_error(provider.chat_stream(chat(stream=True), at(up), "x"))
    assert isinstance(err, UpstreamStreamBroken) and len(got) == 1
    assert "not JSON" in err.message


class DoneThenHold:
    """Sends one chunk and [DONE], then ends the body only ``hold_s`` later; counts connections and endings."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.transports: list[object] = []
        self.ended = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if not any(t is request.transport for t in self.transports):
            self.transports.append(request.transport)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk_event("a") + b"data: [DONE]\n\n")
        await asyncio.sleep(self.hold_s)
        await resp.write_eof()
        self.ended += 1
        return resp

    def server(self) -> LiveServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handler)
        return LiveServer(app)


async def test_stream_connection_is_reused_when_the_body_ends_after_done(provider: OpenAIProvider) -> None:
    upstream = DoneThenHold(hold_s=0.05)
    with upstream.server() as up:
        for _ in range(3):
            assert text_of(await stream_all(provider, chat(stream=True), at(up))) == "a"
    assert upstream.ended == 3 and len(upstream.transports) == 1


async def test_stream_held_open_after_done_is_not_waited_for(provider: OpenAIProvider) -> None:
    upstream = DoneThenHold(hold_s=10.0)
    with upstream.server() as up:
        assert text_of(await stream_all(provider, chat(stream=True), at(up))) == "a"
        assert upstream.ended == 0  # the answer was complete at [DONE]; the rest of the body was not awaited
        assert provider.pool.connections() == (0, 0)  # that connection could not be reused, so it was closed


async def test_redirects_are_not_followed(provider: OpenAIProvider, openai_upstream: Upstream) -> None:
    """An upstream that redirects must not make the gateway re-send the request (and its key) elsewhere."""
    elsewhere, other = openai_upstream

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        raise web.HTTPTemporaryRedirect(other.url + "/v1/chat/completions")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", redirect)
    with LiveServer(app) as up:
        for auth_header in ("api-key", "authorization"):
            with pytest.raises(UpstreamError) as info:
                await provider.chat(chat(), at(up, auth_header=auth_header), "x")
            assert info.value.status == 502 and "307" in info.value.message
    assert elsewhere.received == []
