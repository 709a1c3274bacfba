"""The coalesce stage on its own, in front of a terminal handler that counts calls and blocks on an event, so
the requests really overlap (nothing waits on time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from atajo.coalesce.singleflight import SingleFlight
from atajo.core.context import RequestContext
from atajo.core.requests import ChatRequest, EmbeddingsRequest, Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError, UpstreamTimeout
from atajo.stages.coalesce import CoalesceStage, Piece
from atajo.types import JSONObject

KEY = "default/default/gpt-4o-mini/v1-abc"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Terminal:
    """Stands in for the rest of the pipeline: fills the context as routing and upstream would."""

    def __init__(self, error: AtajoError | None = None, upstream_ns: int = 1) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.error = error
        self.upstream_ns = upstream_ns

    async def __call__(self, request: Request, ctx: RequestContext) -> Result:
        self.calls += 1
        ctx.routed_model = "gpt-4o-mini"
        ctx.upstream_model = "gpt-4o-mini-2024-07-18"
        ctx.provider = "openai"
        ctx.deployment = "gpt-4o-mini/0"
        ctx.attempts += 1
        await self.release.wait()
        ctx.upstream_ns += self.upstream_ns
        if self.error is not None:
            raise self.error
        ctx.response_model = "gpt-4o-mini-2024-07-18"
        ctx.simulated = True
        ctx.cost_micros = 42
        if request.stream:
            return ChunkStream(self._chunks())
        body: JSONObject = {"id": f"chatcmpl-{self.calls}", "object": "chat.completion", "choices": []}
        return Completion(body, Usage(prompt_tokens=3, completion_tokens=5))

    async def _chunks(self) -> AsyncGenerator[JSONObject, None]:
        yield {"object": "chat.completion.chunk", "choices": []}


def chat(stream: bool = False) -> ChatRequest:
    body: JSONObject = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return ChatRequest(model="gpt-4o-mini", body=body, stream=stream)


def context(n: int, cache_key: str | None = KEY) -> RequestContext:
    ctx = RequestContext(request_id=f"req_{n}", route="chat", headers={})
    ctx.cache_key = cache_key
    return ctx


def stage() -> CoalesceStage:
    flight: SingleFlight[Piece] = SingleFlight()
    return CoalesceStage(flight)


async def test_concurrent_identical_requests_make_one_call() -> None:
    coalesce, terminal = stage(), Terminal()
    contexts = [context(n) for n in range(50)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in contexts]
    await settle()
    assert terminal.calls == 1
    terminal.release.set()
    results = await asyncio.gather(*tasks)

    assert terminal.calls == 1
    assert all(isinstance(r, Completion) and r.body["id"] == "chatcmpl-1" for r in results)
    assert (coalesce.flight.leaders, coalesce.flight.followers, coalesce.flight.in_flight) == (1, 49, 0)


async def test_followers_get_the_leaders_routing_facts_and_cost_nothing() -> None:
    coalesce, terminal = stage(), Terminal()
    leader, *followers = [context(n) for n in range(5)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in (leader, *followers)]
    await settle()
    terminal.release.set()
    await asyncio.gather(*tasks)

    assert (leader.coalesced, leader.attempts, leader.cost_micros, leader.upstream_ns) == (False, 1, 42, 1)
    for ctx in followers:
        assert ctx.coalesced is True
        assert ctx.attempts == 0
        assert ctx.cost_micros is None
        assert (ctx.routed_model, ctx.upstream_model, ctx.response_model) == (
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
            "gpt-4o-mini-2024-07-18",
        )
        assert (ctx.provider, ctx.deployment, ctx.simulated) == ("openai", "gpt-4o-mini/0", True)
        assert ctx.upstream_ns == 1
        assert ctx.request_id != leader.request_id  # its own context, only updated


async def test_a_followers_upstream_time_never_exceeds_its_own_wait() -> None:
    coalesce, terminal = stage(), Terminal(upstream_ns=3600 * 10**9)  # the provider "took" an hour
    contexts = [context(n) for n in range(3)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in contexts]
    await settle()
    terminal.release.set()
    await asyncio.gather(*tasks)

    assert contexts[0].upstream_ns == 3600 * 10**9
    for ctx in contexts[1:]:
        assert 0 < ctx.upstream_ns <= ctx.elapsed_ns()


async def test_every_caller_gets_its_own_body_and_usage() -> None:
    coalesce, terminal = stage(), Terminal()
    tasks = [asyncio.create_task(coalesce(chat(), context(n), terminal)) for n in range(10)]
    await settle()
    terminal.release.set()
    results = [r for r in await asyncio.gather(*tasks) if isinstance(r, Completion)]

    assert len(results) == 10
    assert len({id(r.body) for r in results}) == 10
    assert len({id(r.usage) for r in results}) == 10
    assert all(r.usage == Usage(prompt_tokens=3, completion_tokens=5) for r in results)
    results[0].body["id"] = "edited by the leader"
    results[1].body["x_extra"] = True
    results[1].usage = None
    assert all(r.body == {"id": "chatcmpl-1", "object": "chat.completion", "choices": []} for r in results[2:])
    assert all(r.usage is not None for r in results[2:])


async def test_a_leader_editing_its_answer_before_followers_wake_leaks_nothing() -> None:
    class EditingOuterStage:
        """An outer stage of the leader that edits the answer as soon as it has it."""

        def __init__(self, coalesce: CoalesceStage, terminal: Terminal) -> None:
            self.coalesce, self.terminal = coalesce, terminal

        async def __call__(self, ctx: RequestContext) -> Result:
            result = await self.coalesce(chat(), ctx, self.terminal)
            assert isinstance(result, Completion)
            result.body["id"] = "edited"
            return result

    coalesce, terminal = stage(), Terminal()
    leader = asyncio.create_task(EditingOuterStage(coalesce, terminal)(context(0)))
    await settle()
    followers = [asyncio.create_task(coalesce(chat(), context(n), terminal)) for n in range(1, 4)]
    await settle()
    terminal.release.set()
    edited = await leader
    results = await asyncio.gather(*followers)

    assert isinstance(edited, Completion) and edited.body["id"] == "edited"
    assert all(isinstance(r, Completion) and r.body["id"] == "chatcmpl-1" for r in results)


async def test_requests_without_a_cache_key_are_not_coalesced() -> None:
    coalesce, terminal = stage(), Terminal()
    contexts = [context(n, cache_key=None) for n in range(3)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in contexts]
    await settle()
    assert terminal.calls == 3
    terminal.release.set()
    await asyncio.gather(*tasks)
    assert not any(ctx.coalesced for ctx in contexts)
    assert all(ctx.cost_micros == 42 for ctx in contexts)


async def test_enabled_for_can_keep_a_request_out() -> None:
    flight: SingleFlight[Piece] = SingleFlight()
    coalesce = CoalesceStage(flight, enabled_for=lambda request, ctx: ctx.request_id != "req_2")
    terminal = Terminal()
    contexts = [context(n) for n in range(3)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in contexts]
    await settle()
    assert terminal.calls == 2  # req_0 leads, req_1 follows, req_2 goes alone
    terminal.release.set()
    await asyncio.gather(*tasks)
    assert [ctx.coalesced for ctx in contexts] == [False, True, False]


async def test_different_keys_make_separate_calls() -> None:
    coalesce, terminal = stage(), Terminal()
    contexts = [context(n, cache_key=f"default/default/gpt-4o-mini/v1-{n % 2}") for n in range(4)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in contexts]
    await settle()
    assert terminal.calls == 2
    terminal.release.set()
    await asyncio.gather(*tasks)
    assert [ctx.coalesced for ctx in contexts] == [False, False, True, True]


async def test_embeddings_requests_are_coalesced_too() -> None:
    coalesce, terminal = stage(), Terminal()
    request = EmbeddingsRequest(model="text-embedding-3-small", body={"input": "hi"})
    tasks = [asyncio.create_task(coalesce(request, context(n), terminal)) for n in range(3)]
    await settle()
    terminal.release.set()
    await asyncio.gather(*tasks)
    assert terminal.calls == 1


async def test_the_leaders_error_reaches_every_follower() -> None:
    error = UpstreamTimeout("the provider did not answer in time")
    coalesce, terminal = stage(), Terminal(error=error)
    contexts = [context(n) for n in range(10)]
    tasks = [asyncio.create_task(coalesce(chat(), ctx, terminal)) for ctx in contexts]
    await settle()
    terminal.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert terminal.calls == 1
    assert all(outcome is error for outcome in outcomes)
    assert [ctx.coalesced for ctx in contexts] == [False] + [True] * 9
    assert all(ctx.provider == "openai" and ctx.attempts == 0 for ctx in contexts[1:])  # for error metrics
    assert coalesce.flight.in_flight == 0


async def test_followers_still_get_the_answer_when_the_leader_leaves() -> None:
    coalesce, terminal = stage(), Terminal()
    leader = asyncio.create_task(coalesce(chat(), context(0), terminal))
    await settle()
    followers = [asyncio.create_task(coalesce(chat(), context(n), terminal)) for n in range(1, 4)]
    await settle()
    leader.cancel()
    await settle()
    terminal.release.set()
    results = await asyncio.gather(*followers)

    assert leader.cancelled()
    assert terminal.calls == 1
    assert all(isinstance(r, Completion) and r.body["id"] == "chatcmpl-1" for r in results)


async def test_a_request_after_completion_calls_again() -> None:
    coalesce, terminal = stage(), Terminal()
    terminal.release.set()
    first = await coalesce(chat(), context(0), terminal)
    second_ctx = context(1)
    second = await coalesce(chat(), second_ctx, terminal)

    assert terminal.calls == 2
    assert isinstance(first, Completion) and isinstance(second, Completion)
    assert second.body["id"] == "chatcmpl-2"
    assert second_ctx.coalesced is False


async def test_a_bug_in_the_pipeline_reaches_every_caller() -> None:
    class Broken(Terminal):
        async def __call__(self, request: Request, ctx: RequestContext) -> Result:
            self.calls += 1
            await self.release.wait()
            raise KeyError("not an AtajoError")

    coalesce, terminal = stage(), Broken()
    tasks = [asyncio.create_task(coalesce(chat(), context(n), terminal)) for n in range(3)]
    await settle()
    terminal.release.set()
    for task in tasks:
        with pytest.raises(KeyError):
            await task
    assert terminal.calls == 1
