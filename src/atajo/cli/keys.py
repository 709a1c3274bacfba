"""``atajo keys create | list | revoke | rotate`` and ``atajo tenants set | list``: the admin API of a running
gateway (master key), so every instance hears of the change through the key store."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

URL_HELP = "Gateway base URL (env ATAJO_URL)."
KEY_HELP = "The master key (env ATAJO_MASTER_KEY)."


def _options(f: Any) -> Any:
    f = click.option("--url", envvar="ATAJO_URL", default="http://127.0.0.1:4000", show_default=True, help=URL_HELP)(f)
    return click.option("--key", envvar="ATAJO_MASTER_KEY", default="", help=KEY_HELP)(f)


def _call(url: str, key: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        click.echo(f"error: {exc.code} {message}", err=True)
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"error: cannot reach the gateway at {url}: {getattr(exc, 'reason', exc)}", err=True)
    sys.exit(1)


def _limits(rpm: int | None, tpm: int | None, fixed: bool) -> dict[str, Any] | None:
    limits: dict[str, Any] = {k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v is not None}
    if fixed:
        limits["adaptive"] = False
    return limits or None


def _print_key(key: dict[str, Any]) -> None:
    limits = key.get("limits") or {}
    shown = ", ".join(f"{k} {v}" for k, v in limits.items()) or "defaults"
    state = "revoked" if key.get("revoked") else "active"
    click.echo(f"{key['id']}  {key['tenant']:<16} {key.get('name') or '-':<16} {key['hint']:<18} {state:<8} {shown}")


@click.group()
def keys() -> None:
    """Create, list, rotate and revoke virtual API keys (master key)."""


@keys.command()
@_options
@click.option("--tenant", required=True, help="The tenant the key belongs to (created if new).")
@click.option("--name", help="A name to recognise the key by.")
@click.option("--model", "models", multiple=True, help="A model the key may use (repeatable; default: all).")
@click.option("--rpm", type=click.IntRange(1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(1), help="Tokens per minute.")
@click.option("--fixed", is_flag=True, help="Pin the limits (no adaptive multipliers).")
@click.option("--trust", type=click.Choice(["auto", "trusted", "untrusted"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def create(
    url: str,
    key: str,
    tenant: str,
    name: str | None,
    models: tuple[str, ...],
    rpm: int | None,
    tpm: int | None,
    fixed: bool,
    trust: str,
    as_json: bool,
) -> None:
    """Create a key; its secret is printed this once and cannot be shown again."""
    body: dict[str, Any] = {"tenant": tenant, "trust": trust}
    if name:
        body["name"] = name
    if models:
        body["models"] = list(models)
    limits = _limits(rpm, tpm, fixed)
    if limits:
        body["limits"] = limits
    answer = _call(url, key, "POST", "/admin/keys", body)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"id:  {answer['id']}\nkey: {answer['key']}\n(the key is shown once: store it now)")


@keys.command("list")
@_options
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def list_(url: str, key: str, tenant: str | None, include_revoked: bool, as_json: bool) -> None:
    """List keys (never their secrets)."""
    query = {k: v for k, v in (("tenant", tenant), ("include_revoked", "true" if include_revoked else None)) if v}
    answer = _call(url, key, "GET", "/admin/keys" + (f"?{urllib.parse.urlencode(query)}" if query else ""))
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    for item in answer["data"]:
        _print_key(item)


@keys.command()
@_options
@click.argument("key_id")
def revoke(url: str, key: str, key_id: str) -> None:
    """Revoke KEY_ID on every instance (within a second)."""
    answer = _call(url, key, "DELETE", f"/admin/keys/{urllib.parse.quote(key_id, safe='')}")
    click.echo(f"revoked {answer['id']}")


@keys.command()
@_options
@click.argument("key_id")
def rotate(url: str, key: str, key_id: str) -> None:
    """Give KEY_ID a new secret (printed once); the old secret stops working."""
    answer = _call(url, key, "POST", f"/admin/keys/{urllib.parse.quote(key_id, safe='')}/rotate")
    click.echo(f"id:  {answer['id']}\nkey: {answer['key']}\n(the key is shown once: store it now)")


@click.group()
def tenants() -> None:
    """Create tenants and set their limits (master key)."""


@tenants.command("set")
@_options
@click.argument("name")
@click.option("--rpm", type=click.IntRange(1), help="Requests per minute for the whole tenant.")
@click.option("--tpm", type=click.IntRange(1), help="Tokens per minute for the whole tenant.")
@click.option("--fixed", is_flag=True, help="Pin the limits (no adaptive multipliers).")
def set_(url: str, key: str, name: str, rpm: int | None, tpm: int | None, fixed: bool) -> None:
    """Create tenant NAME or replace its limits."""
    answer = _call(url, key, "POST", "/admin/tenants", {"name": name, "limits": _limits(rpm, tpm, fixed)})
    click.echo(f"tenant {answer['name']}: {json.dumps(answer['limits'])}")


@tenants.command("list")
@_options
def list_tenants(url: str, key: str) -> None:
    """List tenants and their limits."""
    for item in _call(url, key, "GET", "/admin/tenants")["data"]:
        click.echo(f"{item['name']:<24} {json.dumps(item['limits'])}")
