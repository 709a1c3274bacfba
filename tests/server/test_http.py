"""The HTTP edge: bad input answered in OpenAI's error format with the right status, auth, operations
endpoints, and our response headers. Raw HTTP (aiohttp client) so that malformed requests can be sent."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from multidict import CIMultiDict

from atajo.app import Gateway, build_app
from atajo.server.edge import Reply, Request
from atajo.settings import Settings
from tests.conftest import GatewayFactory
from tests.upstreams.live import LiveServer

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(url, data=data, headers=headers or {}) as resp:
        raw = await resp.read()
        return resp.status, resp.headers.copy(), orjson.loads(raw) if raw else None


def assert_openai_error(body: Any, *, param: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return dict(err)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({"model": 7, "messages": []}, 400, "model"),
        ({"model": "m"}, 400, "messages"),
        ({"model": "m", "messages": "hi"}, 400, "messages"),
        ({"model": "m", "messages": []}, 400, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({**CHAT, "temperature": "hot"}, 400, "temperature"),
        ({**CHAT, "temperature": 3}, 400, "temperature"),
        ({**CHAT, "n": 0}, 400, "n"),
        ({**CHAT, "n": True}, 400, "n"),
        ({**CHAT, "stream": "yes"}, 400, "stream"),
        ({**CHAT, "stop": [1]}, 400, "stop"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**CHAT, "tools": [{"type": "function"}]}, 400, "tools[0]"),
        ({**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
        ({**CHAT, "stream_options": {"include_usage": "y"}}, 400, "include_usage"),
        ({**CHAT, "model": "x" * 300}, 400, "model"),
    ],
)
async def test_bad_chat_requests(
    gateway: GatewayFactory, http: aiohttp.ClientSession, body: Any, status: int, param: str | None
) -> None:
    gw = gateway({"models": {"gpt-4o-mini": {"deployments": [{"provider": "simulated"}]}}})
    code, headers, answer = await post(http, gw.url + "/v1/chat/completions", body)
    assert code == status
    err = assert_openai_error(answer, param=param)
    assert err["type"] == "invalid_request_error"
    assert headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "e"}, "input"),
        ({"model": "e", "input": ""}, "input"),
        ({"model": "e", "input": []}, "input"),
        ({"model": "e", "input": [1, "a"]}, "input"),
        ({"model": "e", "input": {"a": 1}}, "input"),
        ({"model": "e", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "e", "input": "a", "dimensions": 0}, "dimensions"),
    ],
)
async def test_bad_embeddings_requests(
    gateway: GatewayFactory, http: aiohttp.ClientSession, body: Any, param: str
) -> None:
    gw = gateway()
    code, _, answer = await post(http, gw.url + "/v1/embeddings", body)
    assert code == 400
    assert_openai_error(answer, param=param)


async def test_unknown_model(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = gateway({"models": {"only": {"deployments": [{"provider": "simulated"}]}}})
    code, _, answer = await post(http, gw.url + "/v1/chat/completions", {**CHAT, "model": "other"})
    assert code == 404
    assert assert_openai_error(answer, param="model")["code"] == "model_not_found"


async def test_body_over_the_limit_is_413_declared_or_chunked(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = gateway({"server": {"max_body_bytes": 2048}})
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
    code, _, answer = await post(http, gw.url + "/v1/chat/completions", big)
    assert code == 413
    assert assert_openai_error(answer)["code"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    async with http.post(gw.url + "/v1/chat/completions", data=chunked()) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json())
    # A body just under the limit still works.
    code, _, _ = await post(http, gw.url + "/v1/chat/completions", CHAT)
    assert code == 200


async def test_unknown_route_and_wrong_method(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = gateway()
    async with http.get(gw.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json())
    async with http.get(gw.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert assert_openai_error(await resp.json())["code"] == "method_not_allowed"


async def test_a_path_spelled_like_a_route_pattern_or_with_an_encoded_slash_is_no_wrong_method(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = gateway()
    async with http.get(gw.url + "/v1/models/") as resp:  # the prefix route's own text, with no model in it
        assert resp.status == 404
        assert assert_openai_error(await resp.json())["code"] == "not_found"
    async with http.get(gw.url + "/v1/models/org%2Fname") as resp:  # one segment: the model's name
        assert resp.status == 404
        assert assert_openai_error(await resp.json(), param="model")["code"] == "model_not_found"


def _keyed(gateway: GatewayFactory) -> LiveServer:
    return gateway(
        {
            "auth": {
                "master_key": "sk-master",
                "keys": [
                    {"name": "team-a", "key": "sk-team-a"},
                    {"name": "team-b", "key_sha256": hashlib.sha256(b"sk-team-b").hexdigest()},
                ],
            }
        }
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "Basic c2stbWFzdGVy"}, 401),
        ({"authorization": "Bearer"}, 401),
        ({"authorization": "Bearer sk-master"}, 200),
        ({"authorization": "Bearer sk-team-a"}, 200),
        ({"authorization": "Bearer sk-team-b"}, 200),  # configured by digest only
        ({"x-api-key": "sk-team-a"}, 200),
        ({"api-key": "sk-team-a"}, 200),
    ],
)
async def test_keys(gateway: GatewayFactory, http: aiohttp.ClientSession, headers: dict[str, str], status: int) -> None:
    gw = _keyed(gateway)
    code, _, answer = await post(http, gw.url + "/v1/chat/completions", CHAT, headers)
    assert code == status
    if status == 401:
        err = assert_openai_error(answer)
        assert err["type"] == "authentication_error"
        assert "wrong" not in err["message"]  # the presented key is never echoed
    async with http.get(gw.url + "/v1/models", headers=headers) as resp:
        assert resp.status == status


async def test_auth_is_checked_before_the_model(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = _keyed(gateway)
    code, _, _ = await post(http, gw.url + "/v1/chat/completions", {**CHAT, "model": "no-such-model"})
    assert code == 401  # an anonymous caller learns nothing about which models exist


async def test_operations_endpoints(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = _keyed(gateway)  # health, readiness and metrics need no key
    async with http.get(gw.url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
        assert resp.headers["x-request-id"]
    async with http.get(gw.url + "/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    await post(http, gw.url + "/v1/chat/completions", CHAT, {"authorization": "Bearer sk-team-a"})
    await post(http, gw.url + "/v1/chat/completions", b"{", {"authorization": "Bearer sk-team-a"})
    async with http.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = await resp.text()
    assert 'atajo_requests_total{route="chat",status="200"} 1.0' in text
    assert 'atajo_requests_total{route="chat",status="400"} 1.0' in text
    assert 'atajo_errors_total{code="invalid_json",route="chat"} 1.0' in text
    assert "gen_ai_client_operation_duration_seconds_bucket" in text
    assert 'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini"' in text
    assert "atajo_gateway_overhead_seconds_count" in text
    assert "sk-master" not in text
    assert "sk-team-a" not in text


async def test_request_id_is_echoed_when_sane(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = gateway()
    _, headers, _ = await post(http, gw.url + "/v1/chat/completions", CHAT, {"x-request-id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    _, headers, _ = await post(http, gw.url + "/v1/chat/completions", CHAT, {"x-request-id": "bad id\u00e9"})
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-atajo-simulated"] == "true"


async def test_unexpected_exception_is_a_plain_500(http: aiohttp.ClientSession) -> None:
    async def broken(_: Request) -> Reply:
        raise KeyError("secret-internal-detail")

    app: Gateway = build_app(Settings.model_validate({"cache": {"enabled": False}, "ledger": {"enabled": False}}))
    app.router.add([("GET", "/boom", broken)])
    with LiveServer(app) as server:
        async with http.get(server.url + "/boom", headers={"x-request-id": "r1"}) as resp:
            assert resp.status == 500
            err = assert_openai_error(await resp.json())
    assert "r1" in err["message"]
    assert "secret-internal-detail" not in err["message"]


async def test_ready_is_503_while_not_accepting(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = gateway()
    gw.gateway.services.server.accepting = False  # as during shutdown
    async with http.get(gw.url + "/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "unavailable"
    assert body["checks"] == {"server": "starting or stopping"}
    assert body["error"]["type"] == "service_unavailable"


def test_edge_limits_come_from_the_server_settings(gateway: GatewayFactory) -> None:
    gw = gateway({"server": {"max_header_bytes": 2048}})
    resp = httpx.get(gw.url + "/health", headers={"x-padding": "p" * 4096})
    assert resp.status_code == 431
    assert httpx.get(gw.url + "/health", headers={"x-padding": "p" * 1024}).status_code == 200
