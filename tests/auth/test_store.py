"""The key store's contract, the same assertions on SQLite and PostgreSQL; and the virtual keys' lookup cache
and change log (what makes a revocation reach every instance)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atajo.auth.keys import digest
from atajo.auth.store import DuplicateKey, KeyRecord, KeyStore, KeyStoreError
from atajo.auth.virtual import VirtualKeys, hint_of, new_key_id, new_secret
from atajo.errors import ServiceUnavailable
from atajo.settings import CachePolicy, RateLimit
from tests.cache.conftest import POSTGRES_URL, need_server
from tests.doubles import FakeClock


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(URL, table prefix): a SQLite file of this test, or PostgreSQL tables of this test (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/keys.db", "atajo_auth_"
        return
    need_server("PostgreSQL", "127.0.0.1", 5432)
    prefix = f"t{secrets.token_hex(4)}_auth_"
    yield POSTGRES_URL, prefix
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        for table in ("keys", "tenants", "events"):
            await conn.execute(f"DROP TABLE IF EXISTS {prefix}{table}")
    finally:
        await conn.close()


def _record(tenant: str = "acme", **fields: object) -> tuple[str, KeyRecord]:
    secret = new_secret()
    return secret, KeyRecord(id=new_key_id(), tenant=tenant, digest=digest(secret), hint=hint_of(secret), **fields)  # type: ignore[arg-type]


async def test_create_find_list_revoke_rotate(store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    clock = FakeClock(100.0)
    store = KeyStore(url, table_prefix=prefix, clock=clock)
    try:
        limits = RateLimit(rpm=100, tpm=50_000, adaptive=False)
        secret, record = _record(
            models=("fast", "slow"),
            limits=limits,
            budget_micros=5_000_000,
            cache=CachePolicy(ttl_s=30),
            trust="trusted",
        )
        created = await store.create_key(record)
        assert created.created_at == 100.0
        found = await store.find(digest(secret))
        assert found is not None
        key, tenant = found
        assert key == created
        assert (key.models, key.limits, key.cache, key.trust) == (
            ("fast", "slow"),
            limits,
            CachePolicy(ttl_s=30),
            "trusted",
        )
        assert tenant is not None and tenant.name == "acme" and tenant.limits is None  # created with the key
        assert await store.find(digest("sk-atajo-wrong")) is None
        assert secret not in repr(key) and secret not in key.config_json()  # the secret is never stored

        _, other = _record(tenant="globex")
        clock.advance(1)
        await store.create_key(other)
        assert [k.id for k in await store.list_keys()] == [record.id, other.id]
        assert [k.id for k in await store.list_keys("globex")] == [other.id]

        new_secret_ = new_secret()
        rotated = await store.rotate(record.id, digest(new_secret_), hint_of(new_secret_))
        assert rotated is not None and rotated.rotated_at == 101.0
        assert await store.find(digest(secret)) is None
        assert (await store.find(digest(new_secret_))) is not None

        revoked = await store.revoke(record.id)
        assert revoked is not None and revoked.revoked
        assert await store.find(digest(new_secret_)) is None
        assert (await store.get_key(record.id)) is not None  # kept, for the record
        assert await store.rotate(record.id, digest("x"), "h") is None  # a revoked key cannot be rotated
        assert await store.revoke("key_0000000000000000") is None

        tenant_record, new = await store.put_tenant("acme", RateLimit(rpm=1000))
        assert not new and tenant_record.limits == RateLimit(rpm=1000)
        _, new = await store.put_tenant("initech", None)
        assert new
        assert [t.name for t in await store.list_tenants()] == ["acme", "globex", "initech"]
        with pytest.raises(DuplicateKey):
            await store.create_key(other)
        last, first = await store.event_ids()
        events = await store.events_after(first - 1)
        assert len(events) == last - first + 1 >= 6
        assert {kind for _, kind, _ in events} == {"key", "tenant"}
        assert all(secret not in subject for _, _, subject in events)
    finally:
        await store.close()


async def test_a_revocation_through_one_instance_reaches_the_others_lookups(store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    clock = FakeClock(0.0)
    one = VirtualKeys(KeyStore(url, table_prefix=prefix), clock=clock, lookup_ttl_s=3600)
    two = VirtualKeys(KeyStore(url, table_prefix=prefix), clock=clock, lookup_ttl_s=3600)
    await one.start()
    await two.start()
    try:
        secret, record = _record(limits=RateLimit(rpm=5))
        assert await two.lookup(digest(secret)) is None  # unknown, and cached as such
        await one.store.create_key(record)
        assert await two.lookup(digest(secret)) is None  # still the cached answer ...
        await two.poll_once()  # ... until the change log is read
        principal = await two.lookup(digest(secret))
        assert principal is not None and principal.key_name == record.id and principal.limits == RateLimit(rpm=5)
        lookups = two.lookups
        assert await two.lookup(digest(secret)) == principal and two.lookups == lookups  # from memory

        await one.store.revoke(record.id)
        assert await two.lookup(digest(secret)) is not None  # the cache has not heard yet
        await two.poll_once()
        assert await two.lookup(digest(secret)) is None

        await one.store.put_tenant("acme", RateLimit(tpm=10))
        secret2, record2 = _record()
        await one.store.create_key(record2)
        await two.poll_once()
        p2 = await two.lookup(digest(secret2))
        assert p2 is not None and p2.tenant_limits == RateLimit(tpm=10)
        await one.store.put_tenant("acme", RateLimit(tpm=20))
        await two.poll_once()  # a tenant change forgets every lookup
        p2 = await two.lookup(digest(secret2))
        assert p2 is not None and p2.tenant_limits == RateLimit(tpm=20)
    finally:
        await one.close()
        await two.close()


async def test_a_lookup_that_raced_a_change_is_not_cached(tmp_path: Path) -> None:
    keys = VirtualKeys(KeyStore(f"sqlite:///{tmp_path}/k.db"), lookup_ttl_s=3600)
    await keys.start()
    try:
        secret, record = _record()
        await keys.store.create_key(record)
        real_find = keys.store.find

        async def find_then_revoke(d: str) -> object:
            found = await real_find(d)
            keys.forget(d)  # a change applied while the lookup was reading
            return found

        keys.store.find = find_then_revoke  # type: ignore[method-assign,assignment]
        assert await keys.lookup(digest(secret)) is not None
        keys.store.find = real_find  # type: ignore[method-assign]
        await keys.store.revoke(record.id)
        assert await keys.lookup(digest(secret)) is None  # read again: nothing stale was kept
    finally:
        await keys.close()


async def test_an_unreachable_store_answers_503_not_401(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    keys = VirtualKeys(KeyStore(f"sqlite:///{blocked}/keys.db"))
    await keys.start()  # fails open at start-up: logged, retried on use
    try:
        with pytest.raises(ServiceUnavailable):
            await keys.lookup(digest("sk-atajo-anything"))
        with pytest.raises(KeyStoreError):
            await keys.poll_once()
    finally:
        await keys.close()


async def test_a_change_that_becomes_visible_after_a_later_one_is_still_applied(tmp_path: Path) -> None:
    """On PostgreSQL an event's id is drawn at insert and seen at commit, so id 5 can appear after id 6."""
    url = f"sqlite:///{tmp_path}/k.db"
    keys = VirtualKeys(KeyStore(url), lookup_ttl_s=3600)
    await keys.start()
    try:
        secret, record = _record()
        await keys.store.create_key(record)
        await keys.poll_once()
        assert await keys.lookup(digest(secret)) is not None
        last, _ = await keys.store.event_ids()
        p = keys.store.prefix
        async with keys.store._transaction() as tx:  # a later change, committed first
            await tx.execute(f"INSERT INTO {p}events (id, at, kind, subject) VALUES (?, 0, 'key', 'other')", last + 2)
        await keys.poll_once()
        async with keys.store._transaction() as tx:  # the earlier one: the key's revocation, seen only now
            await tx.execute(f"UPDATE {p}keys SET revoked_at = 1 WHERE id = ?", record.id)
            await tx.execute(
                f"INSERT INTO {p}events (id, at, kind, subject) VALUES (?, 0, 'key', ?)", last + 1, record.digest
            )
        assert await keys.lookup(digest(secret)) is not None  # still cached ...
        await keys.poll_once()
        assert await keys.lookup(digest(secret)) is None  # ... until the late row is read
    finally:
        await keys.close()
