"""``atajo report costs``: what the ledger says requests cost and saved, by cause and by tenant."""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from atajo.errors import ConfigError
from atajo.observe.report import CostReport, Row, cost_report
from atajo.settings import load_settings


@click.group()
def report() -> None:
    """Summaries of what the gateway recorded."""


@report.command("costs")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="ATAJO_CONFIG",
              help="Config file whose ledger.url to read (env: ATAJO_CONFIG).")  # fmt: skip
@click.option("--url", help="Ledger database URL (sqlite:///… or postgresql://…); default: the config's ledger.url.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="From this UTC date or time.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="Before this UTC date or time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
def costs(
    config_path: Path | None, url: str | None, since: datetime | None, until: datetime | None, as_json: bool
) -> None:
    """Cost, baseline (the requested model, no cache, no routing) and savings, by cause and by tenant.

    Amounts are in micro-units of the catalog's currency in --json, in the currency in tables."""
    try:
        settings = load_settings(config_path)
    except ConfigError as err:
        click.echo(f"config error: {err.message}", err=True)
        sys.exit(err.exit_code)
    url = url or settings.ledger.url
    start = since.replace(tzinfo=UTC).timestamp() if since else None
    end = until.replace(tzinfo=UTC).timestamp() if until else None
    try:
        summary = cost_report(url, start, end)
    except (OSError, sqlite3.Error) as exc:
        click.echo(f"cannot read the ledger at {url}: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    click.echo(render(summary))


def render(summary: CostReport) -> str:
    def when(ts: float | None, default: str) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts is not None else default

    total = summary.total
    lines = [
        f"Ledger from {when(summary.since, 'the start')} to {when(summary.until, 'now')}: {total.requests} requests"
    ]
    for title, rows in (("cause", summary.by_cause), ("tenant", summary.by_tenant)):
        lines.append("")
        lines.append(_table(title, [*rows, total]))
    return "\n".join(lines)


def _table(title: str, rows: list[Row]) -> str:
    header = (title, "requests", "tokens", "cost", "baseline", "saved", "saved %")
    body = [
        (r.name, str(r.requests), str(r.tokens), _money(r.cost_micros), _money(r.baseline_micros),
         _money(r.saved_micros), f"{100 * r.saved_micros / r.baseline_micros:.1f}" if r.baseline_micros else "-")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *body]
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _money(micros: int) -> str:
    return f"{micros / 1e6:.6f}"
