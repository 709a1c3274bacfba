"""The cache key: every field is decided, equal requests share a key, answer-affecting ones never do."""

from __future__ import annotations

from typing import Any

import pytest

from atajo.core.cache_key import (
    CHAT_KEY_FIELDS,
    CHAT_NOT_KEY_FIELDS,
    EMBEDDINGS_KEY_FIELDS,
    EMBEDDINGS_NOT_KEY_FIELDS,
    cache_key,
)
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.server import parse
from atajo.server.openapi import openapi_document


def chat(**body: Any) -> ChatRequest:
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse.parse_chat(body)


def key(request: ChatRequest | EmbeddingsRequest, tenant: str = "t1", namespace: str = "default") -> str:
    return cache_key(request, tenant, namespace)


def test_every_chat_field_the_gateway_knows_is_decided() -> None:
    """A new field in the parser or in the OpenAPI document must be put in the key list or the not-key list."""
    known = set(parse._CHAT_FIELDS) | {"model", "messages"}
    operation = openapi_document()["paths"]["/v1/chat/completions"]["post"]
    known |= set(operation["requestBody"]["content"]["application/json"]["schema"]["properties"])
    undecided = known - CHAT_KEY_FIELDS - CHAT_NOT_KEY_FIELDS
    assert not undecided, f"decide whether these fields change the answer: {sorted(undecided)}"
    assert not CHAT_KEY_FIELDS & CHAT_NOT_KEY_FIELDS


def test_every_embeddings_field_is_decided() -> None:
    known = {"model", "input", "encoding_format", "dimensions", "user"}
    assert not known - EMBEDDINGS_KEY_FIELDS - EMBEDDINGS_NOT_KEY_FIELDS
    assert not EMBEDDINGS_KEY_FIELDS & EMBEDDINGS_NOT_KEY_FIELDS


def test_field_order_and_delivery_fields_do_not_change_the_key() -> None:
    a = chat(temperature=0.2, seed=7)
    b = parse.parse_chat(
        {
            "seed": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone-else",
            "metadata": {"trace": "x"},
            "messages": [{"content": "hi", "role": "user"}],
            "temperature": 0.2,
            "model": "gpt-4o-mini",
        }
    )
    assert key(a) == key(b)


def test_integer_and_float_spellings_of_a_number_match_and_nulls_are_absent() -> None:
    assert key(chat(temperature=1)) == key(chat(temperature=1.0))
    assert key(chat(top_p=None)) == key(chat())


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]},
        {"temperature": 0.3},
        {"max_tokens": 5},
        {"seed": 8},
        {"n": 2},
        {"stop": ["\n"]},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"logprobs": True},
        {"some_future_parameter": 1},  # unknown fields count: a miss, never a wrong answer
    ],
)
def test_answer_affecting_fields_change_the_key(change: dict[str, Any]) -> None:
    assert key(chat(**change)) != key(chat())


def test_key_is_scoped_by_tenant_namespace_and_model() -> None:
    base = key(chat())
    assert key(chat(), tenant="t2") != base
    assert key(chat(), namespace="support") != base
    assert key(chat(model="gpt-4o")) != base
    assert base.startswith("t1/default/gpt-4o-mini/v2-")


def test_model_names_with_slashes_cannot_escape_their_key_segment() -> None:
    k = key(chat(model="meta-llama/Llama-3"))
    assert k.split("/")[2] == "meta-llama%2FLlama-3"


def test_chat_and_embeddings_never_share_a_key() -> None:
    e = parse.parse_embeddings({"model": "m", "input": "hi"})
    e2 = parse.parse_embeddings({"model": "m", "input": "hi", "user": "u"})
    assert key(e) == key(e2)
    assert key(e) != key(parse.parse_embeddings({"model": "m", "input": "hi", "dimensions": 8}))


def test_semantic_query_separates_the_asked_text_from_the_exact_conditions() -> None:
    from atajo.core.cache_key import semantic_query

    def chat(messages: list[Any], **extra: Any) -> ChatRequest:
        return ChatRequest("m", {"model": "m", "messages": messages, **extra})

    user = {"role": "user", "content": "  How do I reset my password? "}
    text, digest = semantic_query(chat([user])) or ("", "")
    assert text == "How do I reset my password?"
    # Only the last user turn's wording may differ inside one partition.
    assert semantic_query(chat([{"role": "user", "content": "other words"}]))[1] == digest  # type: ignore[index]
    system = {"role": "system", "content": "You are terse."}
    assert semantic_query(chat([system, user]))[1] != digest  # type: ignore[index]
    assert semantic_query(chat([user], temperature=0.5))[1] != digest  # type: ignore[index]
    assert semantic_query(chat([user], tools=[{"type": "function", "function": {"name": "f"}}]))[1] != digest  # type: ignore[index]
    assert semantic_query(chat([user], user="someone"))[1] == digest  # type: ignore[index]  # not answer-affecting
    parts = {"role": "user", "content": [{"type": "text", "text": "How do I"}, {"type": "text", "text": "reset it?"}]}
    assert semantic_query(chat([parts])) is not None
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    assert (
        semantic_query(chat([{"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}])) is None
    )
    assert semantic_query(chat([user, {"role": "assistant", "content": "hi"}])) is None
    assert semantic_query(chat([{"role": "user", "content": "   "}])) is None
    assert semantic_query(EmbeddingsRequest("e", {"model": "e", "input": "x"})) is None


def test_one_serialization_gives_the_exact_key_and_the_same_semantic_partition_as_before() -> None:
    import hashlib

    import orjson

    from atajo.core.cache_key import ASKED_PLACEHOLDER, request_key

    system = {"role": "system", "content": "You are terse."}
    asked = chat(messages=[system, {"role": "user", "content": "  Reset my password? "}], temperature=0)
    keys = request_key(asked, "t1", "default")
    assert keys.key == key(asked) and keys.asked == "Reset my password?"
    # The partition digest is the one the semantic tier's stored entries were filed under (v1, unchanged).
    rest = [system, {"role": "user", "content": ASKED_PLACEHOLDER}]
    canonical = orjson.dumps(["v1", "chat", {"messages": rest, "temperature": 0.0}], option=orjson.OPT_SORT_KEYS)
    assert keys.partition == hashlib.sha256(canonical).hexdigest()[:40]
    # Still an exact key: any difference in the asked content (spacing, parts) is another key, same partition.
    for content in ("Reset my password?", [{"type": "text", "text": "  Reset my password? "}]):
        same_but = chat(messages=[system, {"role": "user", "content": content}], temperature=0)
        other = request_key(same_but, "t1", "default")
        assert other.key != keys.key and other.partition == keys.partition
    # The placeholder written by a client is only text: it cannot make two different bodies share a key.
    spoof = chat(messages=[system, {"role": "user", "content": ASKED_PLACEHOLDER}], temperature=0)
    assert request_key(spoof, "t1", "default").key != keys.key
    # Without an asked text (last turn not the user's) the whole body is the key, and there is no partition.
    whole = request_key(chat(messages=[system, {"role": "assistant", "content": "hi"}]), "t1", "default")
    assert whole.asked is None and whole.partition is None and whole.key.startswith("t1/default/gpt-4o-mini/v2-")
