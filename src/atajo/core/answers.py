"""Answers in both shapes: a streamed answer folded into one ``chat.completion``, and a whole completion
unfolded into ``chat.completion.chunk`` objects, so a cached answer serves plain and streaming requests alike.

The cache stores the whole completion. A stream is stored once it has ended cleanly; a hit for a
``stream: true`` request is replayed as a real stream: a role chunk, the content in word-aligned pieces,
tool-call arguments in pieces, a finish chunk per choice and, when asked for, the usage chunk.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Any

from atajo.core.results import ChunkStream, Usage
from atajo.types import JSONObject

COMPLETE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "function_call"})
"""Finish reasons of a whole answer (``content_filter`` and a missing reason are not)."""

PIECE_CHARS = 24
"""Roughly what a provider sends per chunk (a few tokens)."""


def is_complete_chat(body: JSONObject) -> bool:
    """A successful, whole chat answer: every choice has a message and finished for a normal reason."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(
        isinstance(c, dict) and isinstance(c.get("message"), dict) and c.get("finish_reason") in COMPLETE_FINISH_REASONS
        for c in choices
    )


def is_complete_embeddings(body: JSONObject) -> bool:
    data = body.get("data")
    return isinstance(data, list) and bool(data) and all(isinstance(d, dict) and "embedding" in d for d in data)


class _Choice:
    __slots__ = ("content", "finish_reason", "function_call", "logprobs", "refusal", "role", "tool_calls")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, Any] | None = None
        self.logprobs: list[Any] | None = None
        self.finish_reason: str | None = None

    def add(self, delta: JSONObject) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.content.append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            slot = self.tool_calls.setdefault(
                int(call.get("index", 0)), {"id": None, "type": "function", "name": "", "arguments": []}
            )
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            function = call.get("function") or {}
            if function.get("name"):
                slot["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                slot["arguments"].append(function["arguments"])
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            fc = self.function_call = self.function_call or {"name": "", "arguments": ""}
            fc["name"] += legacy.get("name") or ""
            fc["arguments"] += legacy.get("arguments") or ""

    def message(self) -> JSONObject:
        message: JSONObject = {
            "role": self.role,
            "content": "".join(self.content) if self.content or not (self.tool_calls or self.function_call) else None,
            "refusal": "".join(self.refusal) if self.refusal else None,
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": slot["id"],
                    "type": slot["type"],
                    "function": {"name": slot["name"], "arguments": "".join(slot["arguments"])},
                }
                for _, slot in sorted(self.tool_calls.items())
            ]
        if self.function_call:
            message["function_call"] = self.function_call
        return message


