"""The model catalog: the shipped data loads, lookups by name / alias / snapshot, validation names the field,
overrides merge."""

from __future__ import annotations

from typing import Any

import pytest

from atajo.core.catalog import Catalog, bundled_data, load_catalog
from atajo.core.results import Usage
from atajo.errors import ConfigError


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def test_bundled_catalog_has_the_briefs_models_in_micro_units(catalog: Catalog) -> None:
    assert catalog.currency == "USD"
    turbo, gpt35, dalle, whisper, ada = (
        catalog.get(m) for m in ("gpt-4-turbo", "gpt-3.5-turbo-0301", "dall-e-3", "whisper-1", "text-embedding-ada-002")
    )
    assert turbo and gpt35 and dalle and whisper and ada
    # GPT-4 Turbo: 0.01 in, 0.03 out per 1K; the brief's "0.02 / 1K" is their mean.
    assert (turbo.input_micros_per_1k, turbo.output_micros_per_1k) == (10_000, 30_000)
    assert turbo.tokens_cost_micros(1000, 1000) == 2 * 20_000
    assert (gpt35.input_micros_per_1k, gpt35.output_micros_per_1k) == (2_000, 2_000)
    assert dalle.image_micros == 80_000 and dalle.kind == "image"
    assert whisper.audio_minute_micros == 6_000 and whisper.kind == "audio"
    assert ada.input_micros_per_1k == 100 and ada.kind == "embedding"
    mini = catalog.get("gpt-4o-mini")
    assert mini is not None and mini.cached_input_micros_per_1k == 75 and mini.tokenizer == "o200k_base"
    assert mini.can("tools") and mini.can("vision") and not mini.can("reasoning")
    assert 0 < mini.quality["general"] < 1


def test_every_provider_family_is_present(catalog: Catalog) -> None:
    providers = {info.provider for info in catalog.models.values()}
    assert providers == {"openai", "anthropic", "open"}
    for name in ("gpt-5", "gpt-4.1", "o3", "claude-sonnet-4-5", "claude-3-5-haiku", "mixtral-8x7b-instruct"):
        assert name in catalog


