"""What the pipeline answers: a whole completion, a stream of chunks, or embeddings."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

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


@dataclass(slots=True)
class Completion:
    """A whole answer; ``body`` is an OpenAI ``chat.completion`` or embeddings ``list`` object."""

    body: JSONObject
    usage: Usage | None = None


@dataclass(slots=True)
class ChunkStream:
    """An answer being streamed: ``chunks`` yields OpenAI ``chat.completion.chunk`` objects.

    ``usage`` is filled in as the chunk that reports it goes by (the observe stage watches them).
    """

    chunks: AsyncGenerator[JSONObject, None]
    usage: Usage | None = None


Result = Completion | ChunkStream
