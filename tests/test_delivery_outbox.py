"""The outbox of every store: written with the record, read oldest first, retried, leased.

The same tests run on the in-process store, the SQLite file, fakeredis and the real
Redis (under a prefix of the test's own). Lease expiry is driven by a FakeClock where the
store reads the app's clock; Redis expires keys on its own clock, so there the test checks
the TTL Redis was given and removes the key as its expiry would.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fakeredis import aioredis as fake_aioredis

from proxy.clock import FakeClock
from proxy.events import Event, EventType, new_event
from proxy.redis_store import RedisStore
from proxy.sqlite_store import SqliteStore
from proxy.store import MemoryStore, TokenStore
from proxy.tokens import TokenRecord
from tests.conftest import REDIS_URL

M = pytest.mark


def record(generation: int) -> TokenRecord:
    return TokenRecord("access", 0.0, "refresh", generation, app="app")


def created(connection: str, clock: FakeClock) -> Event:
    return new_event(EventType.CREATED, {"id": connection, "state": "ok"}, clock())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "fakeredis", pytest.param("redis", marks=M.redis)])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock, key_prefix: str
) -> AsyncIterator[TokenStore]:
    kind = request.param
    if kind == "memory":
        yield MemoryStore(clock=clock)
    elif kind == "sqlite":
        sqlite = SqliteStore(tmp_path / "state.db", clock=clock)
        yield sqlite
        await sqlite.close()
    elif kind == "fakeredis":
        fake = fake_aioredis.FakeRedis()
        yield RedisStore(fake, prefix=key_prefix)
        await fake.aclose()
    else:
        # The `redis_url` fixture's rule, inline (an async fixture cannot be chosen by a
        # parameter): skip without a Redis, fail under CI.
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true and no Redis at {REDIS_URL}: {exc}")
            pytest.skip(f"no Redis at {REDIS_URL}")
        yield RedisStore(client, prefix=key_prefix)
        async for key in client.scan_iter(match=f"{key_prefix}*"):
            await client.delete(key)
        await client.aclose()


async def test_events_come_back_oldest_first_across_writes(
    store: TokenStore, clock: FakeClock
) -> None:
    first, second, third = created("a", clock), created("b", clock), created("a", clock)
    assert await store.put("a", record(1), events=[first])
    assert await store.put("b", record(1), events=[second])
    assert await store.put("a", record(2), events=[third])
    assert await store.put("b", record(2))  # a write without events adds none
    assert await store.outbox_pending(10) == [first, second, third]
    assert await store.outbox_pending(2) == [first, second]
    assert await store.outbox_pending(0) == []


async def test_a_refused_write_leaves_no_event(store: TokenStore, clock: FakeClock) -> None:
    kept = created("a", clock)
    assert await store.put("a", record(2), events=[kept])
    assert not await store.put("a", record(2), events=[created("a", clock)])
    assert not await store.put("a", record(1), events=[created("a", clock)])
    assert await store.outbox_pending(10) == [kept]


async def test_done_removes_one_event(store: TokenStore, clock: FakeClock) -> None:
    events = [created("a", clock), created("b", clock)]
    assert await store.put("a", record(1), events=events)
    await store.outbox_done(events[0].id)
    await store.outbox_done("no-such-event")
    assert await store.outbox_pending(10) == [events[1]]


async def test_retry_keeps_the_place_and_never_resurrects(
    store: TokenStore, clock: FakeClock
) -> None:
    events = [created("a", clock), created("a", clock), created("b", clock)]
    assert await store.put("a", record(1), events=events)
    later = dataclasses.replace(events[0], attempts=1, next_at=clock() + 30)
    await store.outbox_retry(later)
    assert await store.outbox_pending(10) == [later, events[1], events[2]]
    await store.outbox_done(events[2].id)
    await store.outbox_retry(dataclasses.replace(events[2], attempts=1))
    assert await store.outbox_pending(10) == [later, events[1]]


async def test_lease_is_held_by_one_owner_until_it_lapses(
    request: pytest.FixtureRequest, store: TokenStore, clock: FakeClock
) -> None:
    assert await store.outbox_lease("a", 10)
    assert not await store.outbox_lease("b", 10)
    assert await store.outbox_lease("a", 10), "the holder renews"
    clock.advance(9)
    assert await store.outbox_lease("a", 10)
    clock.advance(9)
    assert not await store.outbox_lease("b", 10), "renewed: 9 s after renewal it still holds"
    await lapse(store, clock, 10)
    assert await store.outbox_lease("b", 10), "a lapsed lease goes to whoever asks"
    assert not await store.outbox_lease("a", 10)


async def lapse(store: TokenStore, clock: FakeClock, ttl: float) -> None:
    """Let the lease expire: by the store's clock, or as Redis's own expiry would."""
    if isinstance(store, RedisStore):
        key = store.base + "outbox:lease"
        remaining = await store.client.pttl(key)
        assert 0 < remaining <= ttl * 1000, "Redis must expire the lease after its TTL"
        await store.client.delete(key)
    else:
        clock.advance(ttl + 0.001)


async def test_sqlite_outbox_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path, clock=clock)
    event = created("a", clock)
    assert await first.put("a", record(1), events=[event])
    await first.close()
    second = SqliteStore(path, clock=clock)
    try:
        assert await second.outbox_pending(10) == [event]
    finally:
        await second.close()


@pytest.mark.redis
async def test_redis_replicas_share_one_outbox_and_one_lease(
    redis_url: str, real_redis: aioredis.Redis, key_prefix: str, clock: FakeClock
) -> None:
    one = RedisStore(aioredis.Redis.from_url(redis_url), prefix=key_prefix)
    two = RedisStore(aioredis.Redis.from_url(redis_url), prefix=key_prefix)
    try:
        event = created("a", clock)
        assert await one.put("a", record(1), events=[event])
        assert await two.outbox_pending(10) == [event]
        assert await one.outbox_lease("one", 10)
        assert not await two.outbox_lease("two", 10)
        await two.outbox_done(event.id)
        assert await one.outbox_pending(10) == []
    finally:
        await one.close()
        await two.close()


NEWER = '{"id":"%s","type":"connection.migrated","occurred_at":1,"connection":{"id":"a"}}'


async def store_raw(store: TokenStore, event_id: str, raw: str) -> None:
    """Overwrite an outbox entry's stored JSON (as a newer replica or damage would)."""
    if isinstance(store, RedisStore):
        await store.client.hset(store.base + "outbox:data", event_id, raw)
    else:
        assert isinstance(store, SqliteStore)
        await store._run(
            lambda db: db.execute("UPDATE outbox SET data = ? WHERE event_id = ?", (raw, event_id))
        )


@pytest.mark.parametrize(
    "store", ["sqlite", "fakeredis", pytest.param("redis", marks=M.redis)], indirect=True
)
@pytest.mark.parametrize("raw", [NEWER, "{not json", '{"id":"x"}', "[]"])
async def test_an_unreadable_entry_is_skipped_and_kept(
    store: TokenStore, clock: FakeClock, raw: str, captured_logs: io.StringIO
) -> None:
    events = [created("a", clock), created("b", clock), created("c", clock)]
    assert await store.put("a", record(1), events=events)
    await store_raw(store, events[1].id, raw % events[1].id if "%s" in raw else raw)
    assert await store.outbox_pending(10) == [events[0], events[2]]
    assert "events.unreadable" in captured_logs.getvalue()
    # Left for a replica that can read it; the others are not held up behind it.
    await store.outbox_done(events[0].id)
    await store_raw(store, events[1].id, events[1].to_json())
    assert await store.outbox_pending(10) == [events[1], events[2]]
