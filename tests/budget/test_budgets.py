"""Budgets and their stores without HTTP: the same assertions for the in-process store and Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from atajo.budget.budgets import Budgets
from atajo.budget.memory import MemoryBudgetStore
from atajo.budget.store import BudgetStore, Charge
from atajo.errors import BudgetExceeded
from atajo.observe.metrics import BudgetMetrics
from atajo.settings import BudgetLimit
from tests.cache.conftest import need_server


class Clock:
    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgetStore(Clock(datetime(2025, 1, 1, tzinfo=UTC)))
        return
    need_server("Redis", "127.0.0.1", 6379)
    from atajo.budget.redis import RedisBudgetStore

    prefix = f"atajo:test:budget:{uuid.uuid4().hex}:"
    redis_store = RedisBudgetStore("redis://127.0.0.1:6379/0", prefix=prefix)
    yield redis_store
    client = redis_store._redis()
    keys = [k async for k in client.scan_iter(prefix + "*")]
    if keys:
        await client.delete(*keys)
    await redis_store.close()


async def test_reserve_adds_all_or_nothing(store: BudgetStore) -> None:
    a, b = Charge("a", 5, 10, 60), Charge("b", 5, 7, 60)
    assert (await store.reserve([a, b])).refused is None
    refused = await store.reserve([a, b])  # a would reach 10 (fits), b 10 > 7: neither is added
    assert refused.refused == 1 and refused.values == (5, 5)
    assert await store.values(["a", "b"]) == (5, 5)
    assert await store.adjust([Charge("a", -3, 10, 60), Charge("b", 0, 7, 60)]) == (2, 5)
    assert (await store.reserve([Charge("a", 8, 10, 60)])).values == (10,)


def budgets(clock: Clock, *limits: dict[str, Any]) -> tuple[Budgets, BudgetMetrics]:
    metrics = BudgetMetrics()
    parsed = [BudgetLimit.model_validate(limit) for limit in limits]
    return Budgets(parsed, MemoryBudgetStore(clock), metrics, currency="USD", clock=clock), metrics


def test_which_budgets_apply() -> None:
    clock = Clock(datetime(2025, 12, 31, 23, 30, tzinfo=UTC))
    b, _ = budgets(
        clock,
        {"scope": "global", "period": "month", "max_cost": 10, "max_tokens": 1000},
        {"scope": "tenant", "match": "acme", "period": "day", "max_cost": 1},
        {"scope": "key", "period": "day", "max_tokens": 50},
    )
    lines = b.lines("acme", "web")
    assert [(line.budget, line.unit) for line in lines] == [
        ("global/month", "cost"), ("global/month", "tokens"), ("tenant:acme/day", "cost"), ("key:web/day", "tokens"),
    ]  # fmt: skip
    assert lines[0].key == "global/month||2025-12|cost" and lines[0].limit == 10_000_000
    assert lines[0].ends == datetime(2026, 1, 1, tzinfo=UTC)
    assert lines[2].ends == datetime(2026, 1, 1, tzinfo=UTC) and lines[2].key.endswith("|2025-12-31|cost")
    assert [line.budget for line in b.lines("other", "web")] == ["global/month", "global/month", "key:web/day"]


async def test_a_new_day_starts_a_new_window() -> None:
    clock = Clock(datetime(2025, 3, 1, 23, 59, tzinfo=UTC))
    b, _ = budgets(clock, {"scope": "global", "period": "day", "max_tokens": 10})
    await b.reserve("t", "k", 0, 10)
    with pytest.raises(BudgetExceeded) as caught:
        await b.reserve("t", "k", 0, 1)
    assert "resets at 2025-03-02T00:00:00Z" in caught.value.message and caught.value.retry_after_s == 60
    clock.now += 120
    assert await b.reserve("t", "k", 0, 10) is not None


async def test_settle_gives_back_and_alerts_once() -> None:
    clock = Clock(datetime(2025, 3, 1, tzinfo=UTC))
    b, metrics = budgets(clock, {"scope": "global", "period": "day", "max_cost": 0.001, "alert_at": 0.5})
    hold = await b.reserve("t", "k", 900, 0)
    assert hold is not None and hold.warnings == []
    b.settle(hold, 300, 0)
    await b.close()  # waits for the settlement
    (line,) = b.lines("t", "k")
    assert await b.store.values([line.key]) == (300,)
    assert metrics.alerts.labels("global/day").value == 0
    for _ in range(2):
        hold = await b.reserve("t", "k", 300, 0)
        assert hold is not None
        b.settle(hold, 300, 0)
        await b.close()
    assert metrics.alerts.labels("global/day").value == 1  # 600 >= 500 > 300: crossed once
    hold = await b.reserve("t", "k", 100, 0)
    assert hold is not None and hold.warnings == ["global/day cost at 90%"]


async def test_a_virtual_keys_own_budget_is_money_per_month_beside_the_configured_ones() -> None:
    clock = Clock(datetime(2025, 3, 31, 12, tzinfo=UTC))
    b, _ = budgets(clock, {"scope": "key", "period": "day", "max_cost": 1})
    (day, own) = b.lines("acme", "key_0123456789abcdef", 5_000)
    assert day.budget == "key:key_0123456789abcdef/day"
    assert (own.budget, own.unit, own.limit, own.period) == ("key:key_0123456789abcdef/month", "cost", 5_000, "month")
    assert own.ends == datetime(2025, 4, 1, tzinfo=UTC) and own.key != day.key
    assert await b.reserve("acme", "key_0123456789abcdef", 5_000, 0, 5_000) is not None
    with pytest.raises(BudgetExceeded) as caught:
        await b.reserve("acme", "key_0123456789abcdef", 1, 0, 5_000)
    assert caught.value.message.startswith("Budget `key:key_0123456789abcdef/month` would be exceeded")
    assert "this month" in caught.value.message and "resets at 2025-04-01T00:00:00Z" in caught.value.message
    assert await b.reserve("acme", "key_0123456789abcdef", 1, 0) is not None  # without it: only the daily one


def test_lines_are_worked_out_again_when_any_of_their_windows_ends() -> None:
    clock = Clock(datetime(2025, 3, 31, 23, 59, tzinfo=UTC))
    daily = {"scope": "global", "period": "day", "max_tokens": 10}
    b, _ = budgets(clock, daily, {"scope": "key", "period": "month", "max_tokens": 9})
    march = [line.key for line in b.lines("t", "k")]
    assert march[0].endswith("|2025-03-31|tokens") and march[1].endswith("|2025-03|tokens")
    clock.now += 120  # a new day and a new month
    april = [line.key for line in b.lines("t", "k")]
    assert april[0].endswith("|2025-04-01|tokens") and april[1].endswith("|2025-04|tokens")
    clock.now -= 120  # a clock set back: its own window again, not the one worked out last
    assert [line.key for line in b.lines("t", "k")] == march
