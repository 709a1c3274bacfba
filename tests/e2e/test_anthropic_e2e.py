"""End to end with the official OpenAI SDK, sync and async, through the gateway to a local server speaking
Anthropic's Messages wire format: what the SDK gets back, and what the Anthropic side received."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import GatewayFactory
from tests.upstreams.anthropic_server import AnthropicUpstream, Fault
from tests.upstreams.live import LiveServer

Upstream = tuple[AnthropicUpstream, LiveServer]

# Any: the SDK's TypedDict overloads would otherwise need a cast at every call.
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK: Any = {"type": "function", "function": {"name": "clock"}}  # no parameters at all


@pytest.fixture
def anthropic_upstream() -> Iterator[Upstream]:
    upstream = AnthropicUpstream()
    with LiveServer(upstream.app()) as server:
        yield upstream, server


def claude(base_url: str, **extra: Any) -> dict[str, Any]:
    deployment = {
        "provider": "anthropic",
        "base_url": base_url + "/v1",
        "api_key": "sk-ant-upstream",
        "model": "claude-sonnet-4-5",
        **extra,
    }
    return {"models": {"claude": {"deployments": [deployment]}}}


def client(gw: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def aclient(gw: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The OpenAI-format error object the gateway answered with."""
    assert isinstance(exc.body, dict)
    return exc.body


def test_plain_chat_both_ways(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.cache_read_tokens = 4
    gw = gateway(claude(up.url))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude",
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "hi"},
        ],
        temperature=1.7,
        top_p=0.9,
        user="user-42",
        seed=7,
        presence_penalty=0.5,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == upstream.reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.id == "msg_fake01" and completion.model == "claude-sonnet-4-5"
    assert completion.usage is not None
    # Anthropic's input_tokens leave out cache reads; OpenAI's prompt_tokens include them.
    assert completion.usage.prompt_tokens == 15 and completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 21
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 4
    assert raw.headers["x-atajo-deployment"] == "claude/0:anthropic"
    sent = upstream.received[-1]
    assert sent.path == "/v1/messages"
    assert sent.body == {
        "model": "claude-sonnet-4-5",
        "system": "Be terse.\n\nAnswer in English.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 4096,
        "temperature": 1,
        "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
    }
    assert sent.headers["x-api-key"] == "sk-ant-upstream"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers


def test_api_version_and_extra_headers_from_config(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url, api_version="2024-01-01", headers={"anthropic-beta": "tools-2024"}))
    client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    sent = upstream.received[-1]
    assert sent.headers["anthropic-version"] == "2024-01-01"
    assert sent.headers["anthropic-beta"] == "tools-2024"


