"""The admin API for virtual keys and tenants, against a running gateway; keys used with the openai SDK."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai
import pytest

from atajo.auth.keys import digest
from tests.conftest import GatewayFactory

MASTER = "sk-admin-master"
STATIC = "sk-static-key"
ADMIN = {"authorization": f"Bearer {MASTER}"}


@pytest.fixture
def url(gateway: GatewayFactory) -> str:
    return gateway({"auth": {"master_key": MASTER, "keys": [{"name": "app", "key": STATIC}]}}).url


def _chat(url: str, key: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.content or ""


def test_create_use_list_rotate_revoke(url: str) -> None:
    body: dict[str, Any] = {"tenant": "acme", "name": "web", "limits": {"rpm": 100, "tpm": 50000}}
    resp = httpx.post(url + "/admin/keys", json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    secret, key_id = created["key"], created["id"]
    assert secret.startswith("sk-atajo-") and len(secret) > 40
    assert created["tenant"] == "acme" and created["limits"] == {"rpm": 100, "tpm": 50000, "adaptive": True}
    assert created["hint"].endswith(secret[-4:]) and secret not in created["hint"]
    assert _chat(url, secret)

    listed = httpx.get(url + "/admin/keys", headers=ADMIN).json()
    assert [k["id"] for k in listed["data"]] == [key_id]
    assert secret not in httpx.get(url + "/admin/keys", headers=ADMIN).text  # shown once, never again
    assert digest(secret) not in httpx.get(url + f"/admin/keys/{key_id}", headers=ADMIN).text
    assert httpx.get(url + "/admin/keys?tenant=globex", headers=ADMIN).json()["data"] == []

    rotated = httpx.post(url + f"/admin/keys/{key_id}/rotate", headers=ADMIN)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["key"]
    assert new_secret != secret and rotated.json()["id"] == key_id
    with pytest.raises(openai.AuthenticationError):
        _chat(url, secret)
    assert _chat(url, new_secret)

    revoked = httpx.delete(url + f"/admin/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        _chat(url, new_secret)
    assert httpx.get(url + "/admin/keys", headers=ADMIN).json()["data"] == []
    assert len(httpx.get(url + "/admin/keys?include_revoked=true", headers=ADMIN).json()["data"]) == 1
    again = httpx.post(url + f"/admin/keys/{key_id}/rotate", headers=ADMIN)
    assert again.status_code == 400 and again.json()["error"]["code"] == "key_revoked"


def test_tenants(url: str) -> None:
    resp = httpx.post(url + "/admin/tenants", json={"name": "acme", "limits": {"rpm": 10}}, headers=ADMIN)
    assert resp.status_code == 201 and resp.json()["limits"] == {"rpm": 10, "adaptive": True}
    resp = httpx.post(
        url + "/admin/tenants", json={"name": "acme", "limits": {"tpm": 99, "adaptive": False}}, headers=ADMIN
    )
    assert resp.status_code == 200 and resp.json()["limits"] == {"tpm": 99, "adaptive": False}
    assert httpx.get(url + "/admin/tenants/acme", headers=ADMIN).json()["limits"]["tpm"] == 99
    assert [t["name"] for t in httpx.get(url + "/admin/tenants", headers=ADMIN).json()["data"]] == ["acme"]
    missing = httpx.get(url + "/admin/tenants/nobody", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "tenant_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "tenant"),
        ({"tenant": "a/b"}, "tenant"),
        ({"tenant": "acme", "limits": {"rpm": 0}}, "limits"),
        ({"tenant": "acme", "limits": {"rpm": "100"}}, "limits"),
        ({"tenant": "acme", "limits": {"rps": 1}}, "limits"),
        ({"tenant": "acme", "models": "gpt"}, "models"),
        ({"tenant": "acme", "trust": "maybe"}, "trust"),
        ({"tenant": "acme", "cache": {"ttl_s": -1}}, "cache"),
        ({"tenant": "acme", "budget_micros": 1.5}, "budget_micros"),
        ({"tenant": "acme", "key": "sk-chosen"}, "key"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(url: str, body: dict[str, Any], param: str) -> None:
    resp = httpx.post(url + "/admin/keys", json=body, headers=ADMIN)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_only_the_master_key_may_manage_keys(url: str) -> None:
    created = httpx.post(url + "/admin/keys", json={"tenant": "acme"}, headers=ADMIN).json()
    for key in (STATIC, created["key"]):
        headers = {"authorization": f"Bearer {key}"}
        calls = [("POST", "/admin/keys"), ("GET", "/admin/keys"), ("DELETE", f"/admin/keys/{created['id']}")]
        for method, path in [*calls, ("GET", "/admin/tenants"), ("GET", "/admin/limits")]:
            resp = httpx.request(method, url + path, json={"tenant": "x"}, headers=headers)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["error"]["type"] == "permission_error"
    assert httpx.get(url + "/admin/keys").status_code == 401
    assert httpx.get(url + "/admin/keys", headers={"authorization": "Bearer sk-atajo-nope"}).status_code == 401


def test_unknown_ids_and_methods(url: str) -> None:
    assert httpx.delete(url + "/admin/keys/key_0123456789abcdef", headers=ADMIN).status_code == 404
    assert httpx.get(url + "/admin/keys/nonsense", headers=ADMIN).json()["error"]["code"] == "key_not_found"
    assert httpx.post(url + "/admin/keys/key_0123456789abcdef/explode", headers=ADMIN).status_code == 404
    wrong = httpx.put(url + "/admin/keys/key_0123456789abcdef", headers=ADMIN)
    assert wrong.status_code == 405 and set(wrong.headers["allow"].split(", ")) == {"DELETE", "GET", "HEAD"}


def test_a_key_store_that_cannot_be_reached_is_a_503_in_openai_format(gateway: GatewayFactory) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = f"postgresql://postgres@127.0.0.1:{port}/test"
    url = gateway({"auth": {"master_key": MASTER, "keys": [{"name": "app", "key": STATIC}], "store": store}}).url
    for method, path in [("POST", "/admin/keys"), ("GET", "/admin/keys"), ("GET", "/admin/tenants")]:
        resp = httpx.request(method, url + path, json={"tenant": "acme"}, headers=ADMIN)
        assert resp.status_code == 503, (method, path, resp.text)
        error = resp.json()["error"]
        assert error["message"] == "The key store is unavailable; try again shortly."
        assert error["type"] and error["code"], error
    # The master key check comes first: a static key is refused without touching the store.
    refused = httpx.get(url + "/admin/keys", headers={"authorization": f"Bearer {STATIC}"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
