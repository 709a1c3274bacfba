"""``atajo cache stats | invalidate | flush``: the cache operations of a running gateway, over its HTTP API.

They go through the gateway rather than to the tiers directly, so a running instance's in-process tier
(and, through the invalidation bus, every other instance's) is included.
"""

from __future__ import annotations

import json
from typing import Any

import click

from atajo.cli.gateway_api import call, options

KEY_HELP = "API key: the master key for stats and flush, any key to invalidate its tenant (env ATAJO_MASTER_KEY)."


@click.group()
def cache() -> None:
    """Inspect and invalidate a running gateway's cache."""


@cache.command()
@options(KEY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def stats(url: str, key: str, as_json: bool) -> None:
    """Entries, bytes and evictions per tier."""
    answer = call(url, key, "GET", "/v1/cache/stats")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"{'tier':<8} {'up':<4} {'ttl':>8} {'entries':>10} {'bytes':>14} {'evictions':>10}")
    for tier in answer["tiers"]:
        up = "yes" if tier["up"] else "NO"
        click.echo(
            f"{tier['name']:<8} {up:<4} {tier['ttl_s']:>7g}s {tier['entries']:>10,} {tier['bytes']:>14,} "
            f"{tier['evictions']:>10,}"
        )


@cache.command()
@options(KEY_HELP)
@click.option("--tag", "tags", multiple=True, help="A dependency tag (repeatable); dependents go too.")
@click.option("--namespace", help="Only entries of this namespace (alone: all of them).")
@click.option("--key-prefix", help="Only entries whose key (as in x-atajo-cache-key) starts with this.")
@click.option("--tenant", help="Another tenant (master key only), or '*' for every tenant.")
def invalidate(
    url: str, key: str, tags: tuple[str, ...], namespace: str | None, key_prefix: str | None, tenant: str | None
) -> None:
    """Drop the entries that depend on the given tags, namespace or key prefix, in every tier."""
    body: dict[str, Any] = {"tags": list(tags)}
    for name, value in (("namespace", namespace), ("key_prefix", key_prefix), ("tenant", tenant)):
        if value is not None:
            body[name] = value
    answer = call(url, key, "POST", "/v1/cache/invalidate", body)
    tiers = ", ".join(f"{name} {n}" for name, n in answer["tiers"].items())
    click.echo(f"dropped {answer['dropped']} entries ({tiers}); tags: {', '.join(answer['tags']) or '-'}")


@cache.command()
@options(KEY_HELP)
@click.option("--tenant", help="Only this tenant's entries (default: every tenant).")
@click.confirmation_option(prompt="Drop every cached answer?")
def flush(url: str, key: str, tenant: str | None) -> None:
    """Drop every entry (of one tenant, or all), in every tier. Master key only."""
    answer = call(url, key, "POST", "/v1/cache/flush", {"tenant": tenant} if tenant else {})
    tiers = ", ".join(f"{name} {n}" for name, n in answer["tiers"].items())
    click.echo(f"dropped {answer['dropped']} entries ({tiers})")
