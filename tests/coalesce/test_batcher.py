"""MicroBatcher on its own: a send that records its batches and blocks until released, so callers really
overlap. Windows are long (nothing waits on them) unless a test is about the window closing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from atajo.coalesce.batcher import MicroBatcher
from tests.coalesce.test_singleflight import settle


class Send:
    def __init__(self, error: Exception | None = None) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.release = asyncio.Event()
        self.error = error
        self.cancelled = 0

    async def __call__(self, group: str, items: list[str]) -> Sequence[str]:
        self.batches.append((group, list(items)))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return [item.upper() for item in items]


class Seen:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.waits: list[float] = []

    def batch(self, items: int, waits_s: Sequence[float]) -> None:
        self.sizes.append(items)
        self.waits.extend(waits_s)


def batcher(send: Send, **kw: float) -> MicroBatcher[str, str]:
    bounds: dict[str, float] = {"max_wait_s": 60.0, "max_items": 3, "max_size": 1000, **kw}
    return MicroBatcher(send, max_wait_s=bounds["max_wait_s"], max_items=int(bounds["max_items"]),
                        max_size=int(bounds["max_size"]), observer=Seen())  # fmt: skip


async def test_a_full_batch_goes_at_once_as_one_call_and_answers_each_caller_its_own_result() -> None:
    send = Send()
    b = batcher(send)
    tasks = [asyncio.create_task(b.submit("g", item)) for item in ("a", "b", "c", "d")]
    await settle()
    assert send.batches == [("g", ["a", "b", "c"])]  # full at 3: sent without waiting for the window
    send.release.set()
    assert await asyncio.gather(*tasks[:3]) == ["A", "B", "C"]
    assert not tasks[3].done()  # "d" opened the next batch, whose window is still open
    await b.close()
    assert await tasks[3] == "D"
    assert send.batches[1] == ("g", ["d"])
    assert isinstance(b.observer, Seen) and b.observer.sizes == [3, 1]


async def test_the_window_closing_sends_what_has_arrived() -> None:
    send = Send()
    send.release.set()
    b = batcher(send, max_wait_s=0.001)
    assert list(await asyncio.gather(b.submit("g", "a"), b.submit("g", "b"))) == ["A", "B"]
    assert send.batches == [("g", ["a", "b"])]
    assert isinstance(b.observer, Seen) and len(b.observer.waits) == 2


async def test_an_item_that_would_overflow_the_size_bound_sends_the_open_batch_first() -> None:
    send = Send()
    send.release.set()
    b = batcher(send, max_size=10)
    first = asyncio.create_task(b.submit("g", "a", size=6))
    second = asyncio.create_task(b.submit("g", "b", size=6))
    await settle()
    assert send.batches == [("g", ["a"])]
    await b.close()
    assert (await first, await second) == ("A", "B")
    assert send.batches == [("g", ["a"]), ("g", ["b"])]


async def test_groups_are_batched_apart() -> None:
    send = Send()
    send.release.set()
    b = batcher(send)
    tasks = [asyncio.create_task(b.submit(g, i)) for g, i in (("x", "a"), ("y", "b"), ("x", "c"))]
    await settle()
    await b.close()
    assert await asyncio.gather(*tasks) == ["A", "B", "C"]
    assert sorted(send.batches) == [("x", ["a", "c"]), ("y", ["b"])]


async def test_a_caller_cancelled_before_its_batch_goes_leaves_it() -> None:
    send = Send()
    send.release.set()
    b = batcher(send)
    stays = asyncio.create_task(b.submit("g", "a"))
    leaves = asyncio.create_task(b.submit("g", "b"))
    await settle()
    leaves.cancel()
    await settle()
    await b.close()
    assert await stays == "A"
    assert send.batches == [("g", ["a"])]


async def test_a_caller_cancelled_after_its_batch_went_never_cancels_the_call_for_the_others() -> None:
    send = Send()
    b = batcher(send)
    tasks = [asyncio.create_task(b.submit("g", item)) for item in ("a", "b", "c")]
    await settle()
    tasks[0].cancel()
    await settle()
    send.release.set()
    assert list(await asyncio.gather(*tasks[1:])) == ["B", "C"]
    assert send.cancelled == 0 and tasks[0].cancelled()


async def test_a_failed_call_reaches_every_caller_as_the_same_error() -> None:
    error = ValueError("provider on fire")
    send = Send(error=error)
    send.release.set()
    b = batcher(send)
    outcomes = await asyncio.gather(*(b.submit("g", i) for i in "abc"), return_exceptions=True)
    assert all(outcome is error for outcome in outcomes)


async def test_a_wrong_number_of_results_is_an_error_not_a_mix_up() -> None:
    async def short(group: str, items: list[str]) -> Sequence[str]:
        return items[:-1]

    b: MicroBatcher[str, str] = MicroBatcher(short, max_wait_s=60, max_items=2, max_size=100)
    with pytest.raises(RuntimeError, match="a batch of 2 was answered with 1"):
        await asyncio.gather(b.submit("g", "a"), b.submit("g", "b"))
