"""RedisLease against the real Redis on 127.0.0.1:6379 (skipped when absent, failed under CI=true), and against a
closed port. Waiters poll every few milliseconds; no assertion is about how long anything took."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from atajo.coalesce.lease import Claim, RedisLease
from tests.conftest import IN_CI

REDIS_URL = "redis://127.0.0.1:6379/0"


class Seen:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()

    def lease(self, outcome: str) -> None:
        self.outcomes[outcome] += 1


@pytest.fixture
def redis_up() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        if IN_CI:
            pytest.fail("Redis is not reachable on 127.0.0.1:6379 (CI=true: it must be there)")
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")


@pytest.fixture
async def leases(redis_up: None) -> AsyncIterator[tuple[RedisLease, RedisLease, str]]:
    prefix = f"atajo:test-lease:{uuid.uuid4().hex}:"
    first = RedisLease(REDIS_URL, wait_s=5, poll_s=0.005, prefix=prefix)
    second = RedisLease(REDIS_URL, wait_s=5, poll_s=0.005, prefix=prefix)
    yield first, second, "tenant/ns/model/v1-key"
    await first.close()
    await second.close()


async def nothing() -> str | None:
    return None


async def test_the_first_takes_the_lease_and_the_second_waits_for_the_answer(
    leases: tuple[RedisLease, RedisLease, str],
) -> None:
    first, second, key = leases
    assert await first.claim(key, nothing) == (Claim.OWNED, None)
    answer: list[str] = []

    async def check() -> str | None:
        return answer[0] if answer else None

    waiter = asyncio.create_task(second.claim(key, check))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # still waiting: the lease is held
    answer.append("the answer")  # the first instance's answer reaches the shared cache
    first.finish(key, answered=True)
    assert await waiter == (Claim.FOUND, "the answer")


async def test_a_finished_lease_still_holds_others_off_while_the_answer_is_written(
    leases: tuple[RedisLease, RedisLease, str],
) -> None:
    first, second, key = leases
    assert (await first.claim(key, nothing))[0] is Claim.OWNED
    first.finish(key, answered=True)
    await first.close()  # the release has landed
    written: list[str] = []

    async def check() -> str | None:
        written.append("x")
        return "late answer" if len(written) >= 3 else None

    assert await second.claim(key, check) == (Claim.FOUND, "late answer")


async def test_a_failed_holder_lets_a_waiter_take_over_at_once(leases: tuple[RedisLease, RedisLease, str]) -> None:
    first, second, key = leases
    assert (await first.claim(key, nothing))[0] is Claim.OWNED
    waiter = asyncio.create_task(second.claim(key, nothing))
    await asyncio.sleep(0.03)
    first.finish(key, answered=False)  # the call failed: no answer is coming
    assert await waiter == (Claim.OWNED, None)


async def test_a_waiter_gives_up_after_wait_s_and_computes_itself(redis_up: None) -> None:
    prefix = f"atajo:test-lease:{uuid.uuid4().hex}:"
    holder = RedisLease(REDIS_URL, prefix=prefix)
    seen = Seen()
    impatient = RedisLease(REDIS_URL, wait_s=0.05, poll_s=0.005, prefix=prefix, observer=seen)
    try:
        assert (await holder.claim("k", nothing))[0] is Claim.OWNED
        assert await impatient.claim("k", nothing) == (Claim.TIMED_OUT, None)
        assert seen.outcomes == {"waited_timeout": 1}
    finally:
        await holder.close()
        await impatient.close()


async def test_an_unreachable_redis_means_no_lease_and_is_left_alone_for_a_while(closed_port: int) -> None:
    seen = Seen()
    lease = RedisLease(f"redis://127.0.0.1:{closed_port}/0", observer=seen)
    try:
        assert await lease.claim("k", nothing) == (Claim.UNAVAILABLE, None)
        assert lease._down_until > 0
        assert await lease.claim("k", nothing) == (Claim.UNAVAILABLE, None)  # not tried again: no new failure
        assert seen.outcomes == {"error": 2}
        lease.finish("k", answered=True)  # nothing held: nothing to do
    finally:
        await lease.close()
