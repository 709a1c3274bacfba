"""``atajo keys create | list | revoke | rotate`` and ``atajo tenants set | list``: the admin API of a running
gateway (master key), so every instance hears of the change through the key store."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from atajo.cli.gateway_api import call, options

KEY_HELP = "The master key (env ATAJO_MASTER_KEY)."


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
@options(KEY_HELP)
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
    answer = call(url, key, "POST", "/admin/keys", body)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"id:  {answer['id']}\nkey: {answer['key']}\n(the key is shown once: store it now)")


@keys.command("list")
@options(KEY_HELP)
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def list_(url: str, key: str, tenant: str | None, include_revoked: bool, as_json: bool) -> None:
    """List keys (never their secrets)."""
    query = {k: v for k, v in (("tenant", tenant), ("include_revoked", "true" if include_revoked else None)) if v}
    answer = call(url, key, "GET", "/admin/keys" + (f"?{urllib.parse.urlencode(query)}" if query else ""))
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    for item in answer["data"]:
        _print_key(item)


@keys.command()
@options(KEY_HELP)
@click.argument("key_id")
def revoke(url: str, key: str, key_id: str) -> None:
    """Revoke KEY_ID on every instance (within a second)."""
    answer = call(url, key, "DELETE", f"/admin/keys/{urllib.parse.quote(key_id, safe='')}")
    click.echo(f"revoked {answer['id']}")


@keys.command()
@options(KEY_HELP)
@click.argument("key_id")
def rotate(url: str, key: str, key_id: str) -> None:
    """Give KEY_ID a new secret (printed once); the old secret stops working."""
    answer = call(url, key, "POST", f"/admin/keys/{urllib.parse.quote(key_id, safe='')}/rotate")
    click.echo(f"id:  {answer['id']}\nkey: {answer['key']}\n(the key is shown once: store it now)")


@click.group()
def tenants() -> None:
    """Create tenants and set their limits (master key)."""


@tenants.command("set")
@options(KEY_HELP)
@click.argument("name")
@click.option("--rpm", type=click.IntRange(1), help="Requests per minute for the whole tenant.")
@click.option("--tpm", type=click.IntRange(1), help="Tokens per minute for the whole tenant.")
@click.option("--fixed", is_flag=True, help="Pin the limits (no adaptive multipliers).")
def set_(url: str, key: str, name: str, rpm: int | None, tpm: int | None, fixed: bool) -> None:
    """Create tenant NAME or replace its limits."""
    answer = call(url, key, "POST", "/admin/tenants", {"name": name, "limits": _limits(rpm, tpm, fixed)})
    click.echo(f"tenant {answer['name']}: {json.dumps(answer['limits'])}")


@tenants.command("list")
@options(KEY_HELP)
def list_tenants(url: str, key: str) -> None:
    """List tenants and their limits."""
    for item in call(url, key, "GET", "/admin/tenants")["data"]:
        click.echo(f"{item['name']:<24} {json.dumps(item['limits'])}")
