"""GCRA: its semantics on the in-process storage (injected clock), and the Redis Lua script checked against it
at the same instants (the script takes a time override for this test; in use it reads Redis's clock)."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator

import pytest

from atajo.limits.gcra import Bucket, MemoryStorage
from atajo.limits.redis import RedisStorage
from tests.cache.conftest import REDIS_URL, need_server
from tests.doubles import FakeClock


@pytest.fixture
async def redis_storage() -> AsyncIterator[RedisStorage]:
    need_server("Redis", "127.0.0.1", 6379)
    storage = RedisStorage(REDIS_URL, timeout_s=2.0, prefix=f"test-{secrets.token_hex(4)}:")
    yield storage
    keys = [k async for k in storage.client.scan_iter(match="{atajo-rl}:" + storage.prefix + "*")]
    if keys:
        await storage.client.delete(*keys)
    await storage.close()


async def test_a_limit_of_100_per_minute_lets_100_through_then_one_every_600_ms() -> None:
    clock = FakeClock(1000.0)
    storage = MemoryStorage(clock)
    bucket = Bucket.of("k", limit=100, burst=100, cost=1)
    verdicts = [(await storage.check([bucket]))[0] for _ in range(150)]
    assert sum(v.allowed for v in verdicts) == 100
    assert [v.remaining for v in verdicts[:3]] == [99, 98, 97] and verdicts[99].remaining == 0
    assert verdicts[99].reset_us == 60_000_000  # empty: a minute to be full again
    rejected = verdicts[100]
    assert not rejected.allowed and rejected.retry_us == 600_000 and rejected.remaining == 0
    clock.advance(0.599)
    assert not (await storage.check([bucket]))[0].allowed
    clock.advance(0.001)
    assert (await storage.check([bucket]))[0].allowed
    assert not (await storage.check([bucket]))[0].allowed
    clock.advance(60)
    assert (await storage.check([bucket]))[0].remaining == 99  # full again after a quiet minute


async def test_bursts_smaller_than_the_limit_and_costs_above_one() -> None:
    clock = FakeClock(0.0)
    storage = MemoryStorage(clock)
    tokens = Bucket.of("t", limit=6000, burst=1000, cost=400)  # 100 tokens/s, at most 1000 at once
    assert [(await storage.check([tokens]))[0].allowed for _ in range(3)] == [True, True, False]
    clock.advance(2.0)  # 200 tokens back: 400 fit again
    assert (await storage.check([tokens]))[0].allowed
    too_big = Bucket.of("t2", limit=6000, burst=1000, cost=1001)
    assert not (await storage.check([too_big]))[0].allowed  # never fits: more than the burst


async def test_all_or_none_across_buckets() -> None:
    storage = MemoryStorage(FakeClock(0.0))
    key = Bucket.of("key", limit=10, burst=10, cost=1)
    tenant = Bucket.of("tenant", limit=1, burst=1, cost=1)
    assert all(v.allowed for v in await storage.check([key, tenant]))
    verdicts = await storage.check([key, tenant])
    assert verdicts[0].allowed and not verdicts[1].allowed
    assert (await storage.check([key]))[0].remaining == 8  # the rejected request charged nobody


async def test_settle_gives_back_and_charges_but_never_below_now() -> None:
    clock = FakeClock(0.0)
    storage = MemoryStorage(clock)
    tokens = Bucket.of("t", limit=600, burst=600, cost=500)
    assert (await storage.check([tokens]))[0].remaining == 100
    await storage.settle([Bucket("t", tokens.interval_us, tokens.tolerance_us, -300)])  # used 200, not 500
    assert (await storage.check([Bucket("t", tokens.interval_us, tokens.tolerance_us, 0)]))[0].remaining == 400
    await storage.settle([Bucket("t", tokens.interval_us, tokens.tolerance_us, -10_000)])
    assert storage.tat("t") is None  # full, not fuller
    await storage.settle([Bucket("t", tokens.interval_us, tokens.tolerance_us, 900)])  # used more than reserved
    assert not (await storage.check([Bucket("t", tokens.interval_us, tokens.tolerance_us, 1)]))[0].allowed


@pytest.mark.parametrize("seed", range(4))
async def test_the_lua_script_and_the_in_process_twin_agree(redis_storage: RedisStorage, seed: int) -> None:
    rng = random.Random(seed)
    memory = MemoryStorage(FakeClock(0.0))
    now = 1_700_000_000_000_000.0 + rng.random() * 1e6  # a realistic epoch in microseconds
    names = ["a", "b", "c"]
    for _ in range(300):
        now += rng.choice([0.0, 0.0, rng.random() * 1e5, rng.random() * 3e6])
        chosen = rng.sample(names, rng.randint(1, 3))
        buckets = [
            Bucket.of(
                name,
                limit=rng.choice([1, 7, 100, 50_000, 10**7]),
                burst=rng.choice([1, 5, 100, 50_000]),
                cost=rng.choice([0, 1, 3, 250, -40]) if rng.random() < 0.3 else 1,
            )
            for name in chosen
        ]
        if rng.random() < 0.2:
            memory.settle_at(now, buckets)
            await redis_storage.settle(buckets, now_us=now)
        else:
            assert await redis_storage.check(buckets, now_us=now) == memory.check_at(now, buckets)
        for name in chosen:
            assert await redis_storage.tat(name) == pytest.approx(memory.tat(name), abs=1.0)


async def test_redis_admits_exactly_the_burst_of_concurrent_calls_on_its_own_clock(redis_storage: RedisStorage) -> None:
    bucket = Bucket.of("burst", limit=100, burst=100, cost=1)
    started = await redis_storage.server_time_us()
    verdicts = await asyncio.gather(*(redis_storage.check([bucket]) for _ in range(1000)))
    elapsed_us = await redis_storage.server_time_us() - started
    admitted = sum(v[0].allowed for v in verdicts)
    # one more per 600 ms of Redis time elapsed during the run (none when it took less)
    assert 100 <= admitted <= 100 + int(elapsed_us // 600_000)
