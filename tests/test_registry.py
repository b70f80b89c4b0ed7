"""The registry in process: one credential per connection, whatever arrives at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from proxy.clock import FakeClock
from proxy.config import AppSettings, Settings
from proxy.credentials import ApiKeyCredential, Credential
from proxy.errors import (
    AmbiguousProperty,
    ProxyError,
    RecordUnreadable,
    UnknownConnection,
    UnknownProperty,
)
from proxy.metrics import Metrics
from proxy.registry import Registry
from proxy.store import MemoryStore, Page
from proxy.tokens import Kind, State, TokenRecord

APP = AppSettings("partner", "cid", "secret", "https://x/cb", delivery=Kind.API_KEY)


class SlowStore(MemoryStore):
    """Reads take a turn of the loop, as every real store's do."""

    async def load(self, name: str) -> TokenRecord | None:
        await asyncio.sleep(0.01)
        return await super().load(name)


def registry(store: SlowStore) -> tuple[Registry, list[Credential]]:
    made: list[Credential] = []

    def make(settings: object) -> Credential:
        credential = ApiKeyCredential(settings, store)  # type: ignore[arg-type]
        made.append(credential)
        return credential

    settings = Settings(credentials=(), apps=(APP,))
    return Registry(settings, store, make, Metrics(), FakeClock()), made


def key(generation: int, props: tuple[str, ...] = ("1",)) -> TokenRecord:
    return TokenRecord(
        "cbat_key", 0.0, None, generation, app="partner", kind=Kind.API_KEY, properties=props
    )


async def test_a_write_and_its_feed_entry_arriving_together_make_one_credential() -> None:
    store = SlowStore()
    reg, made = registry(store)
    await store.put("partner.property.1", key(1))
    await asyncio.gather(reg.apply("partner.property.1", key(1)), reg.changed("partner.property.1"))
    assert len(made) == 1
    assert reg.route({"X-PROPERTY-ID": "1"}, {}) is made[0]
    await reg.stop(0)
    assert all(task.done() for task in reg._tasks.values())


async def test_a_replaced_credential_never_leaves_a_dangling_route() -> None:
    store = SlowStore()
    reg, made = registry(store)
    await reg.apply("partner.property.1", key(1))
    # Imported again under the other kind: made anew, and routing finds the new one.
    oauth = TokenRecord("tok", 1e12, "r", 2, app="partner", properties=("1",))
    replaced = asyncio.ensure_future(reg.apply("partner.property.1", oauth))
    await asyncio.sleep(0)
    with contextlib.suppress(ProxyError):  # a routing error at worst, never a KeyError
        reg.route({"X-PROPERTY-ID": "1"}, {})
    await replaced
    assert reg.connections["partner.property.1"] is not made[0]
    await reg.stop(0)


