"""The write-behind queue both the exact tiers and the semantic tier store through: batching, vetoes, a full
queue, a store known to be down, a failed write, and the loop going on after each."""

from __future__ import annotations

import asyncio
from collections import Counter

from atajo.cache.write_behind import WriteBehind


class Store:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.fail_next = False
        self.up = True
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []

    async def write(self, items: list[str]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("store went away")
        self.batches.append(items)

    def writer(self, *, batch: int = 64, capacity: int = 100, linger_s: float = 0.0) -> WriteBehind[str]:
        return WriteBehind(
            "test-writer",
            self.write,
            batch=batch,
            observe=lambda outcome: self.outcomes.update([outcome]),
            failed=lambda exc: self.failures.append(type(exc).__name__),
            vetoed=lambda item, generation: item.startswith("stale") and generation < 1,
            usable=lambda: self.up,
            capacity=capacity,
            linger_s=linger_s,
        )


async def test_writes_queued_meanwhile_go_together_up_to_a_batch_and_vetoed_ones_never() -> None:
    store = Store()
    writes = store.writer(batch=3)
    for item in ["a", "stale-b", "c", "d", "stale-e"]:
        writes.put(item, 0)
    writes.put("stale-f", 1)  # started after the invalidation: kept
    writes.start()
    await asyncio.wait_for(writes.join(), 2)
    assert store.batches == [["a", "c"], ["d", "stale-f"]]
    assert store.outcomes == {"ok": 4, "vetoed": 2}
    await writes.stop()


async def test_a_linger_lets_later_writes_join_the_first() -> None:
    store = Store()
    writes = store.writer(linger_s=0.05)
    writes.start()
    writes.put("a", 0)
    await asyncio.sleep(0)  # the writer has taken "a" and lingers
    writes.put("b", 0)
    await asyncio.wait_for(writes.join(), 2)
    assert store.batches == [["a", "b"]]
    await writes.stop()


async def test_a_full_queue_drops_and_counts() -> None:
    store = Store()
    writes = store.writer(capacity=2)
    for item in ["a", "b", "c"]:
        writes.put(item, 0)
    assert store.outcomes == {"dropped": 1}
    writes.start()
    await asyncio.wait_for(writes.join(), 2)
    assert store.batches == [["a", "b"]]
    await writes.stop()


async def test_a_store_known_down_drops_a_failed_write_is_lost_and_the_loop_goes_on() -> None:
    store = Store()
    writes = store.writer()
    writes.start()
    store.up = False
    writes.put("a", 0)
    await asyncio.wait_for(writes.join(), 2)
    assert store.outcomes == {"dropped": 1} and store.batches == [] and store.failures == []
    store.up, store.fail_next = True, True
    writes.put("b", 0)
    await asyncio.wait_for(writes.join(), 2)
    assert store.outcomes == {"dropped": 1, "error": 1} and store.failures == ["ConnectionError"]
    writes.put("c", 0)
    await asyncio.wait_for(writes.join(), 2)
    assert store.batches == [["c"]] and store.outcomes["ok"] == 1
    await writes.stop()
    writes.put("d", 0)  # stopped: queued, never written
    await asyncio.sleep(0.01)
    assert store.batches == [["c"]]
