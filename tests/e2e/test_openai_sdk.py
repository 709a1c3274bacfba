"""End to end with the official OpenAI SDK, sync and async, against the gateway in front of a local
OpenAI-format upstream and in front of the simulated provider."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]


def client(gw: LiveServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def test_chat_completion_through_openai_upstream(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway({"models": {"fast": openai_model(up.url, model="gpt-4o-mini-2024-07-18")}})
    upstream.fail_next(Fault(delay_s=0.2))  # an answer, 200 ms late: the provider's time, not the gateway's
    started = time.perf_counter()
    raw = client(gw).chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], seed=7, stop=["\n"], n=2
    )
    wall_ms = (time.perf_counter() - started) * 1000
    completion = raw.parse()
    assert completion.choices[0].message.content == upstream.reply
    assert len(completion.choices) == 2
    assert completion.usage is not None and completion.usage.total_tokens == 18
    sent = upstream.received[-1]
    assert sent.body["model"] == "gpt-4o-mini-2024-07-18"  # the deployment's upstream name, not the public one
    assert sent.body["seed"] == 7 and sent.body["stop"] == ["\n"] and sent.body["n"] == 2
    assert sent.headers["Authorization"] == "Bearer sk-upstream"
    assert raw.headers["x-atajo-model"] == "fast"
    assert raw.headers["x-atajo-cache"] == "miss"
    assert raw.headers["x-atajo-attempts"] == "1"
    assert raw.headers["x-request-id"].startswith("req_")
    told = raw.headers["x-atajo-overhead-ms"]
    assert re.fullmatch(r"\d+\.\d{3}", told), told
    # The upstream's wait is subtracted: what is left fits in the client's own timeline without it.
    assert float(told) < wall_ms - 200
    # What the client is told is what the overhead histogram recorded for this one request.
    metrics = httpx.get(gw.url + "/metrics").text
    recorded = re.search(r'^atajo_gateway_overhead_seconds_sum\{route="([^"]+)"\} (\S+)$', metrics, re.M)
    assert recorded is not None and recorded[1] == "chat"
    assert float(recorded[2]) * 1000 == pytest.approx(float(told), abs=0.0005)


def test_streaming_with_usage(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway({"models": {"fast": openai_model(up.url)}})
    stream = client(gw).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == upstream.reply
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_stream_usage_chunk_hidden_unless_asked(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    upstream, up = openai_upstream
    gw = gateway({"models": {"fast": openai_model(up.url)}})
    chunks = list(
        client(gw).chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    # The gateway asked the upstream for usage (for its own metrics) but the client did not.
    assert upstream.received[-1].body["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == upstream.reply


def test_tools_round_trip(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    _, up = openai_upstream
    gw = gateway({"models": {"fast": openai_model(up.url)}})
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    completion = client(gw).chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "weather in Lima?"}],
        tools=tools,  # type: ignore[arg-type]
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Lima"}  # type: ignore[union-attr]


def test_embeddings_string_and_list(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    _, up = openai_upstream
    gw = gateway({"models": {"emb": openai_model(up.url, model="text-embedding-3-small")}})
    one = client(gw).embeddings.create(model="emb", input="hello", encoding_format="float")
    many = client(gw).embeddings.create(model="emb", input=["a", "b", "c"], encoding_format="float")
    assert len(one.data) == 1 and len(many.data) == 3
    assert many.data[2].embedding[0] == pytest.approx(0.3)


def test_models_listing(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    _, up = openai_upstream
    gw = gateway({"models": {"b": openai_model(up.url), "a": openai_model(up.url)}})
    assert [m.id for m in client(gw).models.list()] == ["a", "auto", "b"]  # auto: the routed name
    assert client(gw).models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError):
        client(gw).models.retrieve("zzz")


def test_unknown_model_is_404_in_openai_format(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    _, up = openai_upstream
    gw = gateway({"models": {"fast": openai_model(up.url)}})
    with pytest.raises(openai.NotFoundError) as info:
        client(gw).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    assert "nope" in info.value.message


async def test_async_client_stream_and_plain(gateway: GatewayFactory) -> None:
    gw = gateway({})  # no models configured: the simulated provider answers any name
    aclient = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    plain = await aclient.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert plain.system_fingerprint == "atajo-simulated"
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == plain.choices[0].message.content  # deterministic simulated answer, streamed or not
    await aclient.close()


def test_cost_at_catalog_prices(gateway: GatewayFactory) -> None:
    gw = gateway()  # simulated gpt-4o-mini: $0.15 / 1M input tokens, $0.60 / 1M output tokens in the catalog
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "What does a gateway do?"}]
    )
    usage = raw.parse().usage
    assert usage is not None
    expected = (usage.prompt_tokens * 150 + usage.completion_tokens * 600) // 1000
    assert int(raw.headers["x-atajo-cost-micros"]) == expected
    import urllib.request

    with urllib.request.urlopen(gw.url + "/metrics") as resp:
        text = resp.read().decode()
    assert f'atajo_spend_micros_total{{gen_ai_request_model="gpt-4o-mini"}} {float(expected)}' in text


def test_unpriced_model_has_no_cost_header(gateway: GatewayFactory, openai_upstream: Upstream) -> None:
    _, up = openai_upstream
    gw = gateway({"models": {"fast": openai_model(up.url, model="my-private-finetune")}})
    raw = client(gw).chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "x"}]
    )
    assert "x-atajo-cost-micros" not in raw.headers


def test_no_config_with_openai_key_proxies_any_model_name(openai_upstream: Upstream) -> None:
    from atajo.app import build_app
    from atajo.settings import load_settings

    upstream, up = openai_upstream
    env = {
        "OPENAI_API_KEY": "sk-from-env",
        "OPENAI_BASE_URL": up.url + "/v1",
        "ATAJO_CACHE__ENABLED": "false",
        "ATAJO_LEDGER__ENABLED": "false",
    }
    settings = load_settings(None, env=env)
    with LiveServer(build_app(settings)) as gw:
        raw = client(gw).chat.completions.with_raw_response.create(
            model="any-model-the-upstream-knows", messages=[{"role": "user", "content": "hi"}]
        )
    assert raw.parse().choices[0].message.content == upstream.reply
    sent = upstream.received[-1]
    assert sent.body["model"] == "any-model-the-upstream-knows"
    assert sent.headers["Authorization"] == "Bearer sk-from-env"
    assert raw.headers["x-atajo-model"] == "any-model-the-upstream-knows"
    assert "x-atajo-simulated" not in raw.headers
