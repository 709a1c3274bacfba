"""SingleFlight on its own: calls that block on events, so callers really overlap (nothing waits on time)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from atajo.coalesce.singleflight import FlightStats, SingleFlight


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Call:
    """A call that counts its invocations, blocks until released, then answers (or fails)."""

    def __init__(self, answer: str = "answer", error: Exception | None = None) -> None:
        self.answer = answer
        self.error = error
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return f"{self.answer}-{self.calls}"


async def test_concurrent_identical_runs_share_one_call() -> None:
    flight: SingleFlight[str] = SingleFlight()
    call = Call()
    tasks = [asyncio.create_task(flight.run("k", call)) for _ in range(200)]
    await settle()
    assert call.calls == 1
    assert flight.stats() == FlightStats(leaders=1, followers=199, in_flight=1)

    call.release.set()
    outcomes = await asyncio.gather(*tasks)

    assert call.calls == 1
    assert {result for result, _ in outcomes} == {"answer-1"}
    assert sum(shared for _, shared in outcomes) == 199
    assert outcomes[0] == ("answer-1", False)  # the first caller led
    assert flight.in_flight == 0


async def test_different_keys_make_separate_calls() -> None:
    flight: SingleFlight[str] = SingleFlight()
    calls = {key: Call(answer=key) for key in ("a", "b", "c")}
    tasks = [asyncio.create_task(flight.run(key, calls[key])) for key in ("a", "b", "c", "a", "b", "c")]
    await settle()
    assert flight.in_flight == 3
    for call in calls.values():
        call.release.set()
    outcomes = await asyncio.gather(*tasks)

    assert [result for result, _ in outcomes] == ["a-1", "b-1", "c-1"] * 2
    assert [shared for _, shared in outcomes] == [False] * 3 + [True] * 3
    assert all(call.calls == 1 for call in calls.values())
    assert (flight.leaders, flight.followers, flight.in_flight) == (3, 3, 0)


async def test_an_exception_reaches_every_caller_and_releases_the_key() -> None:
    flight: SingleFlight[str] = SingleFlight()
    error = ValueError("provider on fire")
    failing = Call(error=error)
    tasks = [asyncio.create_task(flight.run("k", failing)) for _ in range(20)]
    await settle()
    failing.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert failing.calls == 1
    assert all(outcome is error for outcome in outcomes)
    assert flight.in_flight == 0

    after = Call()
    after.release.set()
    assert await flight.run("k", after) == ("answer-1", False)
    assert after.calls == 1


async def test_a_cancelled_follower_leaves_the_call_running_for_the_others() -> None:
    flight: SingleFlight[str] = SingleFlight()
    call = Call()
    leader = asyncio.create_task(flight.run("k", call))
    quitter = asyncio.create_task(flight.run("k", call))
    stayer = asyncio.create_task(flight.run("k", call))
    await settle()

    quitter.cancel()
    await settle()
    assert quitter.cancelled()
    assert call.cancelled == 0
    assert flight.in_flight == 1

    call.release.set()
    assert await leader == ("answer-1", False)
    assert await stayer == ("answer-1", True)
    assert call.calls == 1


async def test_a_cancelled_leader_leaves_the_call_running_for_the_followers() -> None:
    flight: SingleFlight[str] = SingleFlight()
    call = Call()
    leader = asyncio.create_task(flight.run("k", call))
    await settle()
    followers = [asyncio.create_task(flight.run("k", call)) for _ in range(3)]
    await settle()

    leader.cancel()
    await settle()
    assert leader.cancelled()
    assert call.cancelled == 0

    call.release.set()
    assert await asyncio.gather(*followers) == [("answer-1", True)] * 3
    assert call.calls == 1
    assert flight.in_flight == 0


async def test_the_call_is_cancelled_once_every_caller_is_gone() -> None:
    flight: SingleFlight[str] = SingleFlight()
    call = Call()
    tasks = [asyncio.create_task(flight.run("k", call)) for _ in range(3)]
    await settle()

    tasks[0].cancel()
    tasks[1].cancel()
    await settle()
    assert call.cancelled == 0  # one caller still waits

    tasks[2].cancel()
    await settle()
    assert all(task.cancelled() for task in tasks)
    assert call.cancelled == 1
    assert flight.in_flight == 0

    fresh = Call()
    fresh.release.set()
    assert await flight.run("k", fresh) == ("answer-1", False)


async def test_a_key_is_free_the_moment_all_callers_leave_even_if_the_call_is_slow_to_stop() -> None:
    flight: SingleFlight[str] = SingleFlight()
    stopping = asyncio.Event()
    stopped = asyncio.Event()

    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            await stopped.wait()  # cleaning up takes a while
            raise
        return "never"

    waiter = asyncio.create_task(flight.run("k", stubborn))
    await settle()
    waiter.cancel()
    await stopping.wait()

    fresh = Call()
    fresh.release.set()
    assert await flight.run("k", fresh) == ("answer-1", False)  # a new call, not the dying one
    stopped.set()
    await settle()
    assert flight.in_flight == 0


async def test_a_call_failing_after_every_caller_left_is_not_reported_as_unretrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        flight: SingleFlight[str] = SingleFlight()
        failed = asyncio.Event()

        async def fails_on_cancel() -> str:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                failed.set()
                raise RuntimeError("cleanup failed") from None
            return "never"

        waiter = asyncio.create_task(flight.run("k", fails_on_cancel))
        await settle()
        waiter.cancel()
        await failed.wait()
        await settle()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        del waiter
        gc.collect()
        await settle()
        assert reported == []
    finally:
        loop.set_exception_handler(previous)


async def test_a_run_after_completion_calls_again() -> None:
    flight: SingleFlight[str] = SingleFlight()
    call = Call()
    call.release.set()
    assert await flight.run("k", call) == ("answer-1", False)
    assert await flight.run("k", call) == ("answer-2", False)
    assert call.calls == 2
    assert flight.stats() == FlightStats(leaders=2, followers=0, in_flight=0)


async def test_flights_are_independent_of_each_other() -> None:
    first: SingleFlight[str] = SingleFlight()
    second: SingleFlight[str] = SingleFlight()
    call = Call()
    tasks = [asyncio.create_task(first.run("k", call)), asyncio.create_task(second.run("k", call))]
    await settle()
    call.release.set()
    assert [shared for _, shared in await asyncio.gather(*tasks)] == [False, False]
    assert call.calls == 2
