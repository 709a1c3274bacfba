"""Coalescing end to end, with the OpenAI SDK against the gateway in front of a local OpenAI-format upstream:
identical streams share one upstream call, clients leaving (followers or the leader) never cut it for the
others, and a stream failing midway reaches every client as the same error."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import openai
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
HI: Any = [{"role": "user", "content": "Tell me a short story."}]
STORY = "Once upon a time a gateway made one call for many callers and everyone got the whole story."


def config(up: LiveServer) -> dict[str, Any]:
    return {"models": {"fast": openai_model(up.url)}, "cache": {"tiers": [{"url": "memory://", "ttl_s": 300}]}}


def client(gw: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-any", max_retries=0, timeout=30)


def text_of(stream: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


async def test_concurrent_identical_streams_and_plain_requests_make_one_upstream_call(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.reply = STORY
    upstream.always = Fault(delay_s=0.2, chunk_delay_s=0.01)  # every copy arrives while the first is in flight
    gw = gateway(config(up))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-any", max_retries=0, timeout=30)

    async def streamed() -> tuple[str, str, str | None]:
        raw = await sdk.chat.completions.with_raw_response.create(model="fast", messages=HI, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        return text, raw.headers["x-atajo-cache"], raw.headers.get("x-atajo-coalesced")

    async def whole() -> tuple[str, str, str | None]:
        raw = await sdk.chat.completions.with_raw_response.create(model="fast", messages=HI)
        return (
            raw.parse().choices[0].message.content or "",
            raw.headers["x-atajo-cache"],
            raw.headers.get("x-atajo-coalesced"),
        )

    results = await asyncio.gather(*(streamed() if n % 3 else whole() for n in range(60)))
    await sdk.close()

    assert len(upstream.received) == 1
    assert {text for text, _, _ in results} == {STORY}
    statuses = Counter(status for _, status, _ in results)
    coalesced = sum(1 for _, _, flag in results if flag == "true")
    assert coalesced + statuses["hit-memory"] == 59, (statuses, coalesced)


def test_a_follower_joining_mid_stream_gets_the_chunks_already_sent_then_the_rest(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.reply = STORY
    upstream.always = Fault(chunk_delay_s=0.02)
    gw = gateway(config(up))
    leader = client(gw).chat.completions.create(model="fast", messages=HI, stream=True)
    first = [next(iter(leader)) for _ in range(4)]  # the role chunk and three words are out
    raw = client(gw).chat.completions.with_raw_response.create(model="fast", messages=HI, stream=True)
    follower_text = text_of(raw.parse())
    leader_text = "".join(c.choices[0].delta.content or "" for c in first) + text_of(leader)

    assert follower_text == leader_text == STORY
    assert raw.headers["x-atajo-coalesced"] == "true"
    assert len(upstream.received) == 1


@pytest.mark.parametrize("who_leaves", ["leader", "follower"])
def test_a_client_leaving_mid_stream_does_not_cut_the_upstream_call_for_the_others(
    gateway: GatewayFactory, openai_upstream: Upstream, who_leaves: str
) -> None:
    upstream, up = openai_upstream
    upstream.reply = STORY
    upstream.always = Fault(chunk_delay_s=0.02)
    gw = gateway(config(up))
    leader = client(gw).chat.completions.create(model="fast", messages=HI, stream=True)
    chunks = iter(leader)
    next(chunks), next(chunks)
    followers = [client(gw).chat.completions.create(model="fast", messages=HI, stream=True) for _ in range(2)]
    leaving, staying = (leader, followers[0]) if who_leaves == "leader" else (followers[0], leader)
    next(iter(leaving))
    leaving.close()  # the client goes away: its connection is closed mid-stream

    rest = text_of(staying)
    assert STORY.endswith(rest) and rest  # the stayer's remaining chunks, to the end
    assert text_of(followers[1]) == STORY
    assert len(upstream.received) == 1


async def test_an_upstream_failing_mid_stream_reaches_every_client_as_the_same_error(
    gateway: GatewayFactory, openai_upstream: Upstream
) -> None:
    upstream, up = openai_upstream
    upstream.reply = STORY
    upstream.always = Fault(delay_s=0.2, stream_break_after=4, chunk_delay_s=0.01)
    gw = gateway(config(up))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-any", max_retries=0, timeout=30)

    async def one() -> tuple[str, str]:
        stream = await sdk.chat.completions.create(model="fast", messages=HI, stream=True)
        text = ""
        try:
            async for c in stream:
                text += (c.choices[0].delta.content or "") if c.choices else ""
        except openai.APIError as err:
            return text, err.message
        return text, "no error"

    outcomes = await asyncio.gather(*(one() for _ in range(20)))
    await sdk.close()

    assert len(upstream.received) == 1
    assert len(set(outcomes)) == 1, outcomes  # the same chunks, then the same error, for everyone
    text, message = outcomes[0]
    assert STORY.startswith(text) and text != STORY
    assert "stream" in message.lower()
