"""The tier chain over real backends: lookup order, fills, stale entries, vetoed writes, a tier that fails
and comes back (a real redis-server stopped and restarted), with injected clocks."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from atajo.cache.backends import open_backend
from atajo.cache.entry import Selector
from atajo.cache.tiers import Fill, Tier, TierChain
from tests.doubles import FakeClock
from tests.upstreams.live import free_port


class Recorder:
    def __init__(self) -> None:
        self.lookups: Counter[tuple[str, str]] = Counter()
        self.writes: Counter[tuple[str, str]] = Counter()
        self.failures: Counter[tuple[str, str]] = Counter()

    def lookup(self, tier: str, outcome: str, seconds: float) -> None:
        self.lookups[tier, outcome] += 1

    def write(self, tier: str, outcome: str) -> None:
        self.writes[tier, outcome] += 1

    def invalidation(self, tier: str, dropped: int, fraction: float) -> None:
        pass

    def failure(self, tier: str, operation: str) -> None:
        self.failures[tier, operation] += 1


def chain_of(
    tmp_path: Path, clock: FakeClock, mono: FakeClock, recorder: Recorder, extra: list[Tier] | None = None
) -> TierChain:
    memory = Tier(open_backend("memory://", clock=clock, max_bytes=1 << 20), ttl_s=300, timeout_s=0.25, local=True)
    sql = Tier(open_backend(f"sqlite:///{tmp_path}/c.db", clock=clock), ttl_s=3600, timeout_s=1.0, local=False)
    return TierChain(
        [memory, *(extra or []), sql], clock=clock, monotonic=mono, observer=recorder, stale_if_error_s=600
    )


def fill(key: str = "t/default/m/v1-abc", *, tags: frozenset[str] = frozenset({"user:1"}), generation: int = 0) -> Fill:
    return Fill(key, "t", "default", b"answer", tags, None, generation)


async def test_miss_fills_every_tier_with_its_own_ttl_and_a_slow_hit_fills_the_fast_tier(tmp_path: Path) -> None:
    clock, mono, rec = FakeClock(1_000_000), FakeClock(), Recorder()
    chain = chain_of(tmp_path, clock, mono, rec)
    await chain.start()
    try:
        assert (await chain.get("t/default/m/v1-abc")).entry is None
        chain.store(fill())
        await chain.drain()
        found = await chain.get("t/default/m/v1-abc")
        assert found.tier == "memory" and found.entry is not None and found.entry.value == b"answer"
        clock.advance(301)
        found = await chain.get("t/default/m/v1-abc")
        assert found.tier == "sql"
        await chain.drain()
        refilled = await chain.tiers[0].backend.get("t/default/m/v1-abc")
        assert refilled is not None
        assert found.entry is not None
        assert refilled.fresh_until == min(clock.now + 300, found.entry.fresh_until), "its own TTL, within SQL's"
        assert refilled.created_at == found.entry.created_at, "the age is the answer's, not the copy's"
        clock.advance(3300)
        gone = await chain.get("t/default/m/v1-abc")
        assert gone.entry is None and gone.stale is not None, "expired everywhere, still kept for stale-if-error"
        clock.advance(601)
        assert await chain.get("t/default/m/v1-abc") == type(gone)()
        assert rec.writes["memory", "ok"] == 2 and rec.writes["sql", "ok"] == 1
    finally:
        await chain.close()


async def test_max_age_rejects_old_entries(tmp_path: Path) -> None:
    clock, mono, rec = FakeClock(1_000_000), FakeClock(), Recorder()
    chain = chain_of(tmp_path, clock, mono, rec)
    await chain.start()
    try:
        chain.store(fill())
        await chain.drain()
        clock.advance(20)
        assert (await chain.get("t/default/m/v1-abc", max_age_s=30)).entry is not None
        older = await chain.get("t/default/m/v1-abc", max_age_s=10)
        assert older.entry is None and older.stale is not None
    finally:
        await chain.close()


async def test_an_answer_computed_across_a_matching_invalidation_is_not_stored(tmp_path: Path) -> None:
    clock, mono, rec = FakeClock(1_000_000), FakeClock(), Recorder()
    chain = chain_of(tmp_path, clock, mono, rec)
    await chain.start()
    try:
        started = chain.generation  # the request starts...
        await chain.invalidate(Selector("t", frozenset({"user:1"})))  # ...user 1 changes while it is computed
        chain.store(fill("t/default/m/v1-a", generation=started))
        chain.store(fill("t/default/m/v1-b", tags=frozenset({"user:2"}), generation=started))
        await chain.drain()
        assert (await chain.get("t/default/m/v1-a")).entry is None, "built on data that changed"
        assert (await chain.get("t/default/m/v1-b")).entry is not None, "unrelated to the change"
        assert rec.writes["memory", "vetoed"] == 1 and rec.writes["sql", "vetoed"] == 1
    finally:
        await chain.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> tuple[int, Path]:
    """A private redis-server, so the test can stop and restart it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    return free_port(), tmp_path


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


async def test_a_failing_tier_is_skipped_counted_and_recovers_by_itself(
    tmp_path: Path, redis_server: tuple[int, Path]
) -> None:
    port, workdir = redis_server
    clock, mono, rec = FakeClock(1_000_000), FakeClock(), Recorder()
    redis_tier = Tier(
        open_backend(f"redis://127.0.0.1:{port}/0", clock=clock, timeout_s=0.2), ttl_s=600, timeout_s=0.2, local=False
    )
    proc = _start_redis(port, workdir)
    chain = chain_of(tmp_path, clock, mono, rec, extra=[redis_tier])
    await chain.start()
    try:
        chain.store(fill())
        await chain.drain()
        clock.advance(301)  # memory expired: the lookup reaches redis
        assert (await chain.get("t/default/m/v1-abc")).tier == "redis"
        proc.terminate()
        proc.wait(5)
        clock.advance(1)
        await chain.tiers[0].backend.flush()
        found = await chain.get("t/default/m/v1-abc")
        assert found.tier == "sql", "redis is down: skipped, the request still gets an answer"
        assert rec.failures["redis", "get"] == 1
        await chain.tiers[0].backend.flush()
        assert (await chain.get("t/default/m/v1-abc")).tier == "sql"
        assert rec.lookups["redis", "skipped"] == 1, "not retried on every request"
        assert rec.failures["redis", "get"] == 1
        await chain.drain()  # the fills meant for redis while it was down are dropped, not held
        assert rec.writes["redis", "dropped"] == 2
        proc = _start_redis(port, workdir)  # back, empty
        mono.advance(1.5)
        await chain.tiers[0].backend.flush()
        assert (await chain.get("t/default/m/v1-abc")).tier == "sql"
        await chain.drain()
        assert rec.lookups["redis", "miss"] == 1, "tried again after the pause"
        await chain.tiers[0].backend.flush()
        assert (await chain.get("t/default/m/v1-abc")).tier == "redis", "refilled from sql"
    finally:
        await chain.close()
        proc.terminate()
        proc.wait(5)
