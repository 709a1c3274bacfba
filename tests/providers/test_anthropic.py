"""The Anthropic translation, both ways, as pure functions; and the adapter against a local Anthropic server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.errors import (
    InvalidRequest,
    UnsupportedParameter,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamUnavailable,
)
from atajo.providers.anthropic import AnthropicProvider
from atajo.providers.anthropic_translate import (
    StreamTranslator,
    from_anthropic,
    to_anthropic,
    usage_from_anthropic,
)
from atajo.providers.http import error_message
from atajo.providers.pool import HttpPool
from atajo.settings import DeploymentSettings, PoolSettings
from atajo.types import JSONObject
from tests.upstreams.anthropic_server import AnthropicUpstream, Fault, stream_events
from tests.upstreams.live import LiveServer

USER = {"role": "user", "content": "hi"}


def translate(**body: Any) -> JSONObject:
    body.setdefault("messages", [USER])
    return to_anthropic(body, "claude-x", stream=False).body


# --- request ---------------------------------------------------------------------------------------


def test_minimal_request_gets_the_required_max_tokens() -> None:
    assert translate() == {
        "model": "claude-x",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 4096,
    }


def test_system_and_developer_messages_become_one_top_level_system() -> None:
    body = translate(
        messages=[
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
            },
            USER,
            {"role": "developer", "content": "Use metric units."},
        ]
    )
    assert body["system"] == "Be terse.\nBe kind.\n\nUse metric units."
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_system_message_with_an_image_is_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    with pytest.raises(InvalidRequest) as info:
        translate(messages=[{"role": "system", "content": [image]}, USER])
    assert info.value.param == "messages[0].content[0]"


def test_tool_results_merge_into_one_user_turn_with_the_next_user_message() -> None:
    calls = [
        {"id": "t1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Lima"}'}},
        {"id": "t2", "type": "function", "function": {"name": "clock", "arguments": ""}},
    ]
    body = translate(
        messages=[
            USER,
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "t1", "content": "18 C"},
            {"role": "tool", "tool_call_id": "t2", "content": ""},
            {"role": "user", "content": "and tomorrow?"},
        ]
    )
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Lima"}},
                {"type": "tool_use", "id": "t2", "name": "clock", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "18 C"},
                {"type": "tool_result", "tool_use_id": "t2"},
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]


def test_consecutive_user_messages_merge_and_empty_ones_vanish() -> None:
    body = translate(messages=[USER, {"role": "user", "content": ""}, {"role": "user", "content": "again"}])
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}
    ]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_tool_call_arguments_must_be_a_json_object(arguments: str) -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(InvalidRequest) as info:
        translate(messages=[USER, {"role": "assistant", "tool_calls": [call]}])
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


def test_tool_message_without_call_id_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        translate(messages=[USER, {"role": "tool", "content": "x"}])
    assert info.value.param == "messages[1].tool_call_id"


def test_assistant_refusal_parts_are_kept_as_text() -> None:
    body = translate(messages=[USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}])
    assert body["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "No."}]}


def test_images_and_pdf_files() -> None:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
    ]
    body = translate(messages=[{"role": "user", "content": parts}])
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
    ]


@pytest.mark.parametrize(
    ("part", "error"),
    [
        ({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}, InvalidRequest),
        ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, InvalidRequest),  # not base64
        ({"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}, UnsupportedParameter),
        ({"type": "file", "file": {"file_id": "file-123"}}, UnsupportedParameter),
    ],
)
def test_untranslatable_content_parts_are_refused_naming_the_part(part: JSONObject, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        translate(messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, part]}])
    assert isinstance(info.value, InvalidRequest)
    assert info.value.param is not None and info.value.param.startswith("messages[0].content[1]")


def test_tools_keep_their_schema_and_get_one_when_they_have_none() -> None:
    params = {"type": "object", "properties": {"q": {"type": "string"}}}
    body = translate(
        tools=[
            {"type": "function", "function": {"name": "search", "description": "Web", "parameters": params}},
            {"type": "function", "function": {"name": "now", "strict": True}},
        ]
    )
    assert body["tools"] == [
        {"name": "search", "description": "Web", "input_schema": params},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]


TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),  # nothing to run in parallel when no tool may be called
        (None, True, None),
    ],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: JSONObject | None) -> None:
    body = translate(tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    assert body.get("tool_choice") == expected


def test_tool_choice_without_tools_is_dropped() -> None:
    assert "tool_choice" not in translate(tool_choice="auto")


def test_unknown_tool_choice_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        translate(tools=TOOLS, tool_choice="sometimes")
    assert info.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 60}, 60),
        ({"max_tokens": 50, "max_completion_tokens": 60}, 60),
        ({}, 4096),
    ],
)
def test_max_tokens(given: JSONObject, expected: int) -> None:
    assert translate(**given)["max_tokens"] == expected


@pytest.mark.parametrize(("given", "sent"), [(0, 0), (0.4, 0.4), (1, 1), (1.5, 1), (2, 1)])
def test_temperature_is_clamped_to_anthropics_range(given: float, sent: float) -> None:
    assert translate(temperature=given)["temperature"] == sent


def test_sampling_stop_and_user() -> None:
    body = translate(top_p=0.5, top_k=20, stop="END", user="u-1")
    assert (body["top_p"], body["top_k"], body["stop_sequences"]) == (0.5, 20, ["END"])
    assert body["metadata"] == {"user_id": "u-1"}
    assert translate(stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert "stop_sequences" not in translate(stop=[])


def test_openai_only_fields_are_not_sent() -> None:
    body = translate(
        seed=1,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={"1": 2},
        stream_options={"include_usage": True},
        metadata={"team": "a"},
        store=True,
        n=1,
        response_format={"type": "text"},
    )
    assert set(body) == {"model", "messages", "max_tokens"}


def test_stream_flag_only_on_streams() -> None:
    assert to_anthropic({"messages": [USER]}, "m", stream=True).body["stream"] is True
    assert "stream" not in to_anthropic({"messages": [USER], "stream": True}, "m", stream=False).body


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_shape_changing_parameters_are_refused(extra: JSONObject, param: str) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        translate(**extra)
    assert info.value.param == param
    assert info.value.code == "unsupported_parameter"


def test_json_object_mode_forces_a_tool() -> None:
    request = to_anthropic({"messages": [USER], "response_format": {"type": "json_object"}}, "m", stream=False)
    assert request.json_tool == "json_response"
    assert request.body["tools"] == [
        {
            "name": "json_response",
            "description": request.body["tools"][0]["description"],
            "input_schema": {"type": "object"},
        }
    ]
    assert request.body["tool_choice"] == {"type": "tool", "name": "json_response"}


def test_json_schema_mode_uses_the_schema_and_its_name() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "description": "A thing", "schema": schema}}
    request = to_anthropic({"messages": [USER], "response_format": fmt}, "m", stream=False)
    assert request.json_tool == "thing"
    assert request.body["tools"] == [{"name": "thing", "description": "A thing", "input_schema": schema}]


def test_json_schema_must_describe_an_object() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "list", "schema": {"type": "array"}}}
    with pytest.raises(InvalidRequest) as info:
        translate(response_format=fmt)
    assert info.value.param == "response_format.json_schema.schema"


def test_json_mode_with_own_tools_becomes_an_instruction() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    request = to_anthropic({"messages": [USER], "tools": TOOLS, "response_format": fmt}, "m", stream=False)
    assert request.json_tool is None
    assert [t["name"] for t in request.body["tools"]] == ["f"]
    assert "tool_choice" not in request.body
    assert orjson.dumps(schema).decode() in request.body["system"]


# --- response --------------------------------------------------------------------------------------


def message(*content: JSONObject, stop_reason: str = "end_turn", **usage: int) -> JSONObject:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x-2025",
        "content": list(content),
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def test_text_blocks_are_joined() -> None:
    body, usage = from_anthropic(
        message(
            {"type": "text", "text": "Hello, "},
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "you."},
        ),
        json_tool=None,
        created=123,
        model="asked",
    )
    assert body["id"] == "msg_1" and body["object"] == "chat.completion" and body["created"] == 123
    assert body["model"] == "claude-x-2025"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, you.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert (usage.prompt_tokens, usage.completion_tokens) == (10, 5)


def test_tool_use_blocks_become_tool_calls() -> None:
    body, _ = from_anthropic(
        message(
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Lima"}},
            {"type": "tool_use", "id": "toolu_2", "name": "clock", "input": {}},
            stop_reason="tool_use",
        ),
        json_tool=None,
        created=1,
        model="m",
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # as OpenAI answers when there are only tool calls
    calls = choice["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["toolu_1", "toolu_2"]
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "weather"
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Lima"}
    assert calls[1]["function"]["arguments"] == "{}"


def test_json_tool_answer_becomes_the_content() -> None:
    body, _ = from_anthropic(
        message(
            {"type": "tool_use", "id": "t", "name": "json_response", "input": {"a": [1, 2]}}, stop_reason="tool_use"
        ),
        json_tool="json_response",
        created=1,
        model="m",
    )
    choice = body["choices"][0]
    assert orjson.loads(choice["message"]["content"]) == {"a": [1, 2]}
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        ("something_new", "stop"),
    ],
)
def test_finish_reasons(stop_reason: str, finish: str) -> None:
    body, _ = from_anthropic(
        message({"type": "text", "text": "x"}, stop_reason=stop_reason), json_tool=None, created=1, model="m"
    )
    assert body["choices"][0]["finish_reason"] == finish


def test_cache_tokens_count_as_prompt_tokens() -> None:
    usage = usage_from_anthropic(
        {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 3}
    )
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (115, 100, 3)
    assert usage.to_openai()["prompt_tokens_details"] == {"cached_tokens": 100}


def test_anthropic_error_body_message_is_extracted() -> None:
    raw = orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert error_message(raw) == ("Overloaded", None)
    openai_raw = orjson.dumps({"error": {"message": "bad", "type": "invalid_request_error", "param": "n"}})
    assert error_message(openai_raw) == ("bad", "n")


# --- stream ----------------------------------------------------------------------------------------


def run(events: list[JSONObject], json_tool: str | None = None) -> list[JSONObject]:
    translator = StreamTranslator(where="deployment d", model="asked", created=7, json_tool=json_tool)
    chunks = [chunk for event in events for chunk in translator.feed(event["type"], event)]
    assert translator.done
    return chunks


def deltas(chunks: list[JSONObject]) -> list[JSONObject]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def test_stream_text() -> None:
    events = stream_events(message({"type": "text", "text": "Hi there you"}, cache_read_input_tokens=4))
    chunks = run(events)
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"content": " there"},
        {"content": " you"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None] * 4 + ["stop"]
    assert all(c["id"] == "msg_1" and c["model"] == "claude-x-2025" and c["created"] == 7 for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 14,
        "completion_tokens": 5,  # message_delta's count, not message_start's placeholder of 1
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_stream_tool_calls_keep_their_own_indexes() -> None:
    events = stream_events(
        message(
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {"city": "Lima", "unit": "C"}},
            {"type": "tool_use", "id": "toolu_b", "name": "clock", "input": {}},
            stop_reason="tool_use",
        )
    )
    chunks = run(events)
    calls = [call for d in deltas(chunks) for call in d.get("tool_calls", ())]
    # Anthropic numbers blocks 0, 1, 2 including the text; OpenAI numbers tool calls 0, 1.
    assert [(c["index"], c.get("id")) for c in calls if "id" in c] == [(0, "toolu_a"), (1, "toolu_b")]
    assert calls[0]["function"] == {"name": "weather", "arguments": ""} and calls[0]["type"] == "function"
    arguments = {0: "", 1: ""}
    for call in calls:
        arguments[call["index"]] += call["function"]["arguments"]
    assert orjson.loads(arguments[0]) == {"city": "Lima", "unit": "C"}
    assert orjson.loads(arguments[1]) == {}
    assert all(call["function"]["arguments"] for call in calls if "id" not in call)  # no empty fragments
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_json_tool_fragments_become_content() -> None:
    events = stream_events(
        message(
            {"type": "tool_use", "id": "t", "name": "json_response", "input": {"answer": 42}}, stop_reason="tool_use"
        )
    )
    chunks = run(events, json_tool="json_response")
    assert not any("tool_calls" in d for d in deltas(chunks))
    assert orjson.loads("".join(d.get("content", "") for d in deltas(chunks))) == {"answer": 42}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_ignores_ping_and_unknown_events() -> None:
    translator = StreamTranslator(where="d", model="m", created=1)
    assert translator.feed("ping", {"type": "ping"}) == []
    assert translator.feed("future_event", {"type": "future_event", "x": 1}) == []
    delta = {"type": "thinking_delta", "thinking": "hmm"}
    assert translator.feed("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}) == []
    assert not translator.done and not translator.started


def test_busy_error_event_before_any_chunk_is_retryable() -> None:
    translator = StreamTranslator(where="deployment d", model="m", created=1)
    with pytest.raises(UpstreamUnavailable) as info:
        translator.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert info.value.retryable and info.value.upstream_status == 529
    assert "Overloaded" in info.value.message


def test_error_event_after_a_chunk_breaks_the_stream() -> None:
    translator = StreamTranslator(where="deployment d", model="m", created=1)
    translator.feed("message_start", stream_events(message({"type": "text", "text": "x"}))[0])
    with pytest.raises(UpstreamStreamBroken) as info:
        translator.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert not info.value.retryable
    assert "Overloaded" in info.value.message


def test_non_busy_error_event_breaks_the_stream_even_first() -> None:
    translator = StreamTranslator(where="deployment d", model="m", created=1)
    with pytest.raises(UpstreamStreamBroken):
        translator.feed("error", {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}})


# --- the adapter against a local Anthropic server --------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[tuple[AnthropicUpstream, LiveServer]]:
    fake = AnthropicUpstream()
    with LiveServer(fake.app()) as server:
        yield fake, server


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    http = HttpPool(PoolSettings())
    await http.start()
    yield http
    await http.close()


def deployment(base_url: str, **extra: Any) -> Deployment:
    settings = DeploymentSettings(provider="anthropic", base_url=base_url + "/v1", api_key="sk-ant", **extra)
    return Deployment.from_settings("claude", 0, settings, PoolSettings())


def chat(stream: bool = False, **body: Any) -> ChatRequest:
    return ChatRequest(model="claude", body={"model": "claude", "messages": [USER], **body}, stream=stream)


async def test_stream_connects_only_at_first_anext(
    upstream: tuple[AnthropicUpstream, LiveServer], pool: HttpPool
) -> None:
    fake, server = upstream
    chunks = AnthropicProvider(pool).chat_stream(chat(stream=True), deployment(server.url), "claude-x")
    assert fake.received == []
    first = await anext(chunks)
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert len(fake.received) == 1
    rest = [chunk async for chunk in chunks]
    assert rest[-1]["usage"]["completion_tokens"] == 6


async def test_stream_without_message_stop_is_broken(
    upstream: tuple[AnthropicUpstream, LiveServer], pool: HttpPool
) -> None:
    fake, server = upstream
    fake.fail_next(Fault(omit_message_stop=True))
    chunks = AnthropicProvider(pool).chat_stream(chat(stream=True), deployment(server.url), "claude-x")
    with pytest.raises(UpstreamStreamBroken, match="message_stop"):
        _ = [chunk async for chunk in chunks]


async def test_bearer_auth_header_for_proxies(upstream: tuple[AnthropicUpstream, LiveServer], pool: HttpPool) -> None:
    fake, server = upstream
    await AnthropicProvider(pool).chat(chat(), deployment(server.url, auth_header="authorization"), "claude-x")
    headers = fake.received[-1].headers
    assert headers["Authorization"] == "Bearer sk-ant" and "x-api-key" not in headers
    assert headers["anthropic-version"] == "2023-06-01"


async def test_invalid_json_answer_is_unavailable(
    upstream: tuple[AnthropicUpstream, LiveServer], pool: HttpPool
) -> None:
    fake, server = upstream
    fake.fail_next(Fault(invalid_json=True))
    with pytest.raises(UpstreamUnavailable, match="invalid JSON"):
        await AnthropicProvider(pool).chat(chat(), deployment(server.url), "claude-x")


async def test_rejection_keeps_status_and_message(
    upstream: tuple[AnthropicUpstream, LiveServer], pool: HttpPool
) -> None:
    fake, server = upstream
    fake.fail_next(Fault(status=413, message="Request exceeds the maximum allowed number of bytes."))
    with pytest.raises(UpstreamRejected) as info:
        await AnthropicProvider(pool).chat(chat(), deployment(server.url), "claude-x")
    assert info.value.status == 413
    assert info.value.message == "Request exceeds the maximum allowed number of bytes."


async def test_embeddings_are_unsupported(upstream: tuple[AnthropicUpstream, LiveServer], pool: HttpPool) -> None:
    fake, server = upstream
    request = EmbeddingsRequest(model="claude", body={"model": "claude", "input": "x"})
    with pytest.raises(UnsupportedParameter, match="no embeddings API"):
        await AnthropicProvider(pool).embeddings(request, deployment(server.url), "claude-x")
    assert fake.received == []


async def test_answer_that_is_not_a_message_is_unavailable(pool: HttpPool) -> None:
    async def not_a_message(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/messages", not_a_message)
    with LiveServer(app) as server, pytest.raises(UpstreamUnavailable, match="without a message"):
        await AnthropicProvider(pool).chat(chat(), deployment(server.url), "claude-x")