def test_streaming_with_include_usage(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    chunks = list(
        client(gw).chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert upstream.received[-1].body["stream"] is True
    assert "stream_options" not in upstream.received[-1].body
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == upstream.reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 6)
    assert all(c.id == "msg_fake01" for c in chunks)


def test_stream_usage_chunk_hidden_unless_asked(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    chunks = list(
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == upstream.reply


def test_tool_calls_both_ways(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    question: list[Any] = [{"role": "user", "content": "Weather in Lima, and the time?"}]
    first = client(gw).chat.completions.create(model="claude", messages=question, tools=[WEATHER, CLOCK])
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.id == "toolu_fake01" and call.type == "function"
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Lima"}
    assert upstream.received[-1].body["tools"] == [
        {
            "name": "weather",
            "description": "Current weather in a city",
            "input_schema": WEATHER["function"]["parameters"],
        },
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in upstream.received[-1].body

    # The client answers two parallel calls (the second one made up here); both results go back in one user turn.
    calls = [
        call.model_dump(),
        {"id": "toolu_fake02", "type": "function", "function": {"name": "clock", "arguments": ""}},
    ]
    follow_up = [
        *question,
        {"role": "assistant", "content": message.content, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_fake01", "content": "18 C, cloudy"},
        {"role": "tool", "tool_call_id": "toolu_fake02", "content": [{"type": "text", "text": "09:30"}]},
        {"role": "user", "content": "Thanks."},
    ]
    second = client(gw).chat.completions.create(model="claude", messages=follow_up, tools=[WEATHER, CLOCK])
    assert second.choices[0].message.content == "The tool said: 18 C, cloudy | 09:30"
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert upstream.received[-1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_fake01", "name": "weather", "input": {"city": "Lima"}},
                {"type": "tool_use", "id": "toolu_fake02", "name": "clock", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_fake01", "content": "18 C, cloudy"},
                {"type": "tool_result", "tool_use_id": "toolu_fake02", "content": [{"type": "text", "text": "09:30"}]},
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "clock"}}, None, {"type": "tool", "name": "clock"}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", None, {"type": "none"}),
    ],
)
def test_tool_choice(
    gateway: GatewayFactory, anthropic_upstream: Upstream, tool_choice: Any, parallel: bool | None, expected: Any
) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    extra: dict[str, Any] = {} if parallel is None else {"parallel_tool_calls": parallel}
    completion = client(gw).chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "hi"}],
        tools=[WEATHER, CLOCK],
        tool_choice=tool_choice,
        **extra,
    )
    assert upstream.received[-1].body["tool_choice"] == expected
    calls = completion.choices[0].message.tool_calls
    if expected["type"] == "none":
        assert calls is None and completion.choices[0].message.content == upstream.reply
    else:
        assert calls is not None
        assert calls[0].function.name == expected.get("name", "weather")


def test_streamed_tool_calls(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.tool_input = {"city": "Lima", "units": "metric", "days": [1, 2, 3]}  # long enough for many fragments
    gw = gateway(claude(up.url))
    chunks = list(
        client(gw).chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER],
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].index == 0 and deltas[0].id == "toolu_fake01"
    assert deltas[0].function is not None and deltas[0].function.name == "weather"
    assert len(deltas) > 3 and all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == upstream.tool_input
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_stop_sequences_and_length(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    stopped = client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "hi"}], stop="fake"
    )
    assert stopped.choices[0].message.content == "Hello from the "
    assert stopped.choices[0].finish_reason == "stop"
    assert upstream.received[-1].body["stop_sequences"] == ["fake"]

    client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], stop=["x", "y"])
    assert upstream.received[-1].body["stop_sequences"] == ["x", "y"]

    cut = client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, max_tokens=100
    )
    assert cut.choices[0].message.content == "Hello from the"
    assert cut.choices[0].finish_reason == "length"
    assert upstream.received[-1].body["max_tokens"] == 3  # max_completion_tokens wins, as with OpenAI


def test_json_object_mode_via_forced_tool(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.tool_input = {"answer": 42, "why": "it is"}
    gw = gateway(claude(up.url))
    completion = client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "JSON please"}], response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content or "") == upstream.tool_input
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None
    sent = upstream.received[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert sent["tools"][0]["input_schema"] == {"type": "object"}
    assert "response_format" not in sent


async def test_json_schema_mode_streamed_async(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.tool_input = {"name": "Ada", "born": 1815, "tags": ["math", "poetry"]}
    gw = gateway(claude(up.url))
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
        "required": ["name", "born"],
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    async with aclient(gw) as c:
        stream = await c.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "Who?"}], response_format=fmt, stream=True
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert json.loads(text) == upstream.tool_input
    assert all(not ch.choices or not ch.choices[0].delta.tool_calls for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    sent = upstream.received[-1].body
    assert sent["tools"] == [{"name": "person", "description": sent["tools"][0]["description"], "input_schema": schema}]
    assert sent["tool_choice"] == {"type": "tool", "name": "person"}


def test_json_mode_with_own_tools_asks_in_the_system_prompt(
    gateway: GatewayFactory, anthropic_upstream: Upstream
) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    client(gw).chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        tools=[WEATHER],
        response_format={"type": "json_object"},
    )
    sent = upstream.received[-1].body
    assert [t["name"] for t in sent["tools"]] == ["weather"]  # their tools stay callable
    assert sent["system"].startswith("Be terse.\n\n") and "JSON object" in sent["system"]


