"""Shared fixtures: real servers on 127.0.0.1 (the gateway and local upstreams), never patched clients."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from atajo.app import build_app
from atajo.settings import Settings, default_models
from tests.upstreams.live import LiveServer, free_port
from tests.upstreams.openai_server import OpenAIUpstream

IN_CI = os.environ.get("CI") == "true"

GatewayFactory = Callable[..., LiveServer]


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
def closed_port() -> int:
    """A local port with nothing listening: connecting to it is refused at once."""
    return free_port()


@pytest.fixture
def openai_upstream() -> Iterator[tuple[OpenAIUpstream, LiveServer]]:
    upstream = OpenAIUpstream()
    with LiveServer(upstream.app()) as server:
        yield upstream, server


@pytest.fixture
def gateway() -> Iterator[GatewayFactory]:
    """Start gateways from config dicts: ``gateway({"models": {...}})``; all stopped at teardown.

    Back-off sleeps are skipped (``instant_backoff=True`` by default) so retry tests do not wait on time.
    The cache is off unless the config has a ``cache`` section: tests that count upstream calls stay exact.
    The ledger is off unless the config has a ``ledger`` section (it would write under ~/.cache/atajo).
    """
    started: list[LiveServer] = []

    def start(config: dict[str, Any] | None = None, *, instant_backoff: bool = True, **app_kwargs: Any) -> LiveServer:
        config = dict(config or {})
        config.setdefault("models", default_models({}))  # as with no config and no provider key: simulated
        config.setdefault("cache", {"enabled": False})
        config.setdefault("ledger", {"enabled": False})
        config["batches"] = {"url": "sqlite://:memory:", **config.get("batches", {})}  # never the home directory
        if "auth" in config:  # a master key opens the key store: a private one per gateway unless one is named
            config["auth"] = {"store": "sqlite://:memory:", **config["auth"]}
        settings = Settings.model_validate(config)
        kwargs: dict[str, Any] = {"sleep": _no_sleep} if instant_backoff else {}
        kwargs.update(app_kwargs)
        server = LiveServer(build_app(settings, **kwargs)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def openai_model(base_url: str, **extra: Any) -> dict[str, Any]:
    """A model config with one OpenAI-compatible deployment pointed at a local upstream."""
    return {"deployments": [{"provider": "openai", "base_url": base_url + "/v1", "api_key": "sk-upstream", **extra}]}
