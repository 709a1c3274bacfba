"""The cache key: a canonical fingerprint of every field that can change an answer, scoped by tenant,
namespace and model, versioned.

Fields are sorted into two explicit lists. A field in ``*_KEY_FIELDS`` is part of the fingerprint; a field in
``*_NOT_KEY_FIELDS`` cannot change the answer (who asks, how it is delivered) and is left out, so requests
that differ only there share an entry. A field in neither list (a parameter newer than this code) is kept
in the fingerprint: an unknown field costs a miss, never a wrong answer. A test fails when a field the
parser knows is in neither list.

Keys read ``{tenant}/{namespace}/{model}/{version}-{digest}``: the tenant first, so no lookup can reach
another tenant's entries, and the rest readable, so an operator can drop a model's or a namespace's
entries by key prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote

import orjson

from atajo.core.requests import Request
from atajo.types import JSON, JSONObject

KEY_VERSION = "v2"
"""Bump when the fingerprint changes meaning: old entries then simply stop matching. (v2: a request with an
asked text is keyed from its semantic partition's serialization, so the body is serialized once.)"""
PARTITION_VERSION = "v1"
"""Bump when the semantic partition's digest changes meaning (the semantic tier's entries then stop matching)."""
_SORTED = orjson.OPT_SORT_KEYS

CHAT_KEY_FIELDS = frozenset(
    {
        "messages", "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format",
        "seed", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "reasoning_effort",
        "modalities", "audio", "prediction", "web_search_options", "verbosity",
    }
)  # fmt: skip
CHAT_NOT_KEY_FIELDS = frozenset(
    {
        "model",  # scoped in the key's path instead
        "stream", "stream_options",  # delivery: a hit is replayed in whichever form is asked
        "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    }
)  # fmt: skip
EMBEDDINGS_KEY_FIELDS = frozenset({"input", "encoding_format", "dimensions"})
EMBEDDINGS_NOT_KEY_FIELDS = frozenset({"model", "user"})

# Numbers whose integer and float spellings mean the same (temperature 1 == 1.0).
_FLOAT_FIELDS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})

_NOT_KEY = {"chat": CHAT_NOT_KEY_FIELDS, "embeddings": EMBEDDINGS_NOT_KEY_FIELDS}

ASKED_PLACEHOLDER = "\x00atajo:asked\x00"
"""Stands in for the asked text in the semantic partition's fingerprint."""


def _fields(request: Request) -> dict[str, JSON]:
    """The request's answer-affecting fields, as they go into a fingerprint (no nulls, numbers as floats)."""
    not_key = _NOT_KEY[request.operation]
    fields: dict[str, JSON] = {}
    body: JSONObject = request.body
    for name, value in body.items():
        if value is None or name in not_key:
            continue
        fields[name] = float(value) if name in _FLOAT_FIELDS and isinstance(value, int) else value
    return fields


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:40]


def fingerprint(request: Request) -> str:
    """A hex digest of the request's answer-affecting fields, in canonical JSON (sorted keys, no nulls)."""
    return request_key(request, "", "").key.rpartition("-")[2]


@dataclass(frozen=True, slots=True)
class RequestKey:
    """A request's exact cache key and, when it has one, what the semantic tier matches on."""

    key: str
    asked: str | None = None
    """The asked text (the last user message's, stripped), or None: nothing the semantic tier can match on."""
    partition: str | None = None
    """A digest of every other answer-affecting field (the semantic tier's exact condition)."""


def request_key(request: Request, tenant: str, namespace: str) -> RequestKey:
    """The full key (``tenant`` and ``namespace`` are validated names, no ``/``) and the semantic parts, from
    one canonical serialization of the body.

    A request with an asked text is serialized once with the placeholder in place of the last message's
    content: that digest is the semantic partition, and the exact key hashes the same bytes followed by the
    content's own JSON (which, with the placeholder's known place, spells the whole body: still exact).
    """
    path = f"{tenant}/{namespace}/{quote(request.model, safe='')}/{KEY_VERSION}-"
    fields = _fields(request)
    asked = _asked(request)
    if asked is None:
        return RequestKey(path + _digest(orjson.dumps([KEY_VERSION, request.operation, fields], option=_SORTED)))
    text, last = asked
    messages = fields["messages"]
    assert isinstance(messages, list)
    rest = {name: value for name, value in last.items() if name != "content"}
    fields["messages"] = [*messages[:-1], rest | {"content": ASKED_PLACEHOLDER}]
    canonical = orjson.dumps([PARTITION_VERSION, request.operation, fields], option=_SORTED)
    content = orjson.dumps(last.get("content"), option=_SORTED)
    return RequestKey(path + _digest(canonical + b"\x00" + content), text, _digest(canonical))


def cache_key(request: Request, tenant: str, namespace: str) -> str:
    """The full key; ``tenant`` and ``namespace`` are validated names (no ``/``)."""
    return request_key(request, tenant, namespace).key


def semantic_query(request: Request) -> tuple[str, str] | None:
    """For the semantic tier: (the asked text, a digest of everything else that can change the answer).

    The asked text is the last message's, when that message is the user's and holds only text. Every other
    answer-affecting field (system prompt, earlier turns, tools, parameters) goes into the digest, so it is
    an exact condition of a semantic match: only the asked wording may differ. ``None`` when the request
    has nothing to match on (not chat, last turn not the user's, images or audio in it, empty text).
    """
    key = request_key(request, "", "")
    return None if key.asked is None or key.partition is None else (key.asked, key.partition)


def _asked(request: Request) -> tuple[str, JSONObject] | None:
    """(the asked text, the last message) when the last message is the user's and holds only text."""
    if request.operation != "chat":
        return None
    messages = request.body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            parts.append(part["text"])
        text = "\n".join(parts)
    else:
        return None
    text = text.strip()
    return (text, last) if text else None