@pytest.mark.parametrize(
    ("asked", "found"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("chatgpt-4o-latest", "gpt-4o"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-1106-preview", "gpt-4-turbo"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("openai/gpt-4o", "gpt-4o"),
        ("deepseek-chat", "deepseek-v3"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b-instruct"),
        ("gpt-4.5-preview", None),  # another model, not a snapshot of gpt-4
        ("o3-pro", None),
        ("my-local-model", None),
    ],
)
def test_lookup_by_name_alias_and_snapshot(catalog: Catalog, asked: str, found: str | None) -> None:
    info = catalog.get(asked)
    assert (info.name if info else None) == found


def test_cost_of_usage_prices_cached_input_apart(catalog: Catalog) -> None:
    info = catalog.get("gpt-4o")
    assert info is not None  # 2.5 / 1.25 / 10 dollars per 1M tokens
    assert info.cost_micros(Usage(prompt_tokens=1000, completion_tokens=100)) == 2_500 + 1_000
    assert (
        info.cost_micros(Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=400))
        == (600 * 2_500 + 400 * 1_250 + 100 * 10_000) // 1000
    )
    gpt4 = catalog.get("gpt-4")
    assert gpt4 is not None and gpt4.cached_input_micros_per_1k is None  # no prompt cache: the input price
    assert gpt4.cost_micros(Usage(1000, 0, 500)) == 30_000


def test_overrides_replace_fields_add_and_drop_models() -> None:
    catalog = load_catalog(
        {
            "models": {
                "gpt-4o": {"input_per_1k": 0.002, "aliases": ["house-model"]},
                "gpt-4": None,
                "qwen3-8b": {
                    "provider": "open",
                    "kind": "chat",
                    "input_per_1k": 0.00005,
                    "output_per_1k": 0.0001,
                    "context": 32768,
                    "ttft_ms": 200,
                    "tokens_per_s": 120,
                },
            }
        }
    )
    gpt4o = catalog.get("house-model")
    assert gpt4o is not None and gpt4o.name == "gpt-4o"
    assert (gpt4o.input_micros_per_1k, gpt4o.output_micros_per_1k) == (2_000, 10_000)  # output kept
    assert catalog.get("gpt-4") is None and catalog.get("gpt-4-0613") is None
    qwen = catalog.get("qwen3-8b")
    assert qwen is not None and qwen.input_micros_per_1k == 50 and qwen.tokenizer is None
    assert len(catalog) == len(bundled_data()["models"])  # one added, one dropped


def test_replace_starts_from_nothing_and_may_change_currency() -> None:
    entry = {"provider": "open", "kind": "chat", "input_per_1k": 1, "output_per_1k": 2, "context": 10, "ttft_ms": 1,
             "tokens_per_s": 1}  # fmt: skip
    catalog = load_catalog({"replace": True, "currency": "EUR", "models": {"m": entry}})
    assert catalog.currency == "EUR" and list(catalog.models) == ["m"]
    assert catalog.models["m"].input_micros_per_1k == 1_000_000


NO_PRICE = {"provider": "open", "kind": "chat", "context": 1, "ttft_ms": 1, "tokens_per_s": 1}
BAD: list[tuple[dict[str, Any], str]] = [
    ({"models": {"gpt-4o": {"input_per_1k": "cheap"}}}, "catalog.models.gpt-4o.input_per_1k: must be a number"),
    ({"models": {"gpt-4o": {"output_per_1k": -1}}}, "catalog.models.gpt-4o.output_per_1k: must be a finite number"),
    ({"models": {"gpt-4o": {"input_per_1k": 0.0000001}}}, "catalog.models.gpt-4o.input_per_1k: 1e-07 is finer"),
    ({"models": {"gpt-4o": {"context": 1.5}}}, "catalog.models.gpt-4o.context: must be a whole number"),
    ({"models": {"gpt-4o": {"max_output": 200000}}}, "catalog.models.gpt-4o.max_output: 200000 is more than"),
    ({"models": {"gpt-4o": {"kind": "video"}}}, "catalog.models.gpt-4o.kind: must be one of"),
    ({"models": {"gpt-4o": {"tokenizer": "p50k"}}}, "catalog.models.gpt-4o.tokenizer: must be one of"),
    ({"models": {"gpt-4o": {"capabilities": ["telepathy"]}}}, "catalog.models.gpt-4o.capabilities: unknown capab"),
    ({"models": {"gpt-4o": {"quality": {"poetry": 0.5}}}}, "catalog.models.gpt-4o.quality.poetry: unknown task"),
    ({"models": {"gpt-4o": {"quality": {"math": 1.5}}}}, "catalog.models.gpt-4o.quality.math: must be a score"),
    ({"models": {"gpt-4o": {"price": 1}}}, "catalog.models.gpt-4o.price: unknown field"),
    ({"models": {"gpt-4o": {"aliases": ["gpt-4"]}}}, "catalog.models.gpt-4o.aliases: 'gpt-4' already names"),
    ({"models": {"new": {"provider": "open", "kind": "chat"}}}, "catalog.models.new.context: required"),
    ({"models": {"new": {**NO_PRICE, "input_per_1k": 1}}}, "catalog.models.new.output_per_1k: required for a chat"),
    ({"models": {"gpt-4o": "cheap"}}, "catalog.models.gpt-4o: must be a mapping"),
    ({"currency": "EUR"}, "catalog.currency: 'EUR' differs from the bundled catalog's 'USD'"),
    ({"prices": {}}, "catalog.prices: unknown field"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_validation_names_the_entry_and_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_catalog(overrides)
    assert caught.value.message.startswith(message), caught.value.message
    assert caught.value.param == message.split(":")[0]