def test_images_as_base64_and_url(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    client(gw).chat.completions.create(
        model="claude",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
                ],
            }
        ],
    )
    assert upstream.received[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_n_above_one_is_refused_without_calling_upstream(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == "n"
    assert upstream.received == []


def test_embeddings_are_refused(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).embeddings.create(model="claude", input="hello")
    assert "embeddings" in info.value.message
    assert upstream.received == []


# --- errors ----------------------------------------------------------------------------------------


def test_invalid_request_passes_through_with_anthropic_message(
    gateway: GatewayFactory, anthropic_upstream: Upstream
) -> None:
    upstream, up = anthropic_upstream
    upstream.fail_next(Fault(status=400, message="messages.0.content: prompt is too long"))
    gw = gateway(claude(up.url))
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400
    assert error_of(info.value)["message"] == "messages.0.content: prompt is too long"
    assert error_of(info.value)["type"] == "invalid_request_error"
    assert len(upstream.received) == 1  # a rejection of the request is not retried


def test_overloaded_529_is_retried(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.fail_next(Fault(status=529, message="Overloaded"))
    gw = gateway(claude(up.url))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == upstream.reply
    assert raw.headers["x-atajo-attempts"] == "2"


def test_overloaded_for_good_is_a_502_naming_it(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.always = Fault(status=529, message="Overloaded")
    gw = gateway(claude(up.url))
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert "529" in info.value.message and "Overloaded" in info.value.message
    assert len(upstream.received) == 3  # the first try and two retries


def test_rate_limit_keeps_429_and_retry_after(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.always = Fault(
        status=429, message="Number of request tokens has exceeded your rate limit", retry_after="30"
    )
    gw = gateway(claude(up.url))
    with pytest.raises(openai.RateLimitError) as info:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "30"
    assert len(upstream.received) == 1  # 30 s is beyond max_retry_after_s: no waiting, no retry


def test_bad_upstream_key_is_not_echoed(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.always = Fault(status=401, message="invalid x-api-key sk-ant-upstream")
    gw = gateway(claude(up.url))
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert "credentials" in info.value.message and "sk-ant" not in info.value.message


def test_dropped_connection_is_retried(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.fail_next(Fault(drop=True))
    gw = gateway(claude(up.url))
    completion = client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == upstream.reply
    assert len(upstream.received) == 2


@pytest.mark.parametrize(
    "fault",
    [
        Fault(stream_break_after=5),  # connection cut after a few text deltas
        Fault(stream_break_after=5, stream_error_event=True, message="Overloaded"),
        Fault(omit_message_stop=True),
    ],
    ids=["cut", "error-event", "no-message-stop"],
)
def test_broken_stream_after_first_chunk_is_an_error_event(
    gateway: GatewayFactory, anthropic_upstream: Upstream, fault: Fault
) -> None:
    upstream, up = anthropic_upstream
    upstream.fail_next(fault)
    gw = gateway(claude(up.url))
    stream = client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        chunks.extend(stream)  # keeps what arrived before the error
    assert chunks and chunks[0].choices[0].delta.role == "assistant"  # went out before the failure
    assert all(c.choices[0].finish_reason is None for c in chunks)  # never told the answer was complete
    assert info.value.code == "upstream_stream_broken"
    assert len(upstream.received) == 1  # text already reached the client: not retried


def test_overloaded_event_before_any_chunk_is_retried(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    upstream.fail_next(Fault(stream_break_after=0, stream_error_event=True, message="Overloaded"))
    gw = gateway(claude(up.url))
    chunks = list(
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == upstream.reply
    assert len(upstream.received) == 2


async def test_async_client_plain_stream_and_errors(gateway: GatewayFactory, anthropic_upstream: Upstream) -> None:
    upstream, up = anthropic_upstream
    gw = gateway(claude(up.url))
    async with aclient(gw) as c:
        plain = await c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
        stream = await c.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        upstream.fail_next(Fault(status=400, message="max_tokens: too large"))
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert plain.choices[0].message.content == text == upstream.reply
    assert error_of(info.value)["message"] == "max_tokens: too large"
