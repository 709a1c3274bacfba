"""A local upstream speaking Anthropic's Messages wire format (POST /v1/messages, whole answers and SSE
streams, per Anthropic's API reference and streaming guide), with scripted faults: error statuses with
Anthropic's error body, 529 overloaded, Retry-After, delays, dropped connections, streams cut mid-way, an
``event: error`` mid-stream, a stream that ends without message_stop. It records what it received.

It checks requests the way the real API does (required fields, no unknown top-level fields, tool_result
blocks answering the previous turn's tool_use blocks and coming first) and, stricter than the real API,
that user and assistant turns alternate, so a translation that leans on Anthropic's leniency fails here.

Answers are scripted from the request: a tool call when tools are offered (the named one when forced),
"The tool said: ..." after tool results, else ``reply``; cut at a stop sequence or at ``max_tokens`` words.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.script import FaultScript

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

# Top-level request fields the Messages API documents; anything else is "Extra inputs are not permitted".
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
    }
)


@dataclass
class Fault:
    """What the next request gets instead of (or on top of) a normal answer."""

    status: int = 200
    error_type: str | None = None  # defaults to Anthropic's type for the status
    message: str = "scripted failure"
    retry_after: str | None = None
    delay_s: float = 0.0
    drop: bool = False  # close the connection without answering
    invalid_json: bool = False
    stream_break_after: int | None = None  # SSE events sent before the connection is cut mid-stream
    stream_error_event: bool = False  # at that point send `event: error` instead of cutting
    stream_error_type: str = "overloaded_error"
    omit_message_stop: bool = False  # end the stream cleanly but without message_stop
    chunk_delay_s: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(
    status: int, message: str, error_type: str | None = None, retry_after: str | None = None
) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": error_type or ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": "req_fake",
    }
    headers = {"retry-after": retry_after} if retry_after else {}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class AnthropicUpstream(FaultScript[Fault]):
    fault_type = Fault
    reply: str = "Hello from the fake Anthropic upstream."
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Lima"})
    cache_read_tokens: int = 0
    input_tokens: int = 11
    faults: deque[Fault] = field(default_factory=deque)
    always: Fault | None = None
    received: list[Received] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        return app

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return error_response(400, "There was an issue with the format of your request: invalid JSON")
        self.received.append(Received(request.path, dict(request.headers), body))
        fault = self._fault()
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.drop:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if fault.status != 200:
            return error_response(fault.status, fault.message, fault.error_type, fault.retry_after)
        if fault.invalid_json:
            return web.Response(body=b"{not json", content_type="application/json")
        try:
            check_headers(request)
            check_body(body)
        except Rejected as exc:
            return error_response(exc.status, exc.message)
        content, stop_reason, stop_sequence = self._answer(body)
        output_tokens = sum(len(b["text"].split()) if b["type"] == "text" else 5 for b in content)
        usage = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cache_read_tokens,
            "output_tokens": output_tokens,
        }
        message = {
            "id": "msg_fake01",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(message)
        return await self._stream(request, message, fault)

    def _answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
        last = body["messages"][-1]
        results = [b for b in _blocks(last) if b["type"] == "tool_result"] if last["role"] == "user" else []
        choice = body.get("tool_choice") or {"type": "auto"}
        tools = body.get("tools") or []
        if tools and choice["type"] != "none" and (choice["type"] in ("any", "tool") or not results):
            name = choice["name"] if choice["type"] == "tool" else tools[0]["name"]
            call = {"type": "tool_use", "id": "toolu_fake01", "name": name, "input": self.tool_input}
            # With tool_choice any/tool the API prefills the turn, so no text comes before the call.
            preface = [{"type": "text", "text": "Let me check."}] if choice["type"] == "auto" else []
            return [*preface, call], "tool_use", None
        text = self.reply
        if results:
            text = "The tool said: " + " | ".join(_result_text(r) for r in results)
        for seq in body.get("stop_sequences") or ():
            if seq in text:
                return [{"type": "text", "text": text[: text.index(seq)]}], "stop_sequence", seq
        words = text.split(" ")
        if len(words) > body["max_tokens"]:
            return [{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens", None
        return [{"type": "text", "text": text}], "end_turn", None

    async def _stream(self, request: web.Request, message: dict[str, Any], fault: Fault) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        for i, event in enumerate(stream_events(message, omit_stop=fault.omit_message_stop)):
            if fault.stream_break_after is not None and i == fault.stream_break_after:
                if fault.stream_error_event:
                    error = {"type": "error", "error": {"type": fault.stream_error_type, "message": fault.message}}
                    await resp.write(b"event: error\ndata: " + orjson.dumps(error) + b"\n\n")
                    await resp.write_eof()
                    return resp
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
            if fault.chunk_delay_s:
                await asyncio.sleep(fault.chunk_delay_s)
        await resp.write_eof()
        return resp


def stream_events(message: dict[str, Any], *, omit_stop: bool = False) -> list[dict[str, Any]]:
    """The documented event sequence for a message: message_start, ping, per block start/deltas/stop,
    message_delta (stop reason, cumulative output tokens), message_stop."""
    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None, stop_sequence=None, usage=dict(usage, output_tokens=1))
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            events.append(
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            )
            words = block["text"].split(" ")
            for j, word in enumerate(words):
                piece = word if j == 0 else " " + word
                events.append(
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
                )
        else:
            events.append({"type": "content_block_start", "index": index, "content_block": dict(block, input={})})
            raw = orjson.dumps(block["input"]).decode()
            # The API opens with an empty fragment, then sends the JSON in pieces that are not valid alone.
            for fragment in ["", *(raw[k : k + 7] for k in range(0, len(raw), 7))]:
                delta = {"type": "input_json_delta", "partial_json": fragment}
                events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
    )
    if not omit_stop:
        events.append({"type": "message_stop"})
    return events


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _result_text(result: dict[str, Any]) -> str:
    content = result.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content)


def check_headers(request: web.Request) -> None:
    if not request.headers.get("x-api-key") and not request.headers.get("authorization"):
        raise Rejected(401, "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        raise Rejected(400, "anthropic-version: header is required")


def check_body(body: dict[str, Any]) -> None:
    for name in body:
        if name not in KNOWN_FIELDS:
            raise Rejected(400, f"{name}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str):
        raise Rejected(400, "model: Field required")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        raise Rejected(400, "max_tokens: Field required")
    for name in ("temperature", "top_p"):
        if name in body and not 0 <= body[name] <= 1:
            raise Rejected(400, f"{name}: range: 0..1")
    system = body.get("system")
    if isinstance(system, list) and not all(b.get("type") == "text" and b.get("text") for b in system):
        raise Rejected(400, "system: text blocks only")
    if system is not None and not isinstance(system, (str, list)):
        raise Rejected(400, "system: a string or a list of text blocks")
    if "metadata" in body and set(body["metadata"]) - {"user_id"}:
        raise Rejected(400, "metadata: Extra inputs are not permitted")
    if "stop_sequences" in body and not all(isinstance(s, str) for s in body["stop_sequences"]):
        raise Rejected(400, "stop_sequences: strings only")
    names = _check_tools(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Rejected(400, "messages: at least one message is required")
    pending: set[str] = set()  # tool_use ids the next user turn must answer
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise Rejected(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i > 0 and messages[i - 1]["role"] == role:
            raise Rejected(400, f"messages.{i}: roles must alternate between 'user' and 'assistant'")
        blocks = _blocks(message)
        if not blocks:
            raise Rejected(400, f"messages.{i}: all messages must have non-empty content")
        answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if pending and (role != "user" or not pending <= answered):
            raise Rejected(
                400, f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after"
            )
        pending = set()
        seen_other = False
        for j, block in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            kind = block.get("type")
            if kind == "text":
                if not isinstance(block.get("text"), str) or not block["text"]:
                    raise Rejected(400, f"{where}: text content blocks must be non-empty")
            elif kind == "image":
                _check_image(block.get("source") or {}, where)
            elif kind == "document":
                if (block.get("source") or {}).get("type") != "base64":
                    raise Rejected(400, f"{where}.source: unsupported source")
            elif kind == "tool_use" and role == "assistant":
                if block.get("name") not in names or not isinstance(block.get("input"), dict) or not block.get("id"):
                    raise Rejected(400, f"{where}: tool_use needs an id, a defined tool name and an object input")
                pending.add(block["id"])
            elif kind == "tool_result" and role == "user":
                if seen_other:
                    raise Rejected(400, f"{where}: tool_result blocks must come first in the user message")
            else:
                raise Rejected(400, f"{where}.type: unexpected block type {kind!r} in a {role} message")
            seen_other = seen_other or kind != "tool_result"
        if role == "user" and answered:
            previous = messages[i - 1] if i > 0 else {"content": []}
            asked = {b.get("id") for b in _blocks(previous) if b.get("type") == "tool_use"}
            if not answered <= asked:
                raise Rejected(400, f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks")


def _check_tools(body: dict[str, Any]) -> set[str]:
    names = set()
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool.get("name"), str) or (tool.get("input_schema") or {}).get("type") != "object":
            raise Rejected(400, f"tools.{i}: a name and an input_schema of type object are required")
        if set(tool) - {"name", "description", "input_schema", "cache_control"}:
            raise Rejected(400, f"tools.{i}: Extra inputs are not permitted")
        names.add(tool["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        if not body.get("tools"):
            raise Rejected(400, "tool_choice may only be specified while providing tools")
        if choice.get("type") not in ("auto", "any", "tool", "none"):
            raise Rejected(400, "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if choice["type"] == "tool" and choice.get("name") not in names:
            raise Rejected(400, "tool_choice.name: no tool with that name")
    return names


IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _check_image(source: dict[str, Any], where: str) -> None:
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return
    if source.get("type") == "base64" and source.get("media_type") in IMAGE_TYPES and source.get("data"):
        return
    raise Rejected(400, f"{where}.source: invalid image source")
