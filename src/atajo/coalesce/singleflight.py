"""Single-flight: callers asking for the same key while a call is in flight share that one call.

The call runs in a task of its own, apart from every caller, so callers come and go freely:

- a caller that is cancelled (its client left) stops waiting, and the call goes on for the others, whether
  that caller started the call (the leader) or joined it (a follower);
- the call is cancelled only once no caller waits on it any more;
- an exception from the call is raised to every caller (the same exception object);
- the key is released the moment the call finishes: a caller arriving afterwards starts a new call (answers
  that should outlive their call belong in a cache, not here).

Two ways in. ``run`` shares one value. ``join`` shares a *feed*: the call publishes items one by one (a
stream's head, then its chunks) and every subscriber reads all of them from the first, so a caller that
joins halfway gets what was already published, then the live items. The key is held until the call has
published its last item.

Nothing here knows what is being called; the pipeline's coalesce stage decides what is worth sharing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Feed(Generic[T]):
    """What a call has published so far, in order, and how it ended (``done``, ``error``)."""

    __slots__ = ("_wake", "done", "error", "items")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.done = False
        self.error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None

    def publish(self, item: T) -> None:
        self.items.append(item)
        self._notify()

    def end(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        self._wake = None

    async def changed(self) -> None:
        if self._wake is None:
            self._wake = asyncio.get_running_loop().create_future()
        # shield: one reader's cancellation must not cancel the future the others wait on
        await asyncio.shield(self._wake)


class _Flight(Generic[T]):
    """One call in flight and how many callers still wait on it."""

    __slots__ = ("feed", "task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.feed: Feed[T] = Feed()
        self.waiters = 1


class Subscription(Generic[T]):
    """One caller's reading of a feed, from its first item. Close it (``close``) when done or gone: the call
    is cancelled once every subscription is closed before the feed ended."""

    __slots__ = ("_closed", "_flight", "_key", "_owner", "_pos", "shared")

    def __init__(self, owner: SingleFlight[T], key: str, flight: _Flight[T], shared: bool) -> None:
        self._owner, self._key, self._flight = owner, key, flight
        self._pos = 0
        self._closed = False
        self.shared = shared
        """False for the caller that started the call (the leader), True for those that joined it."""

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        feed = self._flight.feed
        while self._pos >= len(feed.items):
            if feed.done:
                if feed.error is not None:
                    raise feed.error
                raise StopAsyncIteration
            await feed.changed()
        item = feed.items[self._pos]
        self._pos += 1
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._leave(self._key, self._flight)


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
        self._abandoned: set[asyncio.Task[None]] = set()  # cancelled, still winding down: held so they are not lost
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

        async def produce(feed: Feed[T]) -> None:
            feed.publish(await call())

        subscription = self.join(key, produce)
        try:
            return await anext(subscription), subscription.shared
        finally:
            subscription.close()

    def join(self, key: str, produce: Callable[[Feed[T]], Awaitable[None]]) -> Subscription[T]:
        """A subscription to the feed of the call in flight for ``key``, or of a new one, ``produce(feed)``,
        which publishes items and returns (or raises) at the end. The caller is counted from now on, so close
        the subscription in a ``finally``."""
        flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = self._start(key, produce)
            self.leaders += 1
        else:
            flight.waiters += 1
            self.followers += 1
        return Subscription(self, key, flight, shared)

    def _start(self, key: str, produce: Callable[[Feed[T]], Awaitable[None]]) -> _Flight[T]:
        flight: _Flight[T] = _Flight()

        async def invoke() -> None:
            error: BaseException | None = None
            try:
                await produce(flight.feed)
            except asyncio.CancelledError as exc:
                error = exc
                raise
            except Exception as exc:  # handed to every subscriber, each raises it
                error = exc
            finally:
                # Released before the feed ends, so no caller can join a call that has finished.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.feed.end(error)

        flight.task = asyncio.get_running_loop().create_task(invoke())
        self._flights[key] = flight
        return flight

    def _leave(self, key: str, flight: _Flight[T]) -> None:
        flight.waiters -= 1
        task = flight.task
        assert task is not None
        if flight.waiters > 0 or task.done() or flight.feed.done:
            return
        if self._flights.get(key) is flight:
            del self._flights[key]  # a caller arriving now starts afresh instead of joining a dying call
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        task.cancel()
