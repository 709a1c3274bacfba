"""A circuit breaker per deployment, so an outage costs microseconds per request instead of timeouts.

States and transitions (nothing else changes state):

    closed    --failure x threshold-->  open
    open      --cooldown elapsed----->  half_open   (on the next allow(): that caller is the one probe)
    half_open --probe succeeds------->  closed
    half_open --probe fails---------->  open        (cooldown starts again)

While open, and while the half-open probe is in flight, ``allow()`` says no.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

from atajo.settings import BreakerSettings

Clock = Callable[[], float]


class State(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    __slots__ = ("_clock", "_failures", "_opened_at", "_probing", "cooldown_s", "state", "threshold")

    def __init__(self, threshold: int, cooldown_s: float, clock: Clock) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self.state = State.HALF_OPEN
            self._probing = False
        if self.state is State.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def available(self) -> bool:
        """Would ``allow()`` say yes now? Asked without taking the half-open probe (routing looks, then calls)."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return self._clock() - self._opened_at >= self.cooldown_s
        return not self._probing

    def allow_retry(self) -> bool:
        """May a caller that was let through call again after a failure? Not once the circuit has opened."""
        return self.state is State.CLOSED

    def retry_in_s(self) -> float:
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def success(self) -> None:
        self.state = State.CLOSED
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self.threshold:
            self.state = State.OPEN
            self._opened_at = self._clock()
            self._probing = False

    def abandon(self) -> None:
        """The probe ended without a verdict (the client went away): let the next caller probe."""
        self._probing = False


class BreakerBoard:
    """All deployments' breakers, created on first use."""

    def __init__(self, settings: BreakerSettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}

    def get(self, deployment_id: str) -> Breaker:
        breaker = self._breakers.get(deployment_id)
        if breaker is None:
            breaker = Breaker(self.settings.failure_threshold, self.settings.cooldown_s, self.clock)
            self._breakers[deployment_id] = breaker
        return breaker

    def states(self) -> dict[str, State]:
        return {name: b.state for name, b in self._breakers.items()}
