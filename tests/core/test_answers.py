"""Answers folded from streams and unfolded into streams: what the cache stores and replays."""

from __future__ import annotations

from typing import Any

from atajo.core.answers import (
    chunks_from_completion,
    completion_from_chunks,
    is_complete_chat,
    is_complete_embeddings,
    pieces,
    split_embeddings,
)


def completion(**message: Any) -> dict[str, Any]:
    message.setdefault("role", "assistant")
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
    }


def test_pieces_cut_at_spaces_and_lose_nothing() -> None:
    text = "The quick brown fox jumps over the lazy dog, " * 7 + "end"
    parts = list(pieces(text, 24))
    assert "".join(parts) == text
    assert len(parts) > 5
    assert all(len(p) <= 24 for p in parts)
    assert all(p.endswith(" ") for p in parts[:-1])
    assert list(pieces("x" * 60, 24)) == ["x" * 24, "x" * 24, "x" * 12]  # no space: hard cuts
    assert list(pieces("")) == []


def test_text_answer_round_trips_through_a_stream() -> None:
    body = completion(content="Paris is the capital of France, and it has been for a very long time.", refusal=None)
    chunks = chunks_from_completion(body, include_usage=True)
    assert len(chunks) > 4, "replayed as a stream of pieces, not one blob"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 14
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    folded = completion_from_chunks(chunks)
    assert folded == {**body, "object": "chat.completion"}


def test_usage_chunk_only_when_asked() -> None:
    chunks = chunks_from_completion(completion(content="hi"), include_usage=False)
    assert all(c["choices"] for c in chunks)


def test_tool_calls_round_trip_with_arguments_in_pieces() -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}},
    ]
    body = completion(content=None, refusal=None, tool_calls=calls)
    chunks = chunks_from_completion(body, include_usage=True)
    argument_chunks = [c for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert len(argument_chunks) > len(calls)
    assert completion_from_chunks(chunks) == body


def test_several_choices_fold_by_index() -> None:
    body = completion(content="one")
    body["choices"].append(
        {
            "index": 1,
            "message": {"role": "assistant", "content": "two", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    )
    body["choices"][0]["message"]["refusal"] = None
    folded = completion_from_chunks(chunks_from_completion(body, include_usage=True))
    assert folded is not None
    assert [c["message"]["content"] for c in folded["choices"]] == ["one", "two"]
    assert [c["finish_reason"] for c in folded["choices"]] == ["stop", "length"]


def test_completeness() -> None:
    assert is_complete_chat(completion(content="x"))
    cut = completion(content="x")
    cut["choices"][0]["finish_reason"] = None
    assert not is_complete_chat(cut)
    filtered = completion(content="x")
    filtered["choices"][0]["finish_reason"] = "content_filter"
    assert not is_complete_chat(filtered)
    assert not is_complete_chat({"choices": []})
    assert is_complete_embeddings({"data": [{"embedding": [0.1]}]})
    assert not is_complete_embeddings({"data": []})
    assert completion_from_chunks([]) is None


def test_a_batched_embeddings_answer_is_cut_back_per_request_and_reindexed() -> None:
    body = {
        "object": "list",
        "model": "text-embedding-3-small",
        # out of order on purpose: the index says which input a vector belongs to
        "data": [{"object": "embedding", "index": i, "embedding": [float(i)]} for i in (2, 0, 3, 1)],
        "usage": {"prompt_tokens": 10, "total_tokens": 10},
    }
    parts = split_embeddings(body, counts=[1, 2, 1], weights=[1, 2, 2])
    assert parts is not None
    assert [[d["embedding"] for d in p["data"]] for p in parts] == [[[0.0]], [[1.0], [2.0]], [[3.0]]]
    assert [[d["index"] for d in p["data"]] for p in parts] == [[0], [0, 1], [0]]
    assert [p["usage"]["prompt_tokens"] for p in parts] == [2, 4, 4]  # in proportion to the characters
    assert sum(p["usage"]["total_tokens"] for p in parts) == 10
    assert all(p["model"] == "text-embedding-3-small" and p["object"] == "list" for p in parts)


def test_usage_shares_always_add_up_to_the_whole() -> None:
    body = {"data": [{"index": i, "embedding": []} for i in range(3)], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    parts = split_embeddings(body, counts=[1, 1, 1], weights=[1, 1, 1])
    assert parts is not None
    assert sorted(p["usage"]["prompt_tokens"] for p in parts) == [2, 2, 3]


def test_an_answer_with_the_wrong_number_of_vectors_is_not_split() -> None:
    body = {"data": [{"index": 0, "embedding": [1.0]}]}
    assert split_embeddings(body, counts=[1, 1], weights=[1, 1]) is None
    duplicated = {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]}
    assert split_embeddings(duplicated, counts=[1, 1], weights=[1, 1]) is None
