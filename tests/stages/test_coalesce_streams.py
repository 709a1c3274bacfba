"""Single-flight for streams: the coalesce stage in front of a terminal whose stream the test feeds chunk by
chunk, so callers join, read and leave at chosen points (nothing waits on time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from atajo.core.context import RequestContext
from atajo.core.requests import ChatRequest, Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError, UpstreamStreamBroken
from atajo.stages.coalesce import CoalesceStage
from atajo.types import JSONObject
from tests.stages.test_coalesce import KEY, chat, context, settle

_END = object()


def chunk(text: str, finish: str | None = None) -> JSONObject:
    delta: JSONObject = {"content": text} if text else {}
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


class StreamTerminal:
    """The rest of the pipeline, answering with a stream the test feeds (``push``, ``end``, ``fail``)."""

    def __init__(self) -> None:
        self.calls = 0
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False
        self.finished = False

    async def __call__(self, request: Request, ctx: RequestContext) -> Result:
        self.calls += 1
        ctx.routed_model, ctx.upstream_model, ctx.provider = "gpt-4o-mini", "gpt-4o-mini", "openai"
        ctx.deployment = "gpt-4o-mini/0"
        ctx.attempts += 1
        return ChunkStream(self._chunks())

    async def _chunks(self) -> AsyncGenerator[JSONObject, None]:
        try:
            while True:
                item = await self.queue.get()
                if item is _END:
                    self.finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, dict)
                yield item
        finally:
            self.closed = True

    def push(self, *chunks: JSONObject) -> None:
        for c in chunks:
            self.queue.put_nowait(c)

    def end(self) -> None:
        self.queue.put_nowait(_END)

    def fail(self, error: BaseException) -> None:
        self.queue.put_nowait(error)


class Reader:
    """A client reading a stream the stage answered, chunk by chunk, until told to stop."""

    def __init__(self, coalesce: CoalesceStage, terminal: StreamTerminal, n: int, stream: bool = True) -> None:
        self.ctx = context(n)
        self.seen: list[str] = []
        self.error: BaseException | None = None
        self.result: Result | None = None
        self.task = asyncio.create_task(self._run(coalesce, terminal, stream))

    async def _run(self, coalesce: CoalesceStage, terminal: StreamTerminal, stream: bool) -> None:
        result = self.result = await coalesce(chat(stream=stream), self.ctx, terminal)
        if not isinstance(result, ChunkStream):
            return
        try:
            async for c in result.chunks:
                if c["choices"]:
                    self.seen.append(c["choices"][0]["delta"].get("content", "<end>"))
        except AtajoError as err:
            self.error = err
        finally:
            await result.chunks.aclose()


async def test_a_follower_joining_mid_stream_gets_the_chunks_already_sent_then_the_live_ones() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    leader = Reader(coalesce, terminal, 0)
    await settle()
    terminal.push(chunk("Hel"), chunk("lo"))
    await settle()
    assert leader.seen == ["Hel", "lo"]
    late = Reader(coalesce, terminal, 1)
    await settle()
    assert late.seen == ["Hel", "lo"]  # what was already sent
    terminal.push(chunk(" world"), chunk("", "stop"))
    terminal.end()
    await asyncio.gather(leader.task, late.task)

    assert terminal.calls == 1
    assert leader.seen == late.seen == ["Hel", "lo", " world", "<end>"]
    assert (leader.ctx.coalesced, late.ctx.coalesced) == (False, True)
    assert late.ctx.deployment == "gpt-4o-mini/0" and late.ctx.attempts == 0
    assert coalesce.flight.in_flight == 0


async def test_the_key_is_held_until_the_stream_ends_then_released() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    first = Reader(coalesce, terminal, 0)
    await settle()
    terminal.push(chunk("a"))
    await settle()
    assert coalesce.flight.busy(KEY)  # the call returned its stream long ago, but it is still being sent
    terminal.end()
    await first.task
    assert not coalesce.flight.busy(KEY)


async def test_a_follower_disconnecting_leaves_the_stream_running_for_the_others() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    leader, quitter, stayer = (Reader(coalesce, terminal, n) for n in range(3))
    await settle()
    terminal.push(chunk("one"))
    await settle()
    quitter.task.cancel()  # its client went away
    await settle()
    terminal.push(chunk(" two"), chunk("", "stop"))
    terminal.end()
    await asyncio.gather(leader.task, stayer.task)

    assert quitter.task.cancelled() and quitter.seen == ["one"]
    assert leader.seen == stayer.seen == ["one", " two", "<end>"]
    assert terminal.calls == 1 and terminal.finished


async def test_the_leader_disconnecting_does_not_cancel_the_upstream_call_for_the_followers() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    leader = Reader(coalesce, terminal, 0)
    await settle()
    followers = [Reader(coalesce, terminal, n) for n in (1, 2)]
    await settle()
    terminal.push(chunk("one"))
    await settle()
    leader.task.cancel()
    await settle()
    assert not terminal.closed  # the provider's stream goes on
    terminal.push(chunk(" two"), chunk("", "stop"))
    terminal.end()
    await asyncio.gather(*(f.task for f in followers))

    assert leader.task.cancelled()
    assert [f.seen for f in followers] == [["one", " two", "<end>"]] * 2
    assert terminal.calls == 1 and terminal.finished


async def test_the_upstream_stream_is_closed_once_every_reader_is_gone() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    readers = [Reader(coalesce, terminal, n) for n in range(2)]
    await settle()
    terminal.push(chunk("one"))
    await settle()
    for reader in readers:
        reader.task.cancel()
    await settle()
    assert terminal.closed and not terminal.finished
    assert coalesce.flight.in_flight == 0


async def test_a_failure_mid_stream_reaches_every_reader_as_the_same_error_after_the_same_chunks() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    readers = [Reader(coalesce, terminal, n) for n in range(3)]
    await settle()
    terminal.push(chunk("partial"))
    await settle()
    late = Reader(coalesce, terminal, 3)
    await settle()
    error = UpstreamStreamBroken("the provider cut the stream")
    terminal.fail(error)
    await asyncio.gather(*(r.task for r in (*readers, late)))

    assert terminal.calls == 1
    assert all(r.seen == ["partial"] for r in (*readers, late))
    assert all(r.error is error for r in (*readers, late))
    assert coalesce.flight.in_flight == 0


async def test_a_whole_answer_follower_of_a_stream_gets_the_chunks_folded() -> None:
    coalesce, terminal = CoalesceStage(), StreamTerminal()
    leader = Reader(coalesce, terminal, 0)
    await settle()
    whole = Reader(coalesce, terminal, 1, stream=False)
    await settle()
    terminal.push(chunk("Hi"), chunk(" there"), chunk("", "stop"))
    usage: JSONObject = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    terminal.push({**chunk(""), "choices": [], "usage": usage})
    terminal.end()
    await asyncio.gather(leader.task, whole.task)

    assert terminal.calls == 1
    assert isinstance(whole.result, Completion)
    assert whole.result.body["choices"][0]["message"]["content"] == "Hi there"
    assert whole.result.body["choices"][0]["finish_reason"] == "stop"
    assert whole.result.usage == Usage(prompt_tokens=2, completion_tokens=2)


async def test_a_streaming_follower_of_a_whole_answer_gets_it_as_chunks() -> None:
    class Whole:
        calls = 0
        release = asyncio.Event()

        async def __call__(self, request: Request, ctx: RequestContext) -> Result:
            self.calls += 1
            await self.release.wait()
            body: JSONObject = {
                "id": "chatcmpl-w",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            return Completion(body)

    coalesce, terminal = CoalesceStage(), Whole()
    leader = asyncio.create_task(coalesce(chat(), context(0), terminal))
    await settle()
    streamed = asyncio.create_task(coalesce(ChatRequest("gpt-4o-mini", {}, stream=True), context(1), terminal))
    await settle()
    terminal.release.set()
    whole, stream = await leader, await streamed

    assert terminal.calls == 1
    assert isinstance(whole, Completion) and isinstance(stream, ChunkStream)
    chunks = [c async for c in stream.chunks]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [True, False])
async def test_an_error_before_the_stream_reaches_every_caller(stream: bool) -> None:
    class Refusing:
        calls = 0
        release = asyncio.Event()
        error = UpstreamStreamBroken("refused")

        async def __call__(self, request: Request, ctx: RequestContext) -> Result:
            self.calls += 1
            ctx.provider = "openai"
            await self.release.wait()
            raise self.error

    coalesce, terminal = CoalesceStage(), Refusing()
    tasks = [asyncio.create_task(coalesce(chat(stream=stream), context(n), terminal)) for n in range(3)]
    await settle()
    terminal.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert terminal.calls == 1
    assert all(o is terminal.error for o in outcomes)
