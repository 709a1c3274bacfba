"""Budgets in force for a request, and their reservations.

Before a call, ``reserve`` adds the most the request may cost (money in micro-units, tokens) to the counter of
every budget that applies to its key and tenant, in the current day or month (UTC), if all stay within their
limits (the configured ones, and a virtual key's own ``budget_micros``: money per calendar month); else nothing
is added and ``BudgetExceeded`` names the first budget that would be exceeded. After the call, ``settle`` adds
the difference between the actual figures and the reservation (negative when the answer cost less). Since
counters include what is reserved, concurrent requests cannot together pass a limit: the last reservations
that would not fit are refused.

Crossing a budget's ``alert_at`` share raises a soft alert once (a log line and a metric, from the instance
whose request crossed it); every answer given past it carries ``x-atajo-budget-warning``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from atajo.budget.store import BudgetStore, Charge, StoreUnavailable
from atajo.errors import BudgetExceeded, ServiceUnavailable
from atajo.settings import BudgetLimit, to_micros

log = logging.getLogger("atajo.budget")

Unit = Literal["cost", "tokens"]
KEEP_AFTER_WINDOW_S = 86_400
"""Counters outlive their window by a day, so a reservation settled just after midnight still finds its own."""
KEY_ALERT_AT = 0.8
"""The soft limit of a virtual key's own budget (``budget_micros``), as a configured budget's default."""


class BudgetObserver(Protocol):
    def rejected(self, budget: str) -> None: ...

    def alert(self, budget: str) -> None: ...

    def used(self, budget: str, unit: str, value: int, limit: int) -> None: ...

    def store_error(self, operation: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Line:
    """One counter a request is charged to."""

    budget: str
    """Shown in errors and metrics: the budget's name, with the key or tenant when it matches each one."""
    unit: Unit
    key: str
    limit: int
    alert_at: float
    ends: datetime
    period: str
    ends_s: float
    """``ends`` as a timestamp (the counter's time to live is counted from it at every charge)."""


@dataclass(slots=True)
class Hold:
    """What was reserved for one call; ``settle`` turns it into the actual figures."""

    lines: list[_Line]
    cost_micros: int
    tokens: int
    warnings: list[str] = field(default_factory=list)

    def amount(self, unit: Unit) -> int:
        return self.cost_micros if unit == "cost" else self.tokens


