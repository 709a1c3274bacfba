"""Config loading: YAML, ${ENV} substitution, ATAJO_* overrides, defaults, and errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from atajo.errors import ConfigError
from atajo.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "atajo.yaml"
    path.write_text(text)
    return path


def test_no_config_no_key_means_simulated() -> None:
    settings = load_settings(None, env={})
    assert settings.simulated_only
    assert "*" in settings.models
    assert "gpt-4o-mini" in settings.models


def test_no_config_with_openai_key_proxies_every_model_to_that_base_url() -> None:
    settings = load_settings(None, env={"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    (deployment,) = settings.models["*"].deployments
    assert deployment.provider == "openai"
    assert deployment.base_url == "http://127.0.0.1:9/v1"
    assert deployment.api_key is not None
    assert deployment.api_key.get_secret_value() == "sk-x"
    assert not settings.simulated_only


def test_env_substitution_and_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
models:
  gpt:
    deployments:
      - provider: openai
        api_key: ${MY_KEY}
        base_url: ${MY_URL:-http://127.0.0.1:8000/v1}
""",
    )
    settings = load_settings(path, env={"MY_KEY": "sk-secret"})
    (d,) = settings.models["gpt"].deployments
    assert d.api_key is not None
    assert d.api_key.get_secret_value() == "sk-secret"
    assert d.base_url == "http://127.0.0.1:8000/v1"
    assert "sk-secret" not in repr(settings)  # secrets never printed


def test_missing_env_variable_names_the_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  gpt:\n    deployments:\n      - provider: openai\n        api_key: ${NOPE}\n")
    with pytest.raises(ConfigError, match=r"models\.gpt\.deployments\.0\.api_key: environment variable NOPE"):
        load_settings(path, env={})


def test_env_overrides_nested_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 5000\n")
    settings = load_settings(path, env={"ATAJO_SERVER__PORT": "6000", "ATAJO_POOL__KEEPALIVE_S": "12.5"})
    assert settings.server.port == 6000
    assert settings.pool.keepalive_s == 12.5


def test_master_key_from_environment() -> None:
    settings = load_settings(None, env={"ATAJO_MASTER_KEY": "sk-master"})
    assert settings.auth.master_key is not None
    assert settings.auth.master_key.get_secret_value() == "sk-master"


def test_pool_defaults_match_the_documented_ones() -> None:
    pool = load_settings(None, env={}).pool
    assert (pool.keepalive_s, pool.max_connections_per_host, pool.timeout_s) == (30.0, 50, 60.0)
    assert pool.connect_timeout_s < pool.timeout_s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  m:\n    deployments:\n      - provider: nosuch\n", "models.m.deployments.0.provider"),
        ("models:\n  m:\n    deployments: []\n", "models.m.deployments"),
        ("server:\n  port: lots\n", "server.port"),
        ("server:\n  prot: 1\n", "server.prot: Extra inputs are not permitted"),
        (
            "models:\n  m:\n    deployments:\n      - provider: openai\n        base_url: ftp://x\n",
            "models.m.deployments.0.base_url",
        ),
        (
            "models:\n  m:\n    deployments: [{provider: simulated}]\n    fallbacks: [ghost]\n",
            "models.m.fallbacks.0: unknown model 'ghost'",
        ),
        ("auth:\n  keys:\n    - name: a\n", "auth.keys.0: give exactly one of key or key_sha256"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("server: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_setting(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert expected in info.value.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_env_override_of_a_scalar_path_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: info\n")
    with pytest.raises(ConfigError, match="ATAJO_LOG_LEVEL__X"):
        load_settings(path, env={"ATAJO_LOG_LEVEL__X": "1"})


def test_semantic_settings_are_checked_by_name(tmp_path: Path) -> None:
    bad_store = "cache:\n  semantic: {enabled: true, store: 'redis://x'}\n"
    with pytest.raises(ConfigError, match=r"cache\.semantic\.store"):
        load_settings(write(tmp_path, bad_store), env={})
    with pytest.raises(ConfigError, match=r"cache\.semantic\.neighbours"):
        load_settings(write(tmp_path, "cache:\n  semantic: {neighbours: 0}\n"), env={})
    settings = load_settings(write(tmp_path, "cache:\n  semantic: {enabled: true}\n"), env={})
    assert settings.cache.semantic.store == "memory://"
    assert not load_settings(None, env={}).cache.semantic.enabled  # off unless asked for


def test_coalesce_settings_have_safe_defaults_and_are_checked_by_name(tmp_path: Path) -> None:
    settings = load_settings(None, env={})
    assert settings.coalesce.single_flight is True
    assert settings.coalesce.embeddings_batch.enabled is True
    assert settings.coalesce.embeddings_batch.max_wait_ms <= 100
    bad = [
        ("coalesce:\n  embeddings_batch: {max_wait_ms: 500}\n", r"coalesce\.embeddings_batch\.max_wait_ms"),
        ("coalesce:\n  embeddings_batch: {max_items: 0}\n", r"coalesce\.embeddings_batch\.max_items"),
        ("coalesce:\n  lease: {url: 'http://x'}\n", r"coalesce\.lease\.url"),
        ("coalesce:\n  models: {m: {single_flight: maybe}}\n", r"coalesce\.models\.m\.single_flight"),
        ("auth:\n  keys:\n    - {name: a, key: k, coalesce: {batch: false}}\n", r"auth\.keys\.0\.coalesce\.batch"),
    ]
    for text, expected in bad:
        with pytest.raises(ConfigError, match=expected):
            load_settings(write(tmp_path, text), env={})
    env = {"ATAJO_COALESCE__EMBEDDINGS_BATCH__ENABLED": "false"}
    assert load_settings(None, env=env).coalesce.embeddings_batch.enabled is False


def test_a_decision_weights_file_is_found_beside_the_config(tmp_path: Path) -> None:
    text = "cache:\n  semantic:\n    enabled: true\n    decision: {model: atajo.semantic-decision.npz}\n"
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.cache.semantic.decision == {"model": str(tmp_path / "atajo.semantic-decision.npz")}


def test_the_startup_summary_names_the_semantic_tier(tmp_path: Path) -> None:
    from atajo.app import describe_startup

    off = describe_startup(load_settings(None, env={}), keys_open=False)
    assert any(line.startswith("cache: memory") and "semantic" not in line for line in off)
    text = "cache:\n  semantic: {enabled: true, store: 'postgresql://u:secret@db:5432/x'}\n"
    on = describe_startup(load_settings(write(tmp_path, text), env={}), keys_open=False)
    line = next(line for line in on if line.startswith("cache:"))
    assert "→ semantic postgresql://" in line and "(local model) → provider" in line
    assert "secret" not in line
