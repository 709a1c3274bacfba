"""The semantic tier end to end, with the OpenAI SDK against the gateway in front of a local OpenAI-format
upstream and the real local embedding model: paraphrases hit (``hit-semantic`` with the similarity), and a
different number, a negation, another tenant, model, system prompt or namespace never does; invalidation by
tag reaches semantic entries; hits replay as streams; policies turn the tier off."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import IN_CI, GatewayFactory, openai_model
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

try:
    from atajo.cache.semantic.embedder import Embedder, EmbedderUnavailable

    Embedder().load()
except (ImportError, EmbedderUnavailable) as exc:  # pragma: no cover - depends on the installed extras
    if IN_CI:
        raise
    pytest.skip(f"the semantic extra is not installed ({exc})", allow_module_level=True)

Upstream = tuple[OpenAIUpstream, LiveServer]
MASTER = "sk-master-test"
KEY_A = "sk-tenant-a"
KEY_B = "sk-tenant-b"
KEY_OFF = "sk-no-semantic"
ASKED = "How do I reset my password?"
PARAPHRASE = "how do i reset my password"


def config(up: LiveServer, tmp_path: Path, **semantic: Any) -> dict[str, Any]:
    return {
        "models": {"fast": openai_model(up.url), "other": openai_model(up.url)},
        "auth": {
            "master_key": MASTER,
            "keys": [
                {"name": "a", "key": KEY_A, "tenant": "acme"},
                {"name": "b", "key": KEY_B, "tenant": "globex"},
                {"name": "off", "key": KEY_OFF, "tenant": "acme", "cache": {"semantic": False}},
            ],
        },
        "cache": {
            "tiers": [{"url": "memory://", "ttl_s": 300}, {"url": f"sqlite:///{tmp_path}/cache.db", "ttl_s": 3600}],
            "semantic": {"enabled": True, **semantic},
        },
    }


def ask(
    gw: LiveServer,
    text: str,
    key: str = KEY_A,
    model: str = "fast",
    system: str | None = None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Any:
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    return sdk.chat.completions.with_raw_response.create(model=model, messages=messages, extra_headers=headers, **kw)


def status(raw: Any) -> str:
    return str(raw.headers["x-atajo-cache"])


def drain(gw: LiveServer) -> None:
    cache = gw.gateway.services.cache
    assert cache is not None and cache.semantic is not None
    gw.call(cache.chain.drain())
    gw.call(cache.semantic.drain())
    gw.call(cache.chain.drain())


def seed(
    gw: LiveServer, upstream: OpenAIUpstream, text: str = ASKED, reply: str = "Use the reset link.", **kw: Any
) -> None:
    upstream.reply = reply
    assert status(ask(gw, text, **kw)) == "miss"
    drain(gw)
    upstream.reply = "an answer the cache must not show"


def test_a_paraphrase_is_a_semantic_hit_with_its_similarity(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream)
    calls = len(upstream.received)
    raw = ask(gw, PARAPHRASE)
    assert status(raw) == "hit-semantic"
    assert raw.parse().choices[0].message.content == "Use the reset link."
    assert 0.9 < float(raw.headers["x-atajo-cache-similarity"]) <= 1.0001
    assert raw.headers["x-atajo-cache-match"].startswith("default/fast/")
    assert len(upstream.received) == calls
    # The hit was also stored under the paraphrase's own key: the same wording again is an exact hit.
    drain(gw)
    assert status(ask(gw, PARAPHRASE)) == "hit-memory"


def test_a_semantic_hit_replays_as_a_stream(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream)
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    with sdk.chat.completions.with_streaming_response.create(
        model="fast", messages=[{"role": "user", "content": PARAPHRASE}], stream=True
    ) as response:
        assert response.headers["x-atajo-cache"] == "hit-semantic"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == "Use the reset link."


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("What was the population of Peru in 2019?", "What was the population of Peru in 2020?"),
        (
            "How many bones are in the human hand? List 5 of them.",
            "How many bones are in the human hand? List 6 of them.",
        ),
        ("Is it safe to take ibuprofen with coffee?", "Is it not safe to take ibuprofen with coffee?"),
        ("Can I cancel my subscription online?", "Can't I cancel my subscription online?"),
    ],
)
def test_a_different_number_or_a_negation_never_hits(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path, stored: str, asked: str
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream, stored)
    assert status(ask(gw, stored.lower().rstrip("?"))) == "hit-semantic"  # the entry is there and reachable
    assert status(ask(gw, asked)) == "miss"


def test_partitions_keep_tenants_models_system_prompts_and_namespaces_apart(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream, system="You are a support agent.")
    assert status(ask(gw, PARAPHRASE, system="You are a support agent.")) == "hit-semantic"
    assert status(ask(gw, PARAPHRASE, key=KEY_B, system="You are a support agent.")) == "miss"  # other tenant
    assert status(ask(gw, PARAPHRASE, model="other", system="You are a support agent.")) == "miss"
    assert status(ask(gw, PARAPHRASE, system="You are a pirate.")) == "miss"
    assert status(ask(gw, PARAPHRASE)) == "miss"  # no system prompt at all
    assert status(ask(gw, PARAPHRASE, system="You are a support agent.", temperature=0.2)) == "miss"
    headers = {"x-atajo-cache-namespace": "other"}
    assert status(ask(gw, PARAPHRASE, system="You are a support agent.", headers=headers)) == "miss"


def test_invalidating_a_tag_reaches_semantic_entries(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream, headers={"x-atajo-cache-tags": "faq:passwords"})
    seed(gw, upstream, "What are your opening hours?", "9 to 5.", headers={"x-atajo-cache-tags": "faq:hours"})
    semantic = gw.gateway.services.cache.semantic  # type: ignore[union-attr]
    assert semantic is not None
    assert gw.call(semantic.count()) == 2
    resp = httpx.post(
        gw.url + "/v1/cache/invalidate", json={"tags": ["faq:passwords"]}, headers={"authorization": f"Bearer {KEY_A}"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["tiers"]["semantic"] == 1
    assert gw.call(semantic.count()) == 1
    assert status(ask(gw, PARAPHRASE)) == "miss"
    assert status(ask(gw, "what are your opening hours")) == "hit-semantic"  # the other entry is untouched


def test_a_semantic_hit_needs_the_exact_entry_to_still_be_there(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    """The vector only points at an exact entry: when that entry is gone, there is no semantic hit."""
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream)
    cache = gw.gateway.services.cache
    assert cache is not None
    for tier in cache.chain.tiers:  # drop the answer behind the semantic tier's back
        gw.call(tier.backend.flush(None))
    assert status(ask(gw, PARAPHRASE)) == "miss"


def test_policies_and_headers_turn_the_tier_off(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream)
    # The key's cache policy says semantic: false (its answer is still stored under its own exact key).
    assert status(ask(gw, "How do I reset my password", key=KEY_OFF)) == "miss"
    assert status(ask(gw, "how do I reset my password?", headers={"cache-control": "no-cache"})) == "miss"
    assert status(ask(gw, PARAPHRASE)) == "hit-semantic"


def test_texts_longer_than_max_chars_skip_the_tier(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path, max_chars=20))
    seed(gw, upstream)
    drain(gw)
    semantic = gw.gateway.services.cache.semantic  # type: ignore[union-attr]
    assert semantic is not None
    assert gw.call(semantic.count()) == 0
    assert status(ask(gw, PARAPHRASE)) == "miss"


def test_semantic_lookups_are_measured(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream)
    ask(gw, PARAPHRASE)
    ask(gw, "What was the population of Peru in 2019?")
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'atajo_cache_semantic_decisions_total{outcome="hit"} 1.0' in metrics
    assert 'atajo_cache_lookups_total{outcome="hit",tier="semantic"} 1.0' in metrics
    assert 'atajo_cache_writes_total{outcome="ok",tier="semantic"}' in metrics
    assert "atajo_cache_semantic_embed_batch_size_count" in metrics


def test_stats_report_the_semantic_store(gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path) -> None:
    upstream, up = openai_upstream
    gw = gateway(config(up, tmp_path))
    seed(gw, upstream)
    resp = httpx.get(gw.url + "/v1/cache/stats", headers={"authorization": f"Bearer {MASTER}"})
    assert resp.status_code == 200
    assert resp.json()["semantic"] == {"store": "memory", "entries": 1}


def bag_of_words(text: str) -> list[float]:
    """A provider-side embedding for tests: word counts hashed into 64 dimensions (case and punctuation aside)."""
    vector = [0.0] * 64
    for word in "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split():
        vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
    return vector


def test_embeddings_can_come_from_a_configured_provider_model(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    upstream.embed_text = bag_of_words
    # The shipped network knows only the local model's vectors: with another model's, its lexical fallback
    # decides (a real deployment fits its own with `atajo cache calibrate --embeddings-url`).
    cfg = config(up, tmp_path, embedder="embedder", dimension=64, decision={"model": "default"})
    cfg["models"]["embedder"] = openai_model(up.url)
    gw = gateway(cfg)
    seed(gw, upstream)
    calls = [r for r in upstream.received if r.path == "/v1/embeddings"]
    assert len(calls) == 1 and calls[0].body["input"] == [ASKED]  # one list-input call per batch
    raw = ask(gw, PARAPHRASE)
    assert status(raw) == "hit-semantic"
    assert float(raw.headers["x-atajo-cache-similarity"]) == pytest.approx(1.0, abs=1e-4)
    assert [r.body["input"] for r in upstream.received if r.path == "/v1/embeddings"][-1] == [PARAPHRASE]


def test_a_provider_embedder_must_be_a_model_and_needs_its_own_decision(tmp_path: Path) -> None:
    from atajo.errors import ConfigError
    from atajo.settings import load_settings

    path = tmp_path / "atajo.yaml"
    path.write_text("cache:\n  semantic: {enabled: true, embedder: ghost}\n")
    with pytest.raises(ConfigError, match=r"cache\.semantic\.embedder: 'ghost' is not a model"):
        load_settings(path, env={})
    models = "models:\n  emb:\n    deployments: [{provider: simulated}]\n"
    path.write_text(models + "cache:\n  semantic: {enabled: true, embedder: emb}\n")
    with pytest.raises(ConfigError, match=r"cache\.semantic\.decision: required with a provider embedder"):
        load_settings(path, env={})


async def _together(gw: LiveServer, texts: list[str], key: str = KEY_A) -> list[Any]:
    """Send ``texts`` 50 ms apart, all while the first is still being answered."""
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)

    async def one(i: int, text: str) -> Any:
        await asyncio.sleep(0.05 * i)
        return await sdk.chat.completions.with_raw_response.create(
            model="fast", messages=[{"role": "user", "content": text}]
        )

    try:
        return await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    finally:
        await sdk.close()


async def test_requests_in_flight_asking_the_same_question_share_one_call(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    upstream.always = Fault(delay_s=0.6)
    gw = gateway(config(up, tmp_path))
    first, second, other = await _together(gw, [ASKED, PARAPHRASE, "What was the population of Peru in 2019?"])
    assert len([r for r in upstream.received if r.path == "/v1/chat/completions"]) == 2
    assert second.headers["x-atajo-grouped-with"] == first.headers["x-atajo-cache-key"]
    assert second.headers["x-atajo-coalesced"] == "true"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert "x-atajo-grouped-with" not in other.headers
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(gw.url + "/metrics")).text
    assert 'atajo_coalesce_calls_saved_total{cause="grouping"} 1.0' in metrics
    assert 'atajo_coalesce_calls_saved_total{cause="single_flight"} 0.0' in metrics


async def test_grouping_never_joins_a_different_number_and_can_be_turned_off(
    gateway: GatewayFactory, openai_upstream: Upstream, tmp_path: Path
) -> None:
    upstream, up = openai_upstream
    upstream.always = Fault(delay_s=0.6)
    cfg = config(up, tmp_path)
    cfg["auth"]["keys"].append({"name": "solo", "key": "sk-solo", "tenant": "solo", "coalesce": {"grouping": False}})
    gw = gateway(cfg)
    answers = await _together(gw, ["How many moons does Mars have in 2019?", "How many moons does Mars have in 2020?"])
    assert all("x-atajo-grouped-with" not in a.headers for a in answers)
    answers = await _together(gw, [ASKED, PARAPHRASE], key="sk-solo")
    assert all("x-atajo-grouped-with" not in a.headers for a in answers)
    assert len([r for r in upstream.received if r.path == "/v1/chat/completions"]) == 4
