"""Two gateway processes sharing Redis and PostgreSQL: a miss in one is a hit in the other, and an
invalidation through one reaches the other's in-process tier within a second (Redis pub/sub)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import IN_CI, openai_model
from tests.upstreams.live import LiveServer, free_port
from tests.upstreams.openai_server import OpenAIUpstream

MASTER = "sk-master-multi"
KEY = "sk-acme-multi"
REDIS_URL = "redis://127.0.0.1:6379/0"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def shared_services() -> None:
    missing = [name for name, port in (("Redis", 6379), ("PostgreSQL", 5432)) if not _reachable(port)]
    if missing:
        message = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if IN_CI:
            pytest.fail(message + " (CI=true: the services must be there)")
        pytest.skip(message)


def _serve(config: Path, home: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ATAJO_MASTER_KEY")}
    env["HOME"] = str(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "atajo", "serve", "--config", str(config), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=1) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"atajo serve never became ready: {proc.communicate()[1]}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(config: dict[str, Any], home: Path, instances: int) -> Iterator[list[str]]:
    """``instances`` ``atajo serve`` processes on one config file; their URLs; all stopped after."""
    path = home / "atajo.yaml"
    path.write_text(yaml.safe_dump(config))
    procs: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for _ in range(instances):
            proc, url = _serve(path, home)
            procs.append(proc)
            urls.append(url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def two_gateways(shared_services: None, tmp_path: Path) -> Iterator[tuple[str, str, OpenAIUpstream]]:
    upstream = OpenAIUpstream()
    with LiveServer(upstream.app()) as up:
        config: dict[str, Any] = {
            "log_level": "warning",
            "models": {"fast": openai_model(up.url)},
            "auth": {"master_key": MASTER, "keys": [{"name": "acme", "key": KEY, "tenant": "acme"}]},
            "cache": {
                "tiers": [
                    {"url": "memory://", "ttl_s": 300},
                    {"url": REDIS_URL, "ttl_s": 600},
                    {"url": PG_URL, "ttl_s": 3600},
                ]
            },
        }
        with serving(config, tmp_path, 2) as (url1, url2):
            yield url1, url2, upstream


def _ask(url: str, namespace: str, content: str, cache_control: str | None = None) -> str:
    headers = {"authorization": f"Bearer {KEY}", "x-atajo-cache-namespace": namespace, "x-atajo-cache-tags": "doc:7"}
    if cache_control:
        headers["cache-control"] = cache_control
    body = {"model": "fast", "messages": [{"role": "user", "content": content}]}
    resp = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-atajo-cache"]


def test_a_miss_in_one_instance_is_a_hit_in_the_other_and_invalidation_reaches_both(
    two_gateways: tuple[str, str, OpenAIUpstream],
) -> None:
    url1, url2, upstream = two_gateways
    namespace = "t" + uuid.uuid4().hex[:12]  # this run's own entries in the shared servers
    assert _ask(url1, namespace, "shared question") == "miss"
    assert len(upstream.received) == 1
    # the first instance writes behind its response; ask the second until the entry is there (no-store: the
    # second instance must not store an answer of its own meanwhile)
    deadline = time.monotonic() + 5
    while (status := _ask(url2, namespace, "shared question", "no-store")) == "miss":
        assert time.monotonic() < deadline, "the first instance never wrote the shared tiers"
        time.sleep(0.02)
    assert status == "hit-redis"
    assert _ask(url2, namespace, "shared question") in ("hit-memory", "hit-redis")
    time.sleep(0.05)  # the fill of the second instance's memory, behind the response
    assert _ask(url2, namespace, "shared question") == "hit-memory"

    resp = httpx.post(
        url1 + "/v1/cache/invalidate",
        json={"tags": ["doc:7"], "namespace": namespace},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["tiers"]["redis"] == 1 and resp.json()["tiers"]["sql"] == 1
    invalidated = time.monotonic()
    while _ask(url2, namespace, "shared question", "no-store") != "miss":
        assert time.monotonic() - invalidated < 1.0, "the second instance still served the entry after 1 s"
        time.sleep(0.01)
    assert time.monotonic() - invalidated < 1.0
