"""Summaries of the cost ledger: what requests cost, what they would have cost on the requested model with no
cache and no routing (the baseline), and what was saved, by cause and by tenant."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from atajo.core.sqlite import numbered
from atajo.observe.ledger import CAUSES, TABLE, sqlite_path


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    requests: int
    cost_micros: int
    baseline_micros: int
    tokens: int

    @property
    def saved_micros(self) -> int:
        return self.baseline_micros - self.cost_micros

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_micros": self.saved_micros}


@dataclass(frozen=True, slots=True)
class CostReport:
    since: float | None
    until: float | None
    by_cause: list[Row]
    by_tenant: list[Row]

    @property
    def total(self) -> Row:
        rows = self.by_cause
        return Row(
            "total",
            sum(r.requests for r in rows),
            sum(r.cost_micros for r in rows),
            sum(r.baseline_micros for r in rows),
            sum(r.tokens for r in rows),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "total": self.total.to_dict(),
            "by_cause": [r.to_dict() for r in self.by_cause],
            "by_tenant": [r.to_dict() for r in self.by_tenant],
        }


def _query(column: str, since: float | None, until: float | None) -> tuple[str, list[float]]:
    where, args = [], []
    if since is not None:
        where.append("at >= ?")
        args.append(since)
    if until is not None:
        where.append("at < ?")
        args.append(until)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return (
        f"SELECT {column}, count(*), coalesce(sum(cost_micros), 0), coalesce(sum(baseline_micros), 0),"
        f" coalesce(sum(prompt_tokens + completion_tokens), 0) FROM {TABLE}{condition} GROUP BY {column}"
        f" ORDER BY {column}",
        args,
    )


def cost_report(url: str, since: float | None = None, until: float | None = None) -> CostReport:
    """Read the ledger at ``url`` (sqlite:/// or postgresql://) and summarise it."""
    queries = [_query("cause", since, until), _query("tenant", since, until)]
    scheme = url.partition("://")[0]
    results = _sqlite(url, queries) if scheme == "sqlite" else asyncio.run(_postgres(url, queries))
    causes = {str(r[0]): _row(r) for r in results[0]}
    by_cause = [causes.pop(c, Row(c, 0, 0, 0, 0)) for c in CAUSES] + list(causes.values())
    return CostReport(since, until, by_cause, [_row(r) for r in results[1]])


def _row(raw: Sequence[Any]) -> Row:
    return Row(str(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]))


def _sqlite(url: str, queries: list[tuple[str, list[float]]]) -> list[list[Sequence[Any]]]:
    path = sqlite_path(url.partition("://")[2])
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [conn.execute(sql, args).fetchall() for sql, args in queries]
    finally:
        conn.close()


async def _postgres(url: str, queries: list[tuple[str, list[float]]]) -> list[list[Sequence[Any]]]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        out = []
        for sql, args in queries:
            out.append(list(await conn.fetch(numbered(sql), *args)))
        return out
    finally:
        await conn.close()
