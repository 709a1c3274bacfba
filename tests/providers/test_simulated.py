"""The simulated provider: deterministic, well-formed answers that honour the request's parameters, a latency
model seen through a recording sleep, and injected faults."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from atajo.core.catalog import Catalog
from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.core.results import Completion
from atajo.errors import UpstreamError, UpstreamRejected, UpstreamStreamBroken, UpstreamUnavailable
from atajo.providers.simulated import FINGERPRINT, SimulatedProvider, count_tokens, prompt_tokens
from atajo.settings import DeploymentSettings, PoolSettings
from atajo.types import JSONObject

MESSAGES: list[JSONObject] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does a gateway do?"},
]
WEATHER_TOOL: JSONObject = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "hourly": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def provider() -> tuple[SimulatedProvider, RecordingSleep]:
    sleep = RecordingSleep()
    return SimulatedProvider(Catalog.bundled(), sleep), sleep


def deployment(**simulated: Any) -> Deployment:
    settings = DeploymentSettings.model_validate({"provider": "simulated", "simulated": {"jitter": 0, **simulated}})
    return Deployment.from_settings("m", 0, settings, PoolSettings())


def chat(**body: Any) -> ChatRequest:
    stream = bool(body.get("stream"))
    return ChatRequest(model="m", body={"model": "m", "messages": MESSAGES, **body}, stream=stream)


async def complete(request: ChatRequest, dep: Deployment | None = None, model: str = "gpt-4o-mini") -> JSONObject:
    sim, _ = provider()
    return (await sim.chat(request, dep or deployment(), model)).body


async def stream(request: ChatRequest, dep: Deployment | None = None, model: str = "gpt-4o-mini") -> list[JSONObject]:
    sim, _ = provider()
    return [chunk async for chunk in sim.chat_stream(request, dep or deployment(), model)]


def content(body: JSONObject, choice: int = 0) -> str:
    text = body["choices"][choice]["message"]["content"]
    assert isinstance(text, str)
    return text


def streamed_text(chunks: list[JSONObject]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- answers ------------------------------------------------------------------------------------------


async def test_answer_is_labelled_and_deterministic() -> None:
    a = await complete(chat())
    b = await complete(chat())
    a.pop("created"), b.pop("created")
    assert a == b
    assert a["object"] == "chat.completion" and a["model"] == "gpt-4o-mini"
    assert a["system_fingerprint"] == FINGERPRINT and str(a["id"]).startswith("chatcmpl-sim-")
    assert content(a).startswith("[simulated gpt-4o-mini] ")
    assert a["choices"][0]["finish_reason"] == "stop"


async def test_answer_depends_on_messages_seed_and_model() -> None:
    base = content(await complete(chat()))
    assert content(await complete(chat(seed=1))) != base
    assert content(await complete(chat(seed=1))) == content(await complete(chat(seed=1)))
    other = ChatRequest(model="m", body={"model": "m", "messages": [{"role": "user", "content": "Something else"}]})
    assert content(await complete(other)) != base
    assert content(await complete(chat(), model="gpt-4o")) != base


async def test_usage_counts_prompt_and_completion() -> None:
    body = await complete(chat())
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens(MESSAGES) > 10
    assert usage["completion_tokens"] == count_tokens(content(body)) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_output_length_follows_the_deployment() -> None:
    short = await complete(chat(), deployment(output_tokens=5))
    long = await complete(chat(), deployment(output_tokens=300))
    assert short["usage"]["completion_tokens"] <= 8
    assert long["usage"]["completion_tokens"] >= 150


async def test_n_choices() -> None:
    one = await complete(chat())
    three = await complete(chat(n=3))
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert all(content(three, i) == content(one) for i in range(3))
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]


async def test_stop_sequences_cut_the_answer() -> None:
    full = content(await complete(chat()))
    assert full.startswith("[simulated gpt-4o-mini] ")
    body = await complete(chat(stop=["]", "never there"]))
    assert content(body) == "[simulated gpt-4o-mini"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == count_tokens("[simulated gpt-4o-mini")
    assert content(await complete(chat(stop="mini"))) == "[simulated gpt-4o-"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_with_finish_reason_length(field: str) -> None:
    body = await complete(chat(**{field: 5}))
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] <= 5
    assert content(await complete(chat())).startswith(content(body))


async def test_generous_max_tokens_does_not_cut() -> None:
    body = await complete(chat(max_tokens=4096))
    assert body["choices"][0]["finish_reason"] == "stop"
    assert content(body) == content(await complete(chat()))


async def test_tools_give_tool_calls_with_schema_shaped_arguments() -> None:
    body = await complete(chat(tools=[WEATHER_TOOL]))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "weather"
    assert str(call["id"]).startswith("call_sim_")
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"city", "days", "unit", "hourly"}
    assert isinstance(args["city"], str) and isinstance(args["days"], int) and isinstance(args["hourly"], bool)
    assert args["unit"] == "celsius"
    assert body["usage"]["completion_tokens"] > 0


async def test_tool_choice() -> None:
    other = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}}
    named = await complete(
        chat(tools=[WEATHER_TOOL, other], tool_choice={"type": "function", "function": {"name": "time"}})
    )
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "time"
    none = await complete(chat(tools=[WEATHER_TOOL], tool_choice="none"))
    assert none["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in none["choices"][0]["message"]
    after_tool = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    answered = await complete(
        ChatRequest(model="m", body={"model": "m", "messages": after_tool, "tools": [WEATHER_TOOL]})
    )
    assert answered["choices"][0]["finish_reason"] == "stop"  # the tool's result is in: answer in words
    required = ChatRequest(
        model="m", body={"model": "m", "messages": after_tool, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    )
    assert (await complete(required))["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_object_is_valid_json() -> None:
    body = await complete(chat(response_format={"type": "json_object"}))
    parsed = json.loads(content(body))
    assert isinstance(parsed, dict) and parsed
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == count_tokens(content(body))


async def test_json_schema_output_follows_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {"type": "object", "properties": {"zip": {"type": ["string", "null"]}}},
        },
        "required": ["name", "age"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    body = await complete(chat(response_format=fmt))
    parsed = json.loads(content(body))
    assert set(parsed) == {"name", "age", "score", "tags", "address"}
    assert isinstance(parsed["name"], str) and isinstance(parsed["age"], int) and isinstance(parsed["score"], float)
    assert isinstance(parsed["tags"], list) and all(isinstance(t, str) for t in parsed["tags"])
    assert isinstance(parsed["address"]["zip"], str)
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {
                    "type": "object",
                    "properties": {
                        "a": {"type": "string"},
                        "b": {"type": "string"},
                        "c": {"type": "string"},
                        "d": {"type": "string"},
                    },
                },
            },
        },
    ],
    ids=["json_object", "json_schema"],
)
async def test_json_that_does_not_fit_max_tokens_is_cut_like_any_answer(fmt: JSONObject) -> None:
    body = await complete(chat(response_format=fmt, max_tokens=3))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] <= 3


async def test_json_that_fits_max_tokens_is_whole() -> None:
    body = await complete(chat(response_format={"type": "json_object"}, max_tokens=400))
    assert body["choices"][0]["finish_reason"] == "stop" and json.loads(content(body))
    assert body["usage"]["completion_tokens"] <= 400


# --- streams ------------------------------------------------------------------------------------------


async def test_stream_says_what_the_completion_says() -> None:
    whole = await complete(chat(n=2))
    chunks = await stream(chat(n=2, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == whole["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(chunks) == content(whole)
    finish = chunks[-2]
    assert [c["finish_reason"] for c in finish["choices"]] == ["stop", "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


async def test_stream_of_tool_calls() -> None:
    chunks = await stream(chat(tools=[WEATHER_TOOL], stream=True))
    calls = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert len(calls) == 1 and calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "weather"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_stream_with_max_tokens_ends_with_length() -> None:
    chunks = await stream(chat(max_tokens=4, stream=True))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] <= 4


# --- embeddings ---------------------------------------------------------------------------------------


async def embed(**body: Any) -> Completion:
    sim, _ = provider()
    request = EmbeddingsRequest(model="e", body={"model": "e", **body})
    return await sim.embeddings(request, deployment(), "text-embedding-3-small")


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    result = await embed(input=["hello", "world", "hello"])
    data = result.body["data"]
    assert [d["index"] for d in data] == [0, 1, 2] and all(d["object"] == "embedding" for d in data)
    vectors = [d["embedding"] for d in data]
    assert all(len(v) == 256 for v in vectors)
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert vectors[0] == (await embed(input="hello")).body["data"][0]["embedding"]
    assert result.body["object"] == "list" and result.body["model"] == "text-embedding-3-small"
    assert result.usage is not None and result.usage.prompt_tokens == result.body["usage"]["prompt_tokens"] == 6


async def test_embeddings_as_base64_are_the_same_float32_vector() -> None:
    floats = (await embed(input="hello")).body["data"][0]["embedding"]
    encoded = (await embed(input="hello", encoding_format="base64")).body["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = struct.unpack(f"<{len(floats)}f", base64.b64decode(encoded))
    assert decoded == pytest.approx(floats, abs=1e-6)


async def test_embeddings_dimensions_and_token_input() -> None:
    small = await embed(input="hello", dimensions=8)
    assert len(small.body["data"][0]["embedding"]) == 8
    tokens = await embed(input=[1, 2, 3, 4])
    assert len(tokens.body["data"]) == 1 and tokens.body["usage"]["prompt_tokens"] == 4
    many = await embed(input=[[1, 2], [3, 4, 5]])
    assert len(many.body["data"]) == 2 and many.body["usage"]["prompt_tokens"] == 5


# --- the latency model --------------------------------------------------------------------------------


async def test_latency_from_the_catalog() -> None:
    sim, sleep = provider()
    catalog = Catalog.bundled().get("gpt-4o-mini")
    assert catalog is not None and (catalog.ttft_ms, catalog.tokens_per_s) == (300, 110)
    body = (await sim.chat(chat(), deployment(), "gpt-4o-mini")).body
    tokens = body["usage"]["completion_tokens"]
    assert sleep.delays == [pytest.approx(0.3 + (tokens - 1) / 110)]

    sleep.delays.clear()
    chunks = [c async for c in sim.chat_stream(chat(stream=True), deployment(), "gpt-4o-mini")]
    first, *rest = sleep.delays
    assert first == pytest.approx(0.3)  # time to first token
    assert rest and all(d / (1 / 110) == pytest.approx(round(d * 110)) for d in rest)  # whole tokens' worth
    assert sum(rest) == pytest.approx((tokens - 1) / 110)  # a stream ends when the whole answer would arrive
    assert len(rest) <= len(chunks) - 3  # the role, finish and usage chunks carry no tokens


async def test_latency_from_the_deployment() -> None:
    sim, sleep = provider()
    dep = deployment(ttft_ms=50, tokens_per_s=20, slow_stream_factor=3)
    body = (await sim.chat(chat(), dep, "gpt-4o-mini")).body  # the deployment's figures beat the catalog's
    tokens = body["usage"]["completion_tokens"]
    assert sleep.delays == [pytest.approx(0.05 + (tokens - 1) * 3 / 20)]
    sleep.delays.clear()
    _ = [c async for c in sim.chat_stream(chat(stream=True), dep, "gpt-4o-mini")]
    assert sleep.delays[0] == pytest.approx(0.05)
    assert sum(sleep.delays[1:]) == pytest.approx((tokens - 1) * 3 / 20)


async def test_latency_of_a_model_not_in_the_catalog_uses_the_defaults() -> None:
    sim, sleep = provider()
    body = (await sim.chat(chat(), deployment(), "my-finetune")).body
    tokens = body["usage"]["completion_tokens"]
    assert sleep.delays == [pytest.approx(0.25 + (tokens - 1) / 80)]  # ttft_ms 250, 80 tokens/s


async def test_n_does_not_lengthen_the_wait() -> None:
    sim, sleep = provider()
    await sim.chat(chat(), deployment(), "gpt-4o-mini")
    await sim.chat(chat(n=4), deployment(), "gpt-4o-mini")
    assert sleep.delays[0] == sleep.delays[1]


async def test_embeddings_latency_is_the_catalogs() -> None:
    sim, sleep = provider()
    await sim.embeddings(
        EmbeddingsRequest(model="e", body={"model": "e", "input": "x"}), deployment(), "text-embedding-3-small"
    )
    assert sleep.delays == [pytest.approx(0.06)]


async def test_jitter_stays_within_its_spread() -> None:
    sim, sleep = provider()
    dep = deployment(jitter=0.5, ttft_ms=100, tokens_per_s=1000)
    for seed in range(40):
        await sim.chat(chat(seed=seed, max_tokens=1), dep, "x")
    assert all(0.05 <= d <= 0.15 for d in sleep.delays)
    assert len(set(sleep.delays)) > 30


# --- faults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "client_status"),
    [
        (503, UpstreamUnavailable, 502),
        (500, UpstreamUnavailable, 502),
        (429, UpstreamUnavailable, 429),
        (400, UpstreamRejected, 400),
    ],
)
async def test_error_rate_one_always_fails_with_the_configured_status(
    status: int, kind: type[UpstreamError], client_status: int
) -> None:
    sim, _ = provider()
    dep = deployment(error_rate=1.0, error_status=status)
    for _ in range(5):
        with pytest.raises(kind) as info:
            await sim.chat(chat(), dep, "x")
        assert info.value.status == client_status
        if isinstance(info.value, UpstreamUnavailable):
            assert info.value.upstream_status == status and info.value.retryable
    with pytest.raises(kind):
        await anext(sim.chat_stream(chat(stream=True), dep, "x"))  # before the first chunk
    with pytest.raises(kind):
        await sim.embeddings(EmbeddingsRequest(model="e", body={"model": "e", "input": "x"}), dep, "x")


async def test_error_rate_is_a_seeded_rate() -> None:
    def outcomes(sim: SimulatedProvider) -> list[bool]:
        return [sim._rng(dep).random() < 0.5 for _ in range(200)]  # what _maybe_fail draws

    dep = deployment(error_rate=0.5, seed=3)
    sim, _ = provider()
    failures = 0
    for _ in range(200):
        try:
            await sim.chat(chat(), dep, "x")
        except UpstreamUnavailable:
            failures += 1
    assert 70 < failures < 130
    assert outcomes(provider()[0]) == outcomes(provider()[0])  # the same seed, the same faults


async def test_drop_rate_one_drops_plain_calls() -> None:
    sim, _ = provider()
    with pytest.raises(UpstreamUnavailable, match="dropped") as info:
        await sim.chat(chat(), deployment(drop_rate=1.0), "x")
    assert info.value.retryable


@pytest.mark.parametrize(
    "body",
    [{}, {"tools": [WEATHER_TOOL]}, {"max_tokens": 1}],
    ids=["text", "tool_calls", "one_token"],
)
async def test_drop_rate_one_breaks_streams_midway(body: JSONObject) -> None:
    sim, _ = provider()
    request = chat(stream=True, **body)
    whole = [c async for c in sim.chat_stream(request, deployment(), "x")]
    got: list[JSONObject] = []
    broken = sim.chat_stream(request, deployment(drop_rate=1.0), "x")
    with pytest.raises(UpstreamStreamBroken):  # noqa: PT012  # the chunks before the failure matter too
        async for chunk in broken:
            got.append(chunk)
    assert 1 <= len(got) < len(whole)  # after the first chunk, before the end
    assert got == whole[: len(got)]
