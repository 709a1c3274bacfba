"""A local upstream speaking OpenAI's Chat Completions and Embeddings wire format (per OpenAI's API
reference), with scripted faults: error statuses, Retry-After, delays, slow and broken streams, dropped
connections, invalid JSON. It records what it received, so tests can check what the gateway sent."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.script import FaultScript


@dataclass
class Fault:
    """What the next request gets instead of (or on top of) a normal answer."""

    status: int = 200
    message: str = "scripted failure"
    retry_after: str | None = None
    delay_s: float = 0.0
    drop: bool = False  # close the connection without answering
    invalid_json: bool = False
    stream_break_after: int | None = None  # chunks sent before the connection is cut mid-stream
    chunk_delay_s: float = 0.0
    stream_error_event: bool = False
    finish_reason: str | None = None  # e.g. "length": a truncated answer (plain answers only)
    content: str | None = None  # instead of the upstream's reply (plain answers only)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    query: dict[str, str]


@dataclass
class OpenAIUpstream(FaultScript[Fault]):
    fault_type = Fault
    reply: str = "Hello from the fake upstream."
    faults: deque[Fault] = field(default_factory=deque)
    always: Fault | None = None
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    embed_text: Callable[[str], list[float]] | None = None
    """Vectors as a function of the text (semantic tests); by default ``[0.1 * (i + 1), 0.2, 0.3]`` for input i."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.on_response_prepare.append(self._count)
        return app

    async def _count(self, request: web.Request, _: web.StreamResponse) -> None:
        transport = request.transport
        if transport is not None and not getattr(transport, "_atajo_seen", False):
            transport._atajo_seen = True  # type: ignore[attr-defined]
            self.connections += 1

    async def _receive(self, request: web.Request) -> tuple[dict[str, Any], Fault | web.StreamResponse]:
        body = orjson.loads(await request.read())
        self.received.append(Received(request.path, dict(request.headers), body, dict(request.query)))
        fault = self._fault()
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.drop:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if fault.status != 200:
            headers = {"retry-after": fault.retry_after} if fault.retry_after else {}
            error = {"error": {"message": fault.message, "type": "server_error", "param": None, "code": None}}
            return body, web.json_response(error, status=fault.status, headers=headers)
        if fault.invalid_json:
            return body, web.Response(body=b"{not json", content_type="application/json")
        return body, fault

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, outcome = await self._receive(request)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        model = body["model"]
        created = int(time.time())
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        n = body.get("n", 1)
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": outcome.content or self.reply}
            finish = outcome.finish_reason or "stop"
            if body.get("tools") and body.get("tool_choice") != "none":
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": body["tools"][0]["function"]["name"], "arguments": '{"city": "Lima"}'},
                        }
                    ],
                }
                finish = "tool_calls"
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": i, "message": message, "logprobs": None, "finish_reason": finish} for i in range(n)
                    ],
                    "usage": usage,
                    "system_fingerprint": "fp_fake",
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        words = self.reply.split(" ")
        deltas = [{"role": "assistant", "content": ""}] + [
            {"content": w if i == 0 else " " + w} for i, w in enumerate(words)
        ]
        for i, delta in enumerate(deltas):
            if outcome.stream_break_after is not None and i == outcome.stream_break_after:
                if outcome.stream_error_event:
                    await resp.write(
                        b'data: {"error": {"message": "overloaded mid-stream", "type": "server_error"}}\n\n'
                    )
                    return resp
                assert request.transport is not None
                request.transport.close()
                return resp
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            }
            if include_usage:
                chunk["usage"] = None
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if outcome.chunk_delay_s:
                await asyncio.sleep(outcome.chunk_delay_s)
        last = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
        }
        await resp.write(b"data: " + orjson.dumps(last) + b"\n\n")
        if include_usage:
            usage_chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await resp.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, outcome = await self._receive(request)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = [self.embed_text(t) if self.embed_text else [0.1 * (i + 1), 0.2, 0.3] for i, t in enumerate(inputs)]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            }
        )


@dataclass
class CountingUpstream(OpenAIUpstream):
    """Also counts the chat requests being answered at once, and the most there ever were."""

    in_flight: int = 0
    peak: int = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super().chat(request)
        finally:
            self.in_flight -= 1
