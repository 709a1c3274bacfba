"""The deferred lane's settings and prices: bad values named by their setting, batch prices from the catalog."""

from __future__ import annotations

import pytest

from atajo.core.catalog import load_catalog
from atajo.core.deployments import Deployment
from atajo.core.results import Usage
from atajo.errors import ConfigError
from atajo.settings import DeploymentSettings, PoolSettings, load_settings


def test_batch_api_only_for_openai_compatible_and_anthropic_deployments() -> None:
    env = {"ATAJO_MODELS__C__DEPLOYMENTS": '[{"provider": "simulated", "batch_api": true}]'}
    with pytest.raises(ConfigError, match=r"models\.c\.deployments\.0.*batch_api: only OpenAI-compatible"):
        load_settings(None, env)
    load_settings(None, {"ATAJO_MODELS__C__DEPLOYMENTS": '[{"provider": "anthropic", "batch_api": true}]'})


def test_bad_batch_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"batches\.url"):
        load_settings(None, {"ATAJO_BATCHES__URL": "redis://x"})
    with pytest.raises(ConfigError, match=r"batches\.concurrency"):
        load_settings(None, {"ATAJO_BATCHES__CONCURRENCY": "0"})


def test_batch_api_default_is_openai_and_anthropic_themselves_only() -> None:
    pool = PoolSettings()

    def uses(**kw: object) -> bool:
        return Deployment.from_settings("m", 0, DeploymentSettings.model_validate(kw), pool).batch_api

    assert uses(provider="openai")
    assert not uses(provider="openai", base_url="http://127.0.0.1:8000/v1")  # vLLM, Ollama…: no Batch API
    assert uses(provider="openai", base_url="http://127.0.0.1:8000/v1", batch_api=True)
    assert uses(provider="anthropic")  # Message Batches
    assert not uses(provider="anthropic", base_url="http://127.0.0.1:9000/v1")  # a proxy: may have none
    assert uses(provider="anthropic", base_url="http://127.0.0.1:9000/v1", batch_api=True)
    assert not uses(provider="simulated")


def test_batch_prices() -> None:
    catalog = load_catalog({"models": {"gpt-4o-mini": {"batch_discount": 0.25}}})
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    assert load_catalog().get("gpt-4o-mini").batch_cost_micros(usage) == 375  # type: ignore[union-attr]
    assert catalog.get("gpt-4o-mini").batch_cost_micros(usage) == 562  # type: ignore[union-attr]
    assert load_catalog().get("claude-3-5-haiku").batch_discount == 0.5  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"catalog\.models\.gpt-4o-mini\.batch_discount"):
        load_catalog({"models": {"gpt-4o-mini": {"batch_discount": 2}}})
