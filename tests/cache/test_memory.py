"""What only the memory tier does: a byte bound kept by evicting the least recently used entries."""

from __future__ import annotations

from atajo.cache.entry import Selector
from atajo.cache.memory import MemoryBackend
from tests.cache.conftest import T0, make_entry
from tests.doubles import FakeClock

VALUE = b"x" * 100


def sized(key: str, tags: set[str] | None = None) -> int:
    return make_entry(key, value=VALUE, tags=tags or ()).size


async def test_the_byte_bound_is_kept_and_evictions_are_counted(clock: FakeClock) -> None:
    one = sized("t/ns/m/0")
    memory = MemoryBackend(3 * one, clock)

    for i in range(10):
        await memory.set(make_entry(f"t/ns/m/{i}", value=VALUE))
        stats = await memory.stats()
        assert stats.bytes <= 3 * one

    stats = await memory.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (3, 3 * one, 7)
    assert [i for i in range(10) if await memory.get(f"t/ns/m/{i}") is not None] == [7, 8, 9]


async def test_a_recently_read_entry_survives_eviction(clock: FakeClock) -> None:
    memory = MemoryBackend(3 * sized("t/ns/m/a"), clock)
    for name in "abc":
        await memory.set(make_entry(f"t/ns/m/{name}", value=VALUE))

    assert await memory.get("t/ns/m/a") is not None  # now the most recent: b is the least
    await memory.set(make_entry("t/ns/m/d", value=VALUE))

    assert await memory.get("t/ns/m/b") is None
    assert all([await memory.get(f"t/ns/m/{name}") for name in "acd"])
    assert (await memory.stats()).evictions == 1


async def test_rewriting_a_key_makes_it_recent_without_counting_twice(clock: FakeClock) -> None:
    memory = MemoryBackend(3 * sized("t/ns/m/a"), clock)
    for name in "abca":
        await memory.set(make_entry(f"t/ns/m/{name}", value=VALUE))

    stats = await memory.stats()
    assert (stats.entries, stats.evictions) == (3, 0)
    await memory.set(make_entry("t/ns/m/d", value=VALUE))
    assert await memory.get("t/ns/m/b") is None
    assert await memory.get("t/ns/m/a") is not None


async def test_an_entry_bigger_than_the_bound_is_not_stored(clock: FakeClock) -> None:
    memory = MemoryBackend(1000, clock)
    small = make_entry("t/ns/m/small", tags={"a"})
    await memory.set(small)
    await memory.set(make_entry("t/ns/m/keep", value=b"old"))

    await memory.set(make_entry("t/ns/m/big", value=b"x" * 1000, tags={"a"}))
    await memory.set(make_entry("t/ns/m/keep", value=b"y" * 1000))  # replaced by one too big: the old goes too

    assert await memory.get("t/ns/m/big") is None
    assert await memory.get("t/ns/m/keep") is None
    assert await memory.get(small.key) == small
    stats = await memory.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (1, small.size, 0)
    assert await memory.invalidate(Selector("t", frozenset({"a"}))) == 1


async def test_evicted_entries_leave_the_indexes(clock: FakeClock) -> None:
    memory = MemoryBackend(2 * sized("t/ns/m/0", tags={"user:1"}), clock)
    for i in range(5):
        await memory.set(make_entry(f"t/ns/m/{i}", value=VALUE, tags={"user:1"}))

    assert await memory.invalidate(Selector("t", frozenset({"user:1"}))) == 2
    assert await memory.invalidate(Selector("t", namespace="ns")) == 0
    assert memory._by_tag == {} and memory._by_namespace == {}
    assert (await memory.stats()).bytes == 0


async def test_a_read_past_keep_until_frees_the_entry(clock: FakeClock) -> None:
    memory = MemoryBackend(1 << 20, clock)
    await memory.set(make_entry("t/ns/m/1", keep_s=10, tags={"a"}))

    clock.advance(10)

    assert await memory.get("t/ns/m/1") is None
    stats = await memory.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (0, 0, 0)
    assert memory._by_tag == {} and memory._by_namespace == {}


async def test_purge_follows_the_latest_keep_until_of_rewritten_keys(clock: FakeClock) -> None:
    memory = MemoryBackend(1 << 24, clock)
    for i in range(1000):  # each key rewritten many times with a later keep_until
        await memory.set(make_entry(f"t/ns/m/{i % 10}", keep_s=100 + i))

    assert len(memory._expiry) <= 2 * 10 + 64 + 1, "the expiry heap does not grow with rewrites"
    clock.now = T0 + 1000  # keep_until of the last writes: 1090 … 1099
    assert await memory.purge_expired() == 0
    clock.now = T0 + 1094.5
    assert await memory.purge_expired() == 5
    assert (await memory.stats()).entries == 5
    clock.now = T0 + 2000
    assert await memory.purge_expired() == 5
    assert memory._expiry == [] and (await memory.stats()).bytes == 0


async def test_get_returns_the_stored_object(clock: FakeClock) -> None:
    memory = MemoryBackend(1 << 20, clock)
    entry = make_entry("t/ns/m/1")
    await memory.set(entry)

    assert await memory.get(entry.key) is entry  # no copy on the hot path
