"""Requests as the pipeline sees them: validated, immutable at the top level.

The body keeps the OpenAI Chat Completions / Embeddings schema, parsed and checked by ``server/parse.py``:
that schema is the gateway's lingua franca (every client speaks it), so translating it into another tree
would cost CPU on every request and gain nothing. Provider adapters translate from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atajo.types import JSONObject


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    body: JSONObject = field(repr=False)
    stream: bool = False
    include_usage: bool = False

    operation = "chat"


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    model: str
    body: JSONObject = field(repr=False)
    stream = False

    operation = "embeddings"


Request = ChatRequest | EmbeddingsRequest
