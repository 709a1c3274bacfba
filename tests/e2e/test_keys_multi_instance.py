"""Two ``atajo serve`` processes sharing a key store (a SQLite file, or PostgreSQL): a key created through one
works through the other, and a revocation through one stops the key on the other within a second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.cache.conftest import POSTGRES_URL, need_server
from tests.e2e.test_cache_multi_instance import serving

MASTER = "sk-master-keys-multi"


@pytest.fixture(params=["sqlite", "postgres"])
def two_gateways(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "postgres":
        need_server("PostgreSQL", "127.0.0.1", 5432)
        store = POSTGRES_URL
    else:
        store = f"sqlite:///{tmp_path}/keys.db"
    config = {
        "log_level": "warning",
        "auth": {"master_key": MASTER, "store": store},
        "cache": {"enabled": False},
        "models": {
            "fast": {"deployments": [{"provider": "simulated", "simulated": {"ttft_ms": 0, "tokens_per_s": 1e6}}]}
        },
    }
    with serving(config, tmp_path, 2) as (url1, url2):
        yield url1, url2


def _client(url: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=5)


def _ask(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])


def test_a_revocation_reaches_the_other_instance_within_a_second(two_gateways: tuple[str, str]) -> None:
    url1, url2 = two_gateways
    admin = {"authorization": f"Bearer {MASTER}"}
    created = httpx.post(url1 + "/admin/keys", json={"tenant": "acme"}, headers=admin)
    assert created.status_code == 201, created.text
    secret, key_id = created.json()["key"], created.json()["id"]
    one, two = _client(url1, secret), _client(url2, secret)
    _ask(one)
    _ask(two)  # the other instance finds it in the store (and now holds it in memory)
    _ask(two)

    revoked = httpx.delete(url1 + f"/admin/keys/{key_id}", headers=admin)
    assert revoked.status_code == 200
    at = time.monotonic()
    with pytest.raises(openai.AuthenticationError):
        _ask(one)  # the revoking instance at once
    while True:
        sent = time.monotonic()
        try:
            _ask(two)
        except openai.AuthenticationError:
            break
        assert sent - at < 1.0, "the other instance still accepted the key 1 s after its revocation"
        time.sleep(0.01)
    assert sent - at < 1.0
