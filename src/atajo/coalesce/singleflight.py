"""Single-flight: callers asking for the same key while a call is in flight share that one call.

The call runs in a task of its own, apart from every caller, so callers come and go freely:

- a caller that is cancelled (its client left) stops waiting, and the call goes on for the others, whether
  that caller started the call (the leader) or joined it (a follower);
- the call is cancelled only once no caller waits on it any more;
- an exception from the call is raised to every caller (the same exception object);
- the key is released the moment the call finishes: a caller arriving afterwards starts a new call (answers
  that should outlive their call belong in a cache, not here).

Nothing here knows what is being called; the pipeline's coalesce stage decides what is worth sharing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    """One call in flight and how many callers still wait on it."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[T] | None = None
        self.waiters = 1


@dataclass(frozen=True, slots=True)
class FlightStats:
    leaders: int
    """Calls started."""
    followers: int
    """Callers that joined a call in flight: calls saved."""
    in_flight: int
    """Keys with a call running now."""


class SingleFlight(Generic[T]):
    """Runs at most one call per key at a time; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self._abandoned: set[asyncio.Task[T]] = set()  # cancelled, still winding down: held so they are not lost
        self.leaders = 0
        self.followers = 0

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def busy(self, key: str) -> bool:
        """Whether a call for ``key`` is in flight now (a caller would join it)."""
        return key in self._flights

    def stats(self) -> FlightStats:
        return FlightStats(self.leaders, self.followers, len(self._flights))

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``call()``'s result and whether it was shared: False for the caller that started the call (the
        leader), True for those that joined it (followers, whose own ``call`` is never invoked)."""
        flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = self._start(key, call)
            self.leaders += 1
        else:
            flight.waiters += 1
            self.followers += 1
        task = flight.task
        assert task is not None
        try:
            # ``wait`` (unlike awaiting the task) leaves the task running when this caller is cancelled.
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            self._leave(key, flight, task)
            raise
        return task.result(), shared

    def _start(self, key: str, call: Callable[[], Awaitable[T]]) -> _Flight[T]:
        flight: _Flight[T] = _Flight()

        async def invoke() -> T:
            try:
                return await call()
            finally:
                # Released before the task completes, so no caller can join a call that has finished.
                if self._flights.get(key) is flight:
                    del self._flights[key]

        task = asyncio.get_running_loop().create_task(invoke())
        # Every caller may be gone by the time the call fails: mark the outcome retrieved here, so a lone
        # failure is not reported as "Task exception was never retrieved" (callers still get it).
        task.add_done_callback(_retrieve)
        flight.task = task
        self._flights[key] = flight
        return flight

    def _leave(self, key: str, flight: _Flight[T], task: asyncio.Task[T]) -> None:
        flight.waiters -= 1
        if flight.waiters > 0 or task.done():
            return
        if self._flights.get(key) is flight:
            del self._flights[key]  # a caller arriving now starts afresh instead of joining a dying call
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        task.cancel()


def _retrieve(task: asyncio.Task[T]) -> None:
    if not task.cancelled():
        task.exception()