def completion_from_chunks(chunks: Iterable[JSONObject]) -> JSONObject | None:
    """Fold a stream's chunks into the ``chat.completion`` it stands for; None if there were no choices."""
    head: JSONObject | None = None
    choices: dict[int, _Choice] = {}
    usage: JSONObject | None = None
    for chunk in chunks:
        if head is None:
            head = chunk
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for raw in chunk.get("choices") or ():
            choice = choices.setdefault(int(raw.get("index", 0)), _Choice())
            if isinstance(raw.get("delta"), dict):
                choice.add(raw["delta"])
            if raw.get("finish_reason"):
                choice.finish_reason = raw["finish_reason"]
            logprobs = raw.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                choice.logprobs = (choice.logprobs or []) + logprobs["content"]
    if head is None or not choices:
        return None
    body: JSONObject = {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": [
            {
                "index": index,
                "message": choice.message(),
                "logprobs": {"content": choice.logprobs} if choice.logprobs is not None else None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in sorted(choices.items())
        ],
    }
    if head.get("system_fingerprint") is not None:
        body["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        body["usage"] = usage
    return body


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut after whitespace where there is some."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def chunks_from_completion(body: JSONObject, include_usage: bool) -> list[JSONObject]:
    """The ``chat.completion.chunk`` objects a provider would have streamed for ``body``."""
    head: JSONObject = {
        "id": body.get("id"),
        "object": "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    if body.get("system_fingerprint") is not None:
        head["system_fingerprint"] = body["system_fingerprint"]

    def chunk(index: int, delta: JSONObject, finish_reason: str | None = None, logprobs: Any = None) -> JSONObject:
        choice: JSONObject = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    out: list[JSONObject] = []
    for choice in body.get("choices") or ():
        index = int(choice.get("index", 0))
        message = choice.get("message") or {}
        logprobs = choice.get("logprobs")
        content = message.get("content")
        opening = {"role": message.get("role", "assistant"), "content": "" if isinstance(content, str) else None}
        out.append(chunk(index, opening))
        if isinstance(content, str):
            for i, piece in enumerate(pieces(content)):
                out.append(chunk(index, {"content": piece}, logprobs=logprobs if i == 0 else None))
        if isinstance(message.get("refusal"), str):
            out.extend(chunk(index, {"refusal": piece}) for piece in pieces(message["refusal"]))
        for n, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            opening = {
                "index": n,
                "id": call.get("id"),
                "type": call.get("type", "function"),
                "function": {"name": function.get("name", ""), "arguments": ""},
            }
            out.append(chunk(index, {"tool_calls": [opening]}))
            for piece in pieces(function.get("arguments") or ""):
                out.append(chunk(index, {"tool_calls": [{"index": n, "function": {"arguments": piece}}]}))
        if isinstance(message.get("function_call"), dict):
            out.append(chunk(index, {"function_call": message["function_call"]}))
        out.append(chunk(index, {}, choice.get("finish_reason")))
    if include_usage and isinstance(body.get("usage"), dict):
        out.append({**head, "choices": [], "usage": body["usage"]})
    return out


def split_embeddings(body: JSONObject, counts: list[int], weights: list[int]) -> list[JSONObject] | None:
    """One embeddings answer for many requests' inputs, cut back into one answer per request: request i had
    ``counts[i]`` inputs, in order, and gets their vectors re-indexed from 0. ``usage`` is shared out in
    proportion to ``weights`` (the requests' input characters; the parts add up to the whole). None when the
    answer does not hold exactly one vector per input."""
    data = body.get("data")
    if not isinstance(data, list) or len(data) != sum(counts) or not all(isinstance(d, dict) for d in data):
        return None
    ordered = sorted(data, key=lambda d: int(d.get("index", 0)))
    if [int(d.get("index", 0)) for d in ordered] != list(range(len(ordered))):
        return None
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    shares = {
        name: _apportion(int(usage.get(name) or 0), weights)
        for name in ("prompt_tokens", "total_tokens")
        if usage is not None and name in usage
    }
    parts: list[JSONObject] = []
    start = 0
    for i, count in enumerate(counts):
        part: JSONObject = {k: v for k, v in body.items() if k not in ("data", "usage")}
        part["data"] = [{**d, "index": n} for n, d in enumerate(ordered[start : start + count])]
        if usage is not None:
            part["usage"] = {**usage, **{name: values[i] for name, values in shares.items()}}
        parts.append(part)
        start += count
    return parts


def _apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` in whole parts proportional to ``weights`` (largest remainders), adding up to ``total``."""
    weight = sum(weights)
    if weight <= 0:
        weights, weight = [1] * len(weights), len(weights)
    exact = [total * w / weight for w in weights]
    parts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts


def replay(body: JSONObject, include_usage: bool, usage: Usage | None) -> ChunkStream:
    """A whole chat completion delivered as a stream (a cache hit, or a streaming follower of a whole answer)."""
    return ChunkStream(_yield_all(chunks_from_completion(body, include_usage)), usage)


async def _yield_all(chunks: list[JSONObject]) -> AsyncGenerator[JSONObject, None]:
    for chunk in chunks:
        yield chunk