class GatedStore(MemoryStore):
    """Pages wait for `release` (the background load stays in flight as long as a test
    needs); every read is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.loads = self.many = self.coverings = 0

    async def page(self, **kwargs: Any) -> Page:
        await self.release.wait()
        return await super().page(**kwargs)

    async def load(self, name: str) -> TokenRecord | None:
        self.loads += 1
        await asyncio.sleep(0.01)  # a turn of the loop, so that requests pile up on it
        return await super().load(name)

    async def load_many(self, names: Sequence[str]) -> dict[str, TokenRecord | RecordUnreadable]:
        self.many += 1
        return await super().load_many(names)

    async def covering(self, prop: str) -> list[str]:
        self.coverings += 1
        return await super().covering(prop)


async def wait_for(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


async def test_while_loading_a_route_miss_asks_the_store_once_per_id_or_property() -> None:
    store = GatedStore()
    for i in (1, 2, 3):
        await store.put(f"partner.property.{i}", key(1, (str(i),)))
    reg, made = registry(store)  # type: ignore[arg-type]
    await reg.start()
    follow = asyncio.ensure_future(reg.follow())
    try:
        await asyncio.sleep(0.05)
        assert reg.loading and reg.progress.state == "loading" and not made
        by_id = {"X-Cloudbeds-Connection": "partner.property.1"}
        found = await asyncio.gather(*(reg.find(by_id, {}) for _ in range(5)))
        assert {c.name for c in found} == {"partner.property.1"}
        assert store.loads == 1  # single-flight: five requests, one read
        by_property = await asyncio.gather(
            *(reg.find({"X-PROPERTY-ID": "2"}, {}) for _ in range(3))
        )
        assert {c.name for c in by_property} == {"partner.property.2"}
        assert store.coverings == 1
        with pytest.raises(UnknownProperty):  # the store covers it no more than memory does
            await reg.find({"X-PROPERTY-ID": "99"}, {})
        with pytest.raises(UnknownConnection):
            await reg.find({"X-Cloudbeds-Connection": "partner.property.99"}, {})
        assert reg.counts() == {("partner", "ok"): 2}

        store.release.set()
        await wait_for(lambda: reg.progress.state == "done")
        assert not reg.loading
        assert reg.progress.loaded == 3
        assert sorted(c.name for c in made) == [f"partner.property.{i}" for i in (1, 2, 3)]
        assert reg.counts() == {("partner", "ok"): 3}
        reads = (store.loads, store.coverings)
        with pytest.raises(UnknownProperty):  # loaded: a miss is answered from memory
            await reg.find({"X-PROPERTY-ID": "99"}, {})
        assert (store.loads, store.coverings) == reads
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await reg.stop(0)


async def test_the_feed_is_applied_in_batches_with_one_read_each() -> None:
    store = GatedStore()
    reg, _ = registry(store)  # type: ignore[arg-type]
    for i in range(1200):
        await store.put(f"partner.property.{i}", key(1, (str(i),)))
    await store.put("partner.property.0", key(2, ("0", "extra")))  # in order: the newer wins
    follow = asyncio.ensure_future(reg.follow())  # not started: the feed only, from 0
    try:
        await wait_for(lambda: len(reg.connections) == 1200 and reg._position == "1201")
        assert store.many == 3  # 1201 entries in batches of 500: three reads, not 1201
        assert store.loads == 0
        assert reg.route({"X-PROPERTY-ID": "extra"}, {}).name == "partner.property.0"
        assert reg.counts() == {("partner", "ok"): 1200}
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await reg.stop(0)


async def test_a_batch_stops_where_the_feed_lost_entries() -> None:
    store = GatedStore()
    reg, _ = registry(store)  # type: ignore[arg-type]
    await store.put("partner.property.1", key(1))
    await store.put("partner.property.2", key(1, ("2",)))
    lost = await reg.changed_batch(
        [("1", "partner.property.1"), ("2", None), ("3", "partner.property.2")]
    )
    assert lost
    assert list(reg.connections) == ["partner.property.1"]
    assert reg._position == "1"  # a reread follows from where the feed stands
    await reg.stop(0)


async def test_counts_follow_state_changes_without_a_loop_over_connections() -> None:
    store = GatedStore()
    reg, _ = registry(store)  # type: ignore[arg-type]
    await reg.apply("partner.property.1", key(1))
    await reg.apply("partner.property.2", key(1, ("2",)))
    assert reg.counts() == {("partner", "ok"): 2}
    gone = dataclasses.replace(key(2, ("2",)), state=State.DISCONNECTED)
    await reg.apply("partner.property.2", gone)
    assert reg.counts() == {("partner", "ok"): 1, ("partner", "disconnected"): 1}
    # Made anew under the other kind: still counted once.
    await reg.apply("partner.property.1", TokenRecord("t", 1e12, "r", 3, app="partner"))
    assert reg.counts() == {("partner", "ok"): 1, ("partner", "disconnected"): 1}
    await reg.stop(0)


async def test_while_loading_a_property_hit_is_checked_once_against_the_store() -> None:
    """A property one loaded connection covers may be covered by one not loaded yet too:
    ambiguous (409), as it will be once everything is loaded, not routed to the first."""
    store = GatedStore()
    for i in (1, 2):
        await store.put(f"partner.property.{i}", key(1, ("7",)))
    reg, _ = registry(store)  # type: ignore[arg-type]
    await reg.start()
    follow = asyncio.ensure_future(reg.follow())
    try:
        await asyncio.sleep(0.05)
        assert reg.loading
        await reg.find({"X-Cloudbeds-Connection": "partner.property.1"}, {})  # one loaded
        with pytest.raises(AmbiguousProperty):
            await reg.find({"X-PROPERTY-ID": "7"}, {})
        with pytest.raises(AmbiguousProperty):
            await reg.find({"X-PROPERTY-ID": "7"}, {})
        assert store.coverings == 1  # looked up once for the load, then from memory
    finally:
        store.release.set()
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await reg.stop(0)
