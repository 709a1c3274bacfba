"""The exact cache end to end, with the OpenAI SDK against the gateway in front of a local OpenAI-format
upstream: hits per tier, streams replayed, tenants kept apart, HTTP cache controls, TTLs on an injected
clock, stale answers when the provider fails, and invalidation through the API."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, openai_model
from tests.doubles import FakeClock
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
MASTER = "sk-master-test"
KEY_A = "sk-tenant-a"
KEY_B = "sk-tenant-b"
HI: Any = [{"role": "user", "content": "What is the capital of France?"}]


def config(up: LiveServer, tmp_path: Path, **cache: Any) -> dict[str, Any]:
    return {
        "models": {"fast": openai_model(up.url)},
        "auth": {
            "master_key": MASTER,
            "keys": [{"name": "a", "key": KEY_A, "tenant": "acme"}, {"name": "b", "key": KEY_B, "tenant": "globex"}],
        },
        "cache": {
            "tiers": [
                {"url": "memory://", "ttl_s": 300},
                {"url": f"sqlite:///{tmp_path}/cache.db", "ttl_s": 3600},
            ],
            **cache,
        },
    }


def client(gw: LiveServer, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def ask(gw: LiveServer, key: str = KEY_A, headers: dict[str, str] | None = None, **kw: Any) -> tuple[str, Any]:
    kw.setdefault("messages", HI)
    raw = client(gw, key).chat.completions.with_raw_response.create(model="fast", extra_headers=headers, **kw)
    return raw.headers["x-atajo-cache"], raw


def drain(gw: LiveServer) -> None:
    """Wait for the writes behind the last responses (they never hold up a response)."""
    cache = gw.gateway.services.cache
    assert cache is not None
    gw.call(cache.chain.drain())


def admin(gw: LiveServer, path: str, body: dict[str, Any] | None = None, key: str = MASTER) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if body is None:
        return httpx.get(gw.url + path, headers=headers)
    return httpx.post(gw.url + path, json=body, headers=headers)


def test_a_repeat_is_a_memory_hit_and_costs_no_upstream_call(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    clock = FakeClock(1_800_000_000)
    gw = gateway(config(up, tmp_path), wall_clock=clock)
    status, first = ask(gw)
    assert status == "miss" and "age" not in first.headers
    drain(gw)
    clock.advance(42.7)
    upstream.reply = "a different answer the cache must not show"
    status, second = ask(gw, user="someone-else")  # `user` is not part of the key
    assert status == "hit-memory"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(upstream.received) == 1
    assert second.headers["x-atajo-cache-key"] == first.headers["x-atajo-cache-key"]
    assert second.headers["x-atajo-cache-key"].startswith("default/fast/v2-")
    assert second.headers["age"] == "42", "seconds since the answer was stored, on the gateway's clock"
    assert second.headers["x-atajo-cost-micros"] == "0"
    status, _ = ask(gw, temperature=0.5)  # an answer-affecting field: another entry
    assert status == "miss" and len(upstream.received) == 2


def test_a_slower_tier_hit_fills_the_faster_one(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    first = gateway(config(up, tmp_path))
    assert ask(first)[0] == "miss"
    drain(first)
    second = gateway(config(up, tmp_path))  # another instance on the same SQLite file, its memory empty
    assert ask(second)[0] == "hit-sql"
    drain(second)
    assert ask(second)[0] == "hit-memory"
    assert len(upstream.received) == 1


def test_streams_are_stored_once_complete_and_replayed_as_streams(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    upstream.reply = "Paris is the capital of France and also its largest city by far."
    gw = gateway(config(up, tmp_path))
    sdk = client(gw)

    def stream() -> tuple[str, list[Any]]:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fast", messages=HI, stream=True, stream_options={"include_usage": True}
        )
        return raw.headers["x-atajo-cache"], list(raw.parse())

    status, live = stream()
    assert status == "miss"
    drain(gw)
    status, replayed = stream()
    assert status == "hit-memory"
    text = "".join(c.choices[0].delta.content or "" for c in replayed if c.choices)
    assert text == upstream.reply
    assert sum(1 for c in replayed if c.choices and c.choices[0].delta.content) > 1, "pieces, not one blob"
    assert replayed[-1].usage is not None and replayed[-1].usage.total_tokens == 18
    assert [c.choices[0].finish_reason for c in replayed if c.choices][-1] == "stop"
    # the same entry answers a plain request
    status, plain = ask(gw)
    assert status == "hit-memory"
    assert plain.parse().choices[0].message.content == upstream.reply
    assert len(upstream.received) == 1 and len(live) > 2


def test_a_broken_stream_is_not_stored(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    upstream.fail_next(Fault(stream_break_after=2))
    with pytest.raises(openai.APIError):
        list(client(gw).chat.completions.create(model="fast", messages=HI, stream=True))
    drain(gw)
    assert ask(gw)[0] == "miss"
    assert len(upstream.received) == 2


def test_tenant_b_never_gets_tenant_a_answer(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    upstream.reply = "acme's answer"
    assert ask(gw, KEY_A)[0] == "miss"
    drain(gw)
    assert ask(gw, KEY_A)[0] == "hit-memory"
    upstream.reply = "globex's answer"
    status, raw = ask(gw, KEY_B)
    assert status == "miss"
    assert raw.parse().choices[0].message.content == "globex's answer"
    assert len(upstream.received) == 2


def test_http_cache_controls(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    clock = FakeClock(1_800_000_000)
    gw = gateway(config(up, tmp_path), wall_clock=clock)
    assert ask(gw)[0] == "miss"
    drain(gw)
    clock.advance(30)
    upstream.reply = "revalidated"
    status, raw = ask(gw, headers={"cache-control": "no-cache"})  # skip the lookup, store the fresh answer
    assert status == "miss" and raw.parse().choices[0].message.content == "revalidated"
    drain(gw)
    status, raw = ask(gw)
    assert status == "hit-memory" and raw.parse().choices[0].message.content == "revalidated"
    clock.advance(30)
    assert ask(gw, headers={"cache-control": "max-age=10"})[0] == "miss"  # entry is 30 s old
    drain(gw)
    assert ask(gw, headers={"cache-control": "max-age=10"})[0] == "hit-memory"
    calls = len(upstream.received)
    assert ask(gw, headers={"cache-control": "no-cache, no-store"})[0] == "bypass"
    assert ask(gw, messages=[{"role": "user", "content": "new"}], headers={"cache-control": "no-store"})[0] == "miss"
    drain(gw)
    assert ask(gw, messages=[{"role": "user", "content": "new"}])[0] == "miss", "no-store stored nothing"
    assert len(upstream.received) == calls + 3


def test_namespaces_and_per_request_ttl(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    _upstream, up = openai_upstream
    clock = FakeClock(1_800_000_000)
    gw = gateway(config(up, tmp_path), wall_clock=clock)
    ns = {"x-atajo-cache-namespace": "support", "x-atajo-cache-ttl": "20"}
    assert ask(gw, headers=ns)[0] == "miss"
    drain(gw)
    assert ask(gw)[0] == "miss", "another namespace is another set of entries"
    drain(gw)
    assert ask(gw, headers=ns)[0] == "hit-memory"
    clock.advance(21)  # past the request's TTL in every tier
    assert ask(gw, headers=ns)[0] == "miss"
    assert ask(gw)[0] == "hit-memory", "the default namespace's entry has the tiers' own TTL"


def test_tier_ttls_and_stale_if_error(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    clock = FakeClock(1_800_000_000)
    cfg = config(up, tmp_path, stale_if_error_s=600)
    cfg["breaker"] = {"failure_threshold": 100}  # this test wants every request to reach the upstream
    gw = gateway(cfg, wall_clock=clock)
    assert ask(gw)[0] == "miss"
    drain(gw)
    clock.advance(301)  # memory's 5 minutes are over, SQL's hour is not
    assert ask(gw)[0] == "hit-sql"
    drain(gw)
    assert ask(gw)[0] == "hit-memory"  # refilled, for what is left of SQL's time
    clock.advance(3600)  # past every tier's TTL, within stale-if-error
    upstream.always = Fault(status=503)
    status, raw = ask(gw)
    assert status == "stale"
    assert raw.parse().choices[0].message.content == "Hello from the fake upstream."
    assert raw.headers["age"] == "3901"  # from the first answer, not from the memory tier's refill
    clock.advance(700)  # past the stale window too
    with pytest.raises(openai.APIStatusError) as info:
        ask(gw)
    assert info.value.status_code in (502, 503)
    upstream.always = None
    upstream.fail_next(Fault(status=400, message="bad request"))
    with pytest.raises(openai.BadRequestError):  # the request's own fault: never answered from stale
        ask(gw)


def test_invalidation_by_tags_follows_dependencies_and_drops_nothing_else(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    _upstream, up = openai_upstream
    deps = {"profile:{id}": ["sessions:{id}", "recommendations:{id}"]}
    gw = gateway(config(up, tmp_path, dependencies=deps))
    q = [{"role": "user", "content": f"question {i}"} for i in range(4)]
    ask(gw, messages=[q[0]], headers={"x-atajo-cache-tags": "sessions:42"})
    ask(gw, messages=[q[1]], headers={"x-atajo-cache-tags": "recommendations:42, doc:9"})
    ask(gw, messages=[q[2]], user="42")  # tagged user:42 by the default rule: not a dependent of profile:42
    ask(gw, messages=[q[3]], headers={"x-atajo-cache-tags": "sessions:43"})
    ask(gw, KEY_B, messages=[q[0]], headers={"x-atajo-cache-tags": "sessions:42"})  # another tenant
    drain(gw)
    resp = admin(gw, "/v1/cache/invalidate", {"tags": ["profile:42"]}, key=KEY_A)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tiers"] == {"memory": 2, "sql": 2}
    assert body["dropped"] == 4
    assert set(body["tags"]) == {"profile:42", "sessions:42", "recommendations:42"}
    assert ask(gw, messages=[q[0]])[0] == "miss"
    assert ask(gw, messages=[q[1]])[0] == "miss"
    assert ask(gw, messages=[q[2]], user="42")[0] == "hit-memory"
    assert ask(gw, messages=[q[3]])[0] == "hit-memory"
    assert ask(gw, KEY_B, messages=[q[0]])[0] == "hit-memory", "another tenant's entries are untouched"
    # rules: invalidating user:42 drops the entry the `user` field tagged
    assert admin(gw, "/v1/cache/invalidate", {"tags": ["user:42"]}, key=KEY_A).json()["dropped"] == 2
    assert ask(gw, messages=[q[2]], user="42")[0] == "miss"


def test_invalidation_by_namespace_and_key_prefix(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    _, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    ask(gw, headers={"x-atajo-cache-namespace": "support"})
    _, raw = ask(gw)
    drain(gw)
    assert admin(gw, "/v1/cache/invalidate", {"namespace": "support"}).json()["tiers"] == {"memory": 0, "sql": 0}, (
        "the master key's own tenant is `default`, not acme"
    )
    assert admin(gw, "/v1/cache/invalidate", {"namespace": "support", "tenant": "acme"}).json()["dropped"] == 2
    assert ask(gw)[0] == "hit-memory"
    prefix = raw.headers["x-atajo-cache-key"].split("/v2-")[0]  # default/fast
    assert admin(gw, "/v1/cache/invalidate", {"key_prefix": prefix}, key=KEY_A).json()["dropped"] == 2
    assert ask(gw)[0] == "miss"


def test_cache_api_permissions_and_bad_input(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    _, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    ask(gw)
    drain(gw)
    cases: list[tuple[str, dict[str, Any] | None, str, int, str | None]] = [
        ("/v1/cache/invalidate", {"tags": ["user:1"], "tenant": "globex"}, KEY_A, 403, None),
        ("/v1/cache/flush", {}, KEY_A, 403, None),
        ("/v1/cache/stats", None, KEY_A, 403, None),
        ("/v1/cache/invalidate", {"tags": ["user:1"]}, "sk-wrong", 401, None),
        ("/v1/cache/invalidate", {}, KEY_A, 400, None),
        ("/v1/cache/invalidate", {"tags": "not a tag"}, KEY_A, 400, "tags"),
        ("/v1/cache/invalidate", {"tags": [1]}, KEY_A, 400, "tags"),
        ("/v1/cache/invalidate", {"namespace": "a/b"}, KEY_A, 400, "namespace"),
        ("/v1/cache/invalidate", {"tagz": ["x"]}, KEY_A, 400, "tagz"),
    ]
    for path, body, key, status, param in cases:
        resp = admin(gw, path, body, key=key)
        assert resp.status_code == status, (path, body, resp.text)
        assert resp.json()["error"]["param"] == param or param is None
    resp = httpx.post(
        gw.url + "/v1/cache/invalidate", content=b"{not json", headers={"authorization": f"Bearer {KEY_A}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert ask(gw)[0] == "hit-memory", "nothing was dropped by the rejected calls"
    stats = admin(gw, "/v1/cache/stats").json()
    assert [t["name"] for t in stats["tiers"]] == ["memory", "sql"]
    assert all(t["entries"] == 1 and t["bytes"] > 0 for t in stats["tiers"])
    flushed = admin(gw, "/v1/cache/flush", {}).json()
    assert flushed["dropped"] == 2
    assert ask(gw)[0] == "miss"


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"cache-control": "max-age=soon"}, "cache-control"),
        ({"x-atajo-cache-ttl": "-1"}, "x-atajo-cache-ttl"),
        ({"x-atajo-cache-ttl": "99999999999"}, "x-atajo-cache-ttl"),
        ({"x-atajo-cache-namespace": "a/b"}, "x-atajo-cache-namespace"),
        ({"x-atajo-cache-tags": "ok:1, not ok"}, "x-atajo-cache-tags"),
    ],
)
def test_bad_cache_headers_are_clear_400s(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path, headers: dict[str, str], param: str
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    with pytest.raises(openai.BadRequestError) as info:
        ask(gw, headers=headers)
    assert info.value.body is not None and info.value.body["param"] == param  # type: ignore[index]
    assert not upstream.received


def test_policies_per_model_and_per_key(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    _upstream, up = openai_upstream
    cfg = config(up, tmp_path, cache_sampled=False)
    cfg["auth"]["keys"][1]["cache"] = {"enabled": False}
    gw = gateway(cfg)
    assert ask(gw)[0] == "bypass", "no temperature means the provider's default of 1: sampled"
    assert ask(gw, temperature=0)[0] == "miss"
    drain(gw)
    assert ask(gw, temperature=0)[0] == "hit-memory"
    assert ask(gw, KEY_B, temperature=0)[0] == "bypass"


def test_embeddings_are_cached(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    sdk = client(gw)
    first = sdk.embeddings.with_raw_response.create(model="fast", input=["a", "b"])
    drain(gw)
    second = sdk.embeddings.with_raw_response.create(model="fast", input=["a", "b"])
    assert (first.headers["x-atajo-cache"], second.headers["x-atajo-cache"]) == ("miss", "hit-memory")
    assert [d.embedding for d in second.parse().data] == [d.embedding for d in first.parse().data]
    assert len(upstream.received) == 1


def test_a_down_tier_is_skipped_and_counted(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path, closed_port: int
) -> None:
    upstream, up = openai_upstream
    cfg = config(up, tmp_path)
    cfg["cache"]["tiers"].insert(1, {"url": f"redis://127.0.0.1:{closed_port}/0", "ttl_s": 600, "timeout_s": 0.2})
    gw = gateway(cfg)
    assert ask(gw)[0] == "miss"
    drain(gw)
    assert ask(gw)[0] == "hit-memory"
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'atajo_cache_tier_failures_total{operation="' in metrics
    assert 'atajo_cache_tier_up{tier="redis"} 0.0' in metrics
    assert 'atajo_cache_lookups_total{outcome="hit",tier="memory"} 1.0' in metrics
    assert len(upstream.received) == 1


async def test_200_concurrent_identical_requests_on_a_cold_cache_make_one_upstream_call(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    upstream.always = Fault(delay_s=0.3)  # long enough for every copy to arrive while the first is in flight
    gw = gateway(config(up, tmp_path))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0, timeout=30)

    async def one() -> tuple[str | None, str, str | None]:
        raw = await sdk.chat.completions.with_raw_response.create(model="fast", messages=HI)
        return (
            raw.parse().choices[0].message.content,
            raw.headers["x-atajo-cache"],
            raw.headers.get("x-atajo-coalesced"),
        )

    results = await asyncio.gather(*(one() for _ in range(200)))
    await sdk.close()
    assert len(upstream.received) == 1
    assert {content for content, _, _ in results} == {upstream.reply}
    statuses = Counter(status for _, status, _ in results)
    coalesced = sum(1 for _, _, flag in results if flag == "true")
    assert coalesced + statuses["hit-memory"] == 199, (statuses, coalesced)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(gw.url + "/metrics")).text
    # tokens and spend are counted once: for the one call the provider answered
    labels = 'gen_ai_operation_name="chat",gen_ai_request_model="fast",gen_ai_token_type="input"'
    assert "gen_ai_client_token_usage_count{" + labels + "} 1.0" in metrics
    assert "atajo_coalesced_requests_total " + str(float(coalesced)) in metrics
    # copies that found the call in flight joined it without looking up the tiers first
    assert 'atajo_cache_lookups_total{outcome="miss",tier="sql"} 1.0' in metrics


def test_without_redis_an_invalidation_reaches_other_processes_memory_through_the_sql_log(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    """Workers (or instances) sharing only the SQLite file: each one's memory copy is dropped too."""
    _, up = openai_upstream
    first, second = gateway(config(up, tmp_path)), gateway(config(up, tmp_path))
    assert ask(first, headers={"x-atajo-cache-tags": "doc:1"})[0] == "miss"
    drain(first)
    assert ask(second)[0] == "hit-sql"
    drain(second)
    assert ask(second)[0] == "hit-memory"
    resp = admin(first, "/v1/cache/invalidate", {"tags": ["doc:1"]}, key=KEY_A)
    assert resp.json()["tiers"] == {"memory": 1, "sql": 1}
    invalidated = time.monotonic()
    while ask(second, headers={"cache-control": "no-store"})[0] != "miss":
        assert time.monotonic() - invalidated < 2.0, "the second instance kept its memory copy"
        time.sleep(0.02)
    bus = second.gateway.services.cache
    assert bus is not None and bus.bus is not None and bus.bus.received == 1