class Budgets:
    def __init__(
        self,
        limits: Sequence[BudgetLimit],
        store: BudgetStore,
        observer: BudgetObserver,
        *,
        currency: str,
        clock: Callable[[], float],
        on_store_error: Literal["reject", "allow"] = "reject",
    ) -> None:
        self.limits = list(limits)
        self.store = store
        self.observer = observer
        self.currency = currency
        self.clock = clock
        self.on_store_error = on_store_error
        self._settling: set[asyncio.Task[None]] = set()
        self._lines: dict[tuple[str, str, int | None], tuple[float, float, tuple[_Line, ...]]] = {}
        """(tenant, key, key budget) → (from, until, its lines): the lines hold until a window ends."""

    def __bool__(self) -> bool:
        return bool(self.limits)

    def lines(self, tenant: str, key_name: str, key_budget_micros: int | None = None) -> list[_Line]:
        """The counters a request is charged to: every configured budget that matches, then the key's own
        budget (a virtual key's ``budget_micros``, money per calendar month, named ``key:<id>/month``). Worked
        out once per key and window: the same until the first of its windows ends."""
        now_s = self.clock()
        memo = (tenant, key_name, key_budget_micros)
        known = self._lines.get(memo)
        if known is not None and known[0] <= now_s < known[1]:
            return list(known[2])
        now = datetime.fromtimestamp(now_s, UTC)
        lines = self._work_out_lines(tenant, key_name, key_budget_micros, now)
        since = max(
            (_window(now, period)[1].timestamp() for period in {line.period for line in lines}), default=-math.inf
        )
        until = min((line.ends_s for line in lines), default=math.inf)
        if len(self._lines) >= 10_000:  # keys and tenants come and go: never grow without bound
            self._lines.clear()
        self._lines[memo] = (since, until, tuple(lines))
        return lines

    def _work_out_lines(self, tenant: str, key_name: str, key_budget_micros: int | None, now: datetime) -> list[_Line]:
        lines = []
        for limit in self.limits:
            subject = {"global": "", "tenant": tenant, "key": key_name}[limit.scope]
            if limit.match not in ("*", subject):
                continue
            name = limit.label
            if limit.match == "*" and limit.scope != "global":
                name = f"{limit.name}:{subject}" if limit.name else f"{limit.scope}:{subject}/{limit.period}"
            window, _, ends = _window(now, limit.period)
            for unit, amount in (("cost", limit.max_cost), ("tokens", limit.max_tokens)):
                if amount is None:
                    continue
                cap = to_micros(amount) if unit == "cost" else int(amount)
                key = f"{limit.label}|{subject}|{window}|{unit}"
                line = _Line(name, unit, key, cap, limit.alert_at, ends, limit.period, ends.timestamp())  # type: ignore[arg-type]
                lines.append(line)
        if key_budget_micros is not None:
            window, _, ends = _window(now, "month")
            key = f"virtual-key|{key_name}|{window}|cost"  # no configured budget's counter starts so
            name = f"key:{key_name}/month"
            lines.append(_Line(name, "cost", key, key_budget_micros, KEY_ALERT_AT, ends, "month", ends.timestamp()))
        return lines

    async def reserve(
        self, tenant: str, key_name: str, cost_micros: int, tokens: int, key_budget_micros: int | None = None
    ) -> Hold | None:
        """Reserve, or raise ``BudgetExceeded``; None when no budget applies (or the store is down and
        ``on_store_error`` is ``allow``)."""
        lines = self.lines(tenant, key_name, key_budget_micros)
        if not lines:
            return None
        hold = Hold(lines, cost_micros, tokens)
        charges = [self._charge(line, hold.amount(line.unit)) for line in lines]
        try:
            reserved = await self.store.reserve(charges)
        except StoreUnavailable as exc:
            self.observer.store_error("reserve")
            if self.on_store_error == "allow":
                log.warning("budget store unreachable, request let through unchecked: %s", exc)
                return None
            raise ServiceUnavailable(
                "Budgets cannot be checked right now (their store is unreachable); retry shortly."
            ) from None
        if reserved.refused is not None:
            line = lines[reserved.refused]
            self.observer.rejected(line.budget)
            raise self._exceeded(line, reserved.values[reserved.refused], hold.amount(line.unit))
        self._after(hold, reserved.values, [hold.amount(line.unit) for line in lines], settled=False)
        return hold

    def settle(self, hold: Hold, cost_micros: int, tokens: int) -> None:
        """Replace the reservation by the actual figures, in the background (the answer is not held up, and a
        cancelled request still settles). ``close`` waits for pending settlements."""
        deltas = [(cost_micros if line.unit == "cost" else tokens) - hold.amount(line.unit) for line in hold.lines]
        task = asyncio.get_running_loop().create_task(self._settle(hold, deltas))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, hold: Hold, deltas: list[int]) -> None:
        charges = [self._charge(line, delta) for line, delta in zip(hold.lines, deltas, strict=True)]
        try:
            values = await self.store.adjust(charges)
        except StoreUnavailable as exc:
            # Fail-open, counted: the counter keeps the reservation (an over-count, never an under-count when
            # the answer cost less than reserved).
            self.observer.store_error("settle")
            log.warning("budget store unreachable, a reservation was not reconciled: %s", exc)
            return
        self._after(hold, values, deltas, settled=True)

    def _after(self, hold: Hold, values: Sequence[int], added: Sequence[int], *, settled: bool) -> None:
        """After a reservation: warn when the budget was already past its soft limit before this request. After
        a settlement: alert when this request's actual use took it past (with other requests' reservations
        counted, as they will be spent or given back)."""
        for line, value, delta in zip(hold.lines, values, added, strict=True):
            self.observer.used(line.budget, line.unit, value, line.limit)
            threshold = line.alert_at * line.limit
            if not settled:
                if value - delta >= threshold:
                    hold.warnings.append(f"{line.budget} {line.unit} at {100 * (value - delta) / line.limit:.0f}%")
                continue
            actual = hold.amount(line.unit) + delta
            if value >= threshold > value - actual:
                self.observer.alert(line.budget)
                log.warning(
                    "budget %s passed %.0f%% of its %s limit (%s of %s)",
                    line.budget, 100 * line.alert_at, line.unit, self._show(line.unit, value),
                    self._show(line.unit, line.limit),
                )  # fmt: skip

    def _charge(self, line: _Line, amount: int) -> Charge:
        ttl = int(line.ends_s - self.clock()) + KEEP_AFTER_WINDOW_S
        return Charge(line.key, amount, line.limit, max(ttl, 1))

    def _exceeded(self, line: _Line, value: int, amount: int) -> BudgetExceeded:
        now = datetime.fromtimestamp(self.clock(), UTC)
        wait_s = max(1.0, (line.ends - now).total_seconds())
        period = "today" if line.period == "day" else "this month"
        return BudgetExceeded(
            f"Budget `{line.budget}` would be exceeded: {self._show(line.unit, value)} of "
            f"{self._show(line.unit, line.limit)} already spent or reserved {period}, and this request may use up to "
            f"{self._show(line.unit, amount)}. It resets at {line.ends.isoformat().replace('+00:00', 'Z')}.",
            retry_after_s=math.ceil(wait_s),
        )

    def _show(self, unit: Unit, value: int) -> str:
        return f"{value / 1e6:.6f} {self.currency}" if unit == "cost" else f"{value} tokens"

    async def close(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.store.close()


def _window(now: datetime, period: str) -> tuple[str, datetime, datetime]:
    """The current window's name, its start and its end (UTC)."""
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    ends = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.strftime("%Y-%m"), start, ends
