"""What the pipeline answers: a whole completion, a stream of chunks, or embeddings."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import orjson

from atajo.types import JSONObject


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: JSONObject | None) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0))

    def to_openai(self) -> JSONObject:
        out: JSONObject = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


class Completion:
    """A whole answer; ``body`` is an OpenAI ``chat.completion`` or embeddings ``list`` object.

    An answer from the cache comes as ``raw``, the body's JSON bytes, and is sent as they are: decoding a
    stored answer only to encode it again was most of a cache hit's own cost. ``body`` decodes ``raw`` when
    a stage asks for it; treat it as read-only then (assigning a new ``body`` drops ``raw``).
    """

    __slots__ = ("_body", "raw", "usage")

    def __init__(self, body: JSONObject | None = None, usage: Usage | None = None, *, raw: bytes | None = None) -> None:
        if body is None and raw is None:
            raise ValueError("a Completion needs a body or its raw bytes")
        self._body = body
        self.raw = raw
        self.usage = usage

    @property
    def body(self) -> JSONObject:
        if self._body is None:
            assert self.raw is not None
            self._body = orjson.loads(self.raw)
        return self._body

    @body.setter
    def body(self, value: JSONObject) -> None:
        self._body = value
        self.raw = None

    def __repr__(self) -> str:
        return f"Completion(usage={self.usage!r}, raw={self.raw is not None})"


@dataclass(slots=True)
class ChunkStream:
    """An answer being streamed: ``chunks`` yields OpenAI ``chat.completion.chunk`` objects.

    ``usage`` is filled in by whoever makes the stream, as the chunk that reports it goes by (the upstream stage,
    coalescing's relay) or at once (a replayed answer): the stages above read it when the stream ends, none
    parses the chunks' usage again.
    """

    chunks: AsyncGenerator[JSONObject, None]
    usage: Usage | None = None


Result = Completion | ChunkStream
