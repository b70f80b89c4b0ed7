"""The rules every store keeps, run against each of them: in-process, SQLite, real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable, StoreUnavailable
from proxy.redis_store import RedisStore
from proxy.sqlite_store import SqliteStore
from proxy.store import STATE_TTL, MemoryStore, TokenStore
from proxy.tokens import Kind, State, TokenRecord
from tests.conftest import REDIS_URL

KEY = "8CJbtOpzHo9pbNYZmAt7Al2VM4dlNabPrMyvI7m-uOo="


def record(generation: int, app: str | None = "app", props: tuple[str, ...] = ()) -> TokenRecord:
    return TokenRecord(
        f"access-{generation}",
        1e9,
        f"refresh-{generation}",
        generation,
        app=app,
        properties=props,
        metadata={"n": generation},
    )


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> AsyncIterator[TokenStore]:
    cipher = TokenCipher.from_keys([KEY])
    made: TokenStore
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SqliteStore(tmp_path / "state.db", cipher=cipher)
    else:
        made = RedisStore.from_url(REDIS_URL, prefix=key_prefix, cipher=cipher)
        await require_redis(made)
    yield made
    if isinstance(made, RedisStore):
        async for key in made.client.scan_iter(match=f"{key_prefix}*"):
            await made.client.delete(key)
    await made.close()


async def require_redis(store: RedisStore) -> None:
    """Skip without a Redis to test against; under CI=true its absence fails."""
    try:
        await store.ping()
    except StoreUnavailable as exc:
        await store.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no Redis at {REDIS_URL}: {exc.message}")
        pytest.skip(f"no Redis at {REDIS_URL}")


async def test_put_is_a_generation_compare_and_set(store: TokenStore) -> None:
    assert await store.load("a") is None
    assert await store.put("a", record(2))
    assert not await store.put("a", record(2))
    assert not await store.put("a", record(1))
    assert await store.load("a") == record(2)
    assert await store.put("a", record(3))
    assert await store.load("a") == record(3)


async def test_every_field_round_trips(store: TokenStore) -> None:
    full = dataclasses.replace(
        record(1),
        state=State.DISCONNECTED,
        kind=Kind.API_KEY,
        association="A1",
        created_at=10.0,
        updated_at=20.0,
        forced=True,
        refreshed_at=5.0,
    )
    await store.put("x", full)
    assert await store.load("x") == full


async def test_pages_in_id_order_by_app_and_covering_by_property(store: TokenStore) -> None:
    for n in range(7):
        await store.put(f"p.{n}", record(1, app="p" if n % 2 else "q", props=(f"{n}", "all")))
    seen, cursor = [], None
    while True:
        page, cursor = await store.page(cursor=cursor, limit=3)
        assert len(page) <= 3
        seen += [name for name, _ in page]
        if cursor is None:
            break
    assert seen == [f"p.{n}" for n in range(7)]
    page, cursor = await store.page(app="p", limit=10)
    assert [n for n, _ in page] == ["p.1", "p.3", "p.5"]
    assert cursor is None
    assert await store.covering("3") == ["p.3"]
    assert await store.covering("all") == [f"p.{n}" for n in range(7)]
    # Properties that a newer record no longer lists leave the index.
    await store.put("p.3", record(2, app="q", props=("33",)))
    assert await store.covering("3") == []
    assert await store.covering("33") == ["p.3"]
    page, _ = await store.page(app="p", limit=10)
    assert [n for n, _ in page] == ["p.1", "p.5"]


async def test_the_feed_reports_each_write_from_a_position(store: TokenStore) -> None:
    start = await store.position()
    await store.put("a", record(1))
    assert not await store.put("a", record(1))  # a refused write is not news
    await store.put("b", record(1))
    changes = store.changes(start)
    first = await asyncio.wait_for(anext(changes), 5)
    second = await asyncio.wait_for(anext(changes), 5)
    await changes.aclose()  # type: ignore[attr-defined]
    assert [first[1], second[1]] == ["a", "b"]
    await store.put("c", record(1))
    resumed = store.changes(first[0])
    assert (await asyncio.wait_for(anext(resumed), 5))[1] == "b"
    assert (await asyncio.wait_for(anext(resumed), 5))[1] == "c"
    await resumed.aclose()  # type: ignore[attr-defined]


async def test_an_install_state_is_single_use(store: TokenStore) -> None:
    await store.save_state("s1", {"app": "partner"})
    assert await store.take_state("s1") == {"app": "partner"}
    assert await store.take_state("s1") is None
    assert await store.take_state("never-issued") is None


async def test_the_refresh_lock_has_one_holder(store: TokenStore) -> None:
    one, two = store.lock("a", 30), store.lock("a", 30)
    assert await one.acquire()
    assert not await two.acquire()
    await two.release()  # not the holder: nothing happens
    assert not await store.lock("a", 30).acquire()
    await one.release()
    assert await two.acquire()
    await two.release()


async def test_last_used_keeps_the_latest(store: TokenStore) -> None:
    await store.touch({"a": 100.0, "b": 50.0})
    await store.touch({"a": 200.0})
    assert await store.last_used(["a", "b", "c"]) == {"a": 200.0, "b": 50.0}


async def test_an_encrypted_record_needs_its_key(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    writer = SqliteStore(path, cipher=TokenCipher.from_keys([KEY]))
    await writer.put("a", record(1))
    await writer.close()
    assert b"access-1" not in path.read_bytes()
    reader = SqliteStore(path)
    with pytest.raises(RecordUnreadable):
        await reader.load("a")
    await reader.close()


async def test_sqlite_keeps_everything_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    await first.put("a", record(5, props=("1",)))
    await first.save_state("s", {"app": "x"})
    await first.close()
    again = SqliteStore(path)
    assert await again.load("a") == record(5, props=("1",))
    assert await again.covering("1") == ["a"]
    assert await again.take_state("s") == {"app": "x"}
    await again.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_an_install_state_expires_after_ten_minutes(tmp_path: Path, kind: str) -> None:
    clock = FakeClock()
    store: TokenStore = (
        MemoryStore(clock) if kind == "memory" else SqliteStore(tmp_path / "s.db", clock=clock)
    )
    await store.save_state("late", {"app": "x"})
    await store.save_state("in-time", {"app": "x"})
    clock.advance(STATE_TTL - 1)
    assert await store.take_state("in-time") == {"app": "x"}
    clock.advance(2)
    assert await store.take_state("late") is None
    await store.close()


async def test_two_sqlite_stores_on_one_file_share_the_lock_and_the_feed(tmp_path: Path) -> None:
    """The CLI and a running proxy on one state file: one refresh, and the proxy sees writes."""
    proxy, cli = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    position = await proxy.position()
    held = proxy.lock("a", 30)
    assert await held.acquire()
    assert not await cli.lock("a", 30).acquire()
    await held.release()
    await cli.put("a", record(1))
    changes = proxy.changes(position)
    assert (await asyncio.wait_for(anext(changes), 5))[1] == "a"
    await changes.aclose()  # type: ignore[attr-defined]
    await proxy.close()
    await cli.close()


async def test_an_unreadable_record_does_not_hide_the_others_in_a_page(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    for name in ("a", "b", "c"):
        await store.put(name, record(1))
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET data = 'not json' WHERE id = 'b'")
    store = SqliteStore(path)
    page, _ = await store.page()
    assert [n for n, _ in page] == ["a", "b", "c"]
    assert isinstance(page[1][1], RecordUnreadable)
    assert "not json" not in page[1][1].message
    assert page[0][1] == record(1)
    await store.close()


async def test_load_many_reads_the_records_of_many_ids_at_once(store: TokenStore) -> None:
    for name, generation in (("a", 1), ("b", 2), ("c", 3)):
        await store.put(name, record(generation))
    found = await store.load_many(["c", "missing", "a", "c"])
    assert found == {"c": record(3), "a": record(1)}  # nothing stored: absent
    assert await store.load_many([]) == {}


async def test_load_many_names_an_unreadable_record_and_reads_the_others(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    for name in ("a", "b"):
        await store.put(name, record(1))
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET data = 'not json' WHERE id = 'b'")
    store = SqliteStore(path)
    found = await store.load_many(["a", "b"])
    assert found["a"] == record(1)
    assert isinstance(found["b"], RecordUnreadable)
    await store.close()


async def test_the_feed_comes_in_batches_in_order(store: TokenStore) -> None:
    start = await store.position()
    for name in ("a", "b", "c"):
        await store.put(name, record(1))
    await store.put("a", record(2))
    batches = store.change_batches(start)
    batch = await asyncio.wait_for(anext(batches), 5)
    await batches.aclose()  # type: ignore[attr-defined]
    assert [name for _, name in batch] == ["a", "b", "c", "a"]  # one read: every entry
    resumed = store.changes(batch[1][0])  # the same feed, one entry at a time
    assert (await asyncio.wait_for(anext(resumed), 5))[1] == "c"
    await resumed.aclose()  # type: ignore[attr-defined]
