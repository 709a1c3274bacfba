"""The circuit breaker, one transition at a time, on an injected clock (no test waits on real time)."""

from __future__ import annotations

import pytest

from atajo.routing.breaker import Breaker, BreakerBoard, State
from atajo.settings import BreakerSettings
from tests.doubles import FakeClock


def state(breaker: Breaker) -> State:
    return breaker.state


def opened(threshold: int = 3, cooldown_s: float = 30.0) -> tuple[Breaker, FakeClock]:
    clock = FakeClock()
    breaker = Breaker(threshold, cooldown_s, clock)
    for _ in range(threshold):
        breaker.failure()
    assert state(breaker) is State.OPEN
    return breaker, clock


def half_open() -> tuple[Breaker, FakeClock]:
    breaker, clock = opened()
    clock.advance(30.0)
    assert breaker.allow()  # this caller is the probe
    assert state(breaker) is State.HALF_OPEN
    return breaker, clock


def test_starts_closed_and_lets_everyone_through() -> None:
    breaker = Breaker(3, 30.0, FakeClock())
    assert state(breaker) is State.CLOSED
    assert all(breaker.allow() for _ in range(100))
    assert breaker.allow_retry()


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = Breaker(3, 30.0, FakeClock())
    breaker.failure()
    breaker.failure()
    assert state(breaker) is State.CLOSED and breaker.allow()
    breaker.failure()
    assert state(breaker) is State.OPEN


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = Breaker(3, 30.0, FakeClock())
    for _ in range(10):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert state(breaker) is State.CLOSED


def test_open_rejects_until_the_cooldown_has_elapsed() -> None:
    breaker, clock = opened(cooldown_s=30.0)
    assert not breaker.allow()
    assert not breaker.allow_retry()
    assert breaker.retry_in_s() == pytest.approx(30.0)
    clock.advance(29.9)
    assert not breaker.allow()
    assert state(breaker) is State.OPEN
    assert breaker.retry_in_s() == pytest.approx(0.1)


def test_after_the_cooldown_exactly_one_probe_goes_through() -> None:
    breaker, clock = opened(cooldown_s=30.0)
    clock.advance(30.0)
    assert breaker.allow()
    assert state(breaker) is State.HALF_OPEN
    assert [breaker.allow() for _ in range(50)] == [False] * 50  # the probe is in flight
    assert not breaker.allow_retry()  # the probe itself gets no retries on the same deployment
    clock.advance(1000.0)
    assert not breaker.allow()  # however long it takes


def test_probe_success_closes() -> None:
    breaker, _ = half_open()
    breaker.success()
    assert state(breaker) is State.CLOSED
    assert breaker.allow() and breaker.allow()
    # and the failure count starts again from zero
    breaker.failure()
    breaker.failure()
    assert state(breaker) is State.CLOSED


def test_probe_failure_reopens_with_a_fresh_cooldown() -> None:
    breaker, clock = half_open()
    clock.advance(5.0)  # the probe took a while
    breaker.failure()
    assert state(breaker) is State.OPEN
    assert not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(30.0)
    clock.advance(29.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    assert state(breaker) is State.HALF_OPEN


def test_a_single_failure_in_half_open_reopens_regardless_of_threshold() -> None:
    breaker, _ = half_open()
    assert breaker.threshold == 3
    breaker.failure()
    assert state(breaker) is State.OPEN


def test_abandon_lets_the_next_caller_probe() -> None:
    breaker, _ = half_open()
    assert not breaker.allow()
    breaker.abandon()  # the probe's client went away: no verdict
    assert state(breaker) is State.HALF_OPEN
    assert breaker.allow()  # a new probe
    assert not breaker.allow()  # and only one


def test_abandon_when_closed_changes_nothing() -> None:
    breaker = Breaker(2, 30.0, FakeClock())
    breaker.failure()
    breaker.abandon()
    assert state(breaker) is State.CLOSED
    breaker.failure()
    assert state(breaker) is State.OPEN  # the earlier failure still counted


def test_abandon_when_open_does_not_let_anyone_through() -> None:
    breaker, _ = opened()
    breaker.abandon()
    assert state(breaker) is State.OPEN
    assert not breaker.allow()


def test_threshold_of_one_opens_on_the_first_failure() -> None:
    breaker = Breaker(1, 10.0, FakeClock())
    breaker.failure()
    assert state(breaker) is State.OPEN and not breaker.allow()


def test_board_creates_one_breaker_per_deployment_with_settings_and_clock() -> None:
    clock = FakeClock()
    board = BreakerBoard(BreakerSettings(failure_threshold=2, cooldown_s=7.0), clock=clock)
    a = board.get("m/0:openai")
    assert board.get("m/0:openai") is a
    b = board.get("m/1:openai")
    assert b is not a
    assert (a.threshold, a.cooldown_s) == (2, 7.0)
    a.failure()
    a.failure()
    assert board.states() == {"m/0:openai": State.OPEN, "m/1:openai": State.CLOSED}
    clock.advance(7.0)
    assert a.allow()
    assert board.states()["m/0:openai"] is State.HALF_OPEN
    assert int(State.CLOSED) == 0 and int(State.HALF_OPEN) == 1 and int(State.OPEN) == 2  # the metric's encoding
