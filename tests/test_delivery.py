"""The delivery loop on a FakeClock against a real receiver that verifies signatures."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxy.delivery
from proxy.clock import FakeClock
from proxy.config import ConfigError, load_settings
from proxy.delivery import LEASE_TTL, Delivery
from proxy.errors import StoreUnavailable
from proxy.events import RETRY_FOR, Event, EventType, new_event
from proxy.metrics import Metrics
from proxy.store import MemoryStore
from proxy.tokens import TokenRecord
from tests.event_receiver import Receiver
from tests.support import fake_env, free_port

SECRET = "events-secret-7d1f"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def receiver(clock: FakeClock) -> AsyncIterator[Receiver]:
    receiver = await Receiver(SECRET, clock=clock).start()
    yield receiver
    await receiver.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def delivery(
    store: MemoryStore,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    url: str,
    **kwargs: Any,
) -> Delivery:
    return Delivery(
        store,
        session,
        url=url,
        secret=SECRET,
        metrics=metrics,
        clock=clock,
        jitter=lambda: 0.0,
        **kwargs,
    )


@pytest.fixture
def sender(
    store: MemoryStore,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    receiver: Receiver,
) -> Delivery:
    return delivery(store, session, clock, metrics, receiver.url, owner="one")


async def write(store: MemoryStore, clock: FakeClock, connection: str, *types: EventType) -> None:
    """One record write per event, each carrying its event (as Connections does)."""
    for type_ in types:
        current = await store.load(connection)
        generation = current.generation + 1 if current is not None else 1
        record = TokenRecord("access", 0.0, "refresh", generation, app="app")
        event = new_event(type_, {"id": connection, "state": "ok"}, clock())
        assert await store.put(connection, record, events=[event])


def count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "cbproxy_event_deliveries_total", {"outcome": outcome}
    )
    return value or 0.0


def pending_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("cbproxy_events_pending")


async def drain(sender: Delivery, rounds: int = 20) -> None:
    for _ in range(rounds):
        if not await sender.round():
            return
    raise AssertionError(f"still delivering after {rounds} rounds")


async def test_delivers_signed_events_in_order_per_connection(
    store: MemoryStore, clock: FakeClock, receiver: Receiver, sender: Delivery, metrics: Metrics
) -> None:
    E = EventType
    await write(store, clock, "app.property.1", E.CREATED, E.REAUTHORIZATION_REQUIRED)
    await write(store, clock, "app.property.2", E.CREATED)
    await write(store, clock, "app.property.1", E.RECOVERED, E.DISCONNECTED)
    written = [e.id for e in await store.outbox_pending(10)]

    await drain(sender)

    assert receiver.rejected == []
    assert sorted(e["id"] for e in receiver.accepted) == sorted(written)
    one = [e["type"] for e in receiver.accepted if e["connection"]["id"] == "app.property.1"]
    assert one == [E.CREATED, E.REAUTHORIZATION_REQUIRED, E.RECOVERED, E.DISCONNECTED]
    assert await store.outbox_pending(10) == []
    assert count(metrics, "delivered") == 5
    assert pending_gauge(metrics) == 0


async def test_a_failed_delivery_is_retried_on_schedule_and_holds_its_connection(
    store: MemoryStore, clock: FakeClock, receiver: Receiver, sender: Delivery, metrics: Metrics
) -> None:
    await write(store, clock, "c1", EventType.CREATED, EventType.DISCONNECTED)
    await write(store, clock, "c2", EventType.CREATED)
    receiver.fail_next = 2

    await sender.round()  # c1's first fails, c2's fails too (two failures asked for)
    first, _, other = await store.outbox_pending(10)
    assert (first.attempts, first.next_at) == (1, clock() + 0.5)
    assert other.attempts == 1
    assert receiver.accepted == []
    assert count(metrics, "failed") == 2

    tries = len(receiver.attempts)
    await sender.round()  # not due yet: nothing is sent, not even c1's later event
    assert len(receiver.attempts) == tries

    clock.advance(0.5)
    await drain(sender)
    assert [(e["connection"]["id"], e["type"]) for e in receiver.accepted] == [
        ("c1", EventType.CREATED),
        ("c2", EventType.CREATED),
        ("c1", EventType.DISCONNECTED),
    ]
    assert count(metrics, "delivered") == 3


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_delivered(
    status: int, store: MemoryStore, clock: FakeClock, receiver: Receiver, sender: Delivery
) -> None:
    receiver.ok_status = status
    await write(store, clock, "c", EventType.CREATED)
    await sender.round()
    assert await store.outbox_pending(10) == []


@pytest.mark.parametrize("status", [301, 302, 400, 404, 409, 429, 500, 503])
async def test_anything_else_is_a_failure(
    status: int,
    store: MemoryStore,
    clock: FakeClock,
    receiver: Receiver,
    sender: Delivery,
    captured_logs: io.StringIO,
) -> None:
    receiver.failing, receiver.fail_status = True, status
    await write(store, clock, "c", EventType.CREATED)
    await sender.round()
    (event,) = await store.outbox_pending(10)
    assert event.attempts == 1
    (line,) = lines(captured_logs, "events.delivery_failed")
    assert (line["status"], line["reason"], line["level"]) == (
        status,
        f"status {status}",
        "warning",
    )
    assert line["event_id"] == event.id


async def test_a_timeout_is_a_failure(
    store: MemoryStore,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    receiver: Receiver,
    captured_logs: io.StringIO,
) -> None:
    # The POST's own timeout (aiohttp's, on the loop's clock) is what ends the wait.
    sender = delivery(store, session, clock, metrics, receiver.url, timeout=0.2)
    receiver.hang = True
    await write(store, clock, "c", EventType.CREATED)
    await sender.round()
    (event,) = await store.outbox_pending(10)
    assert event.attempts == 1
    (line,) = lines(captured_logs, "events.delivery_failed")
    assert (line["reason"], line["status"]) == ("timeout", None)
    assert count(metrics, "failed") == 1


async def test_an_unreachable_receiver_is_a_failure(
    store: MemoryStore,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    captured_logs: io.StringIO,
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/events?token=url-token-9f2"
    sender = delivery(store, session, clock, metrics, nobody)
    await write(store, clock, "c", EventType.CREATED)
    await sender.round()
    (event,) = await store.outbox_pending(10)
    assert event.attempts == 1
    (line,) = lines(captured_logs, "events.delivery_failed")
    assert line["reason"].startswith("unreachable")
    assert "url-token-9f2" not in captured_logs.getvalue()


async def test_dropped_with_an_error_24_hours_after_the_event(
    store: MemoryStore,
    clock: FakeClock,
    receiver: Receiver,
    sender: Delivery,
    metrics: Metrics,
    captured_logs: io.StringIO,
) -> None:
    receiver.failing = True
    await write(store, clock, "c", EventType.CREATED, EventType.DISCONNECTED)
    first = (await store.outbox_pending(10))[0]
    while True:
        await sender.round()
        pending = await store.outbox_pending(10)
        if not pending or pending[0].id != first.id:
            break
        clock.advance(max(0.0, pending[0].next_at - clock()))
    assert clock() - first.occurred_at >= RETRY_FOR
    assert [e.type for e in pending] == [EventType.DISCONNECTED], "the next one goes on"
    (line,) = lines(captured_logs, "events.dropped")
    assert (line["level"], line["event_id"]) == ("error", first.id)
    assert count(metrics, "dropped") == 1
    # Backoff is capped at 10 minutes (5 with this jitter): 24 hours hold hundreds of
    # attempts, not the 17 an uncapped doubling would make.
    assert line["attempts"] > 250


async def test_only_the_lease_holder_delivers_until_its_lease_lapses(
    store: MemoryStore,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    receiver: Receiver,
    sender: Delivery,
    captured_logs: io.StringIO,
) -> None:
    other_metrics = Metrics()
    other = delivery(store, session, clock, other_metrics, receiver.url, owner="two")
    await write(store, clock, "c", EventType.CREATED)
    assert await sender.round()
    await write(store, clock, "c", EventType.DISCONNECTED)
    assert not await other.round()
    assert len(receiver.accepted) == 1
    assert pending_gauge(other_metrics) == 0

    clock.advance(LEASE_TTL + 1)  # "one" died: it renews no more
    assert await other.round()
    assert [e["type"] for e in receiver.accepted] == [
        "connection.created",
        "connection.disconnected",
    ]
    assert not await sender.round()
    assert [line["owner"] for line in lines(captured_logs, "events.lease_taken")] == ["one", "two"]
    assert [line["owner"] for line in lines(captured_logs, "events.lease_lost")] == ["one"]


class CountingStore(MemoryStore):
    """A MemoryStore that counts the calls a delivery round makes."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.calls: list[str] = []

    async def load(self, name: str) -> TokenRecord | None:
        self.calls.append("load")
        return await super().load(name)

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        self.calls.append("lease")
        return await super().outbox_lease(owner, ttl)

    async def outbox_pending(self, limit: int) -> list[Event]:
        self.calls.append("pending")
        return await super().outbox_pending(limit)


async def test_an_idle_round_costs_two_store_calls_however_many_connections(
    session: aiohttp.ClientSession, clock: FakeClock, metrics: Metrics, receiver: Receiver
) -> None:
    store = CountingStore(clock)
    for n in range(1000):
        assert await store.put(f"c{n}", TokenRecord("a", 0.0, "r", 1))
    sender = delivery(store, session, clock, metrics, receiver.url)
    await sender.round()
    assert store.calls == ["lease", "pending"]


async def test_the_loop_polls_and_wakes_at_once_on_a_local_write(
    session: aiohttp.ClientSession, clock: FakeClock, metrics: Metrics, receiver: Receiver
) -> None:
    store = CountingStore(clock)
    # A poll interval no test waits out: only a wake can start the second round.
    sender = delivery(store, session, clock, metrics, receiver.url, poll_interval=3600)
    task = asyncio.create_task(sender.run())
    try:
        async with asyncio.timeout(10):
            while store.calls.count("pending") < 1:
                await asyncio.sleep(0.01)
        await write(store, clock, "c", EventType.CREATED)
        sender.wake()
        await receiver.wait_for(lambda: len(receiver.accepted) == 1, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert store.calls.count("pending") >= 2


class FlakyStore(MemoryStore):
    """A MemoryStore whose outbox writes fail while `down` is set."""

    down = False

    async def outbox_done(self, event_id: str) -> None:
        if self.down:
            raise StoreUnavailable("the store is down (test)")
        await super().outbox_done(event_id)


async def test_a_store_error_after_the_post_sends_the_event_again(
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    receiver: Receiver,
    captured_logs: io.StringIO,
) -> None:
    store = FlakyStore(clock)
    sender = delivery(store, session, clock, metrics, receiver.url, poll_interval=3600)
    await write(store, clock, "c", EventType.CREATED)
    store.down = True
    task = asyncio.create_task(sender.run())
    try:
        await receiver.wait_for(lambda: len(receiver.accepted) == 1, timeout=10)
        async with asyncio.timeout(10):
            while "events.store_unavailable" not in captured_logs.getvalue():
                await asyncio.sleep(0.01)
        assert len(await store.outbox_pending(10)) == 1, "not marked done: still pending"
        store.down = False
        sender.wake()
        await receiver.wait_for(lambda: len(receiver.accepted) == 2, timeout=10)
        async with asyncio.timeout(10):
            while await store.outbox_pending(10):
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    first, again = receiver.accepted
    assert first == again, "at least once: the same event, the same id and body"
    assert len(lines(captured_logs, "events.store_unavailable")) == 1
    assert len(lines(captured_logs, "events.store_available")) == 1
    assert metrics.registry.get_sample_value("cbproxy_redis_errors_total", {"operation": "outbox"})


async def test_secret_and_signature_never_logged(
    store: MemoryStore,
    clock: FakeClock,
    receiver: Receiver,
    sender: Delivery,
    captured_logs: io.StringIO,
) -> None:
    receiver.fail_next = 1
    await write(store, clock, "c", EventType.CREATED)
    await sender.round()
    clock.advance(1)
    await sender.round()
    text = captured_logs.getvalue()
    assert "events.delivered" in text
    assert "events.delivery_failed" in text
    assert SECRET not in text
    assert "v1=" not in text


def lines(captured: io.StringIO, event: str) -> list[dict[str, Any]]:
    parsed = [json.loads(line) for line in captured.getvalue().splitlines() if line.strip()]
    return [line for line in parsed if line.get("event") == event]


# --- configuration ---------------------------------------------------------------------


def test_events_url_without_a_secret_is_a_start_up_error() -> None:
    env = {**fake_env("http://127.0.0.1:1"), "CBPROXY_EVENTS_URL": "https://hooks.example/e"}
    with pytest.raises(ConfigError, match=r"^CBPROXY_EVENTS_SECRET: required"):
        load_settings(env)


def test_events_secret_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    env = {
        **fake_env("http://127.0.0.1:1"),
        "CBPROXY_EVENTS_URL": "https://hooks.example/e",
        "CBPROXY_EVENTS_SECRET_FILE": str(secret),
    }
    settings = load_settings(env)
    assert settings.events_secret == SECRET
    assert SECRET in settings.secrets()


# --- wired into the app ------------------------------------------------------------------

ADMIN = "admin-token-5be1"
CONNECTION = "test.property.1001"


def app_config(tmp_path: Path, fake_url: str) -> Path:
    config = tmp_path / "proxy.toml"
    config.write_text(
        "[apps.test]\n"
        'client_id = "fake-client-id"\n'
        'client_secret = "fake-client-secret"\n'
        'redirect_uri = "https://localhost/callback"\n'
        "post_app_state_on_delete = false\n"
    )
    return config


def app_env(fake_url: str, events_url: str) -> dict[str, str]:
    return {
        "CBPROXY_UPSTREAM_URL": fake_url,
        "CBPROXY_TOKEN_URL": f"{fake_url}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{fake_url}/api/v1.3/oauth",
        "CBPROXY_ADMIN_TOKEN": ADMIN,
        "CBPROXY_EVENTS_URL": events_url,
        "CBPROXY_EVENTS_SECRET": SECRET,
    }


async def test_the_app_delivers_what_the_admin_api_changes_at_once(
    tmp_path: Path,
    fake_cloudbeds: tuple[Any, str],
    start_proxy: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A poll interval no test waits out: only the admin write's wake can deliver.
    monkeypatch.setattr(proxy.delivery, "POLL_INTERVAL", 3600.0)
    _, fake_url = fake_cloudbeds
    receiver = await Receiver(SECRET).start()  # the real clock, as the app's
    try:
        settings = load_settings(
            app_env(fake_url, receiver.url), str(app_config(tmp_path, fake_url))
        )
        url = await start_proxy(settings, store=MemoryStore(), ready=False)
        auth = {"Authorization": f"Bearer {ADMIN}"}
        async with aiohttp.ClientSession(headers=auth) as client:
            body = {"app": "test", "refresh_token": "fake-refresh-token"}
            async with client.put(f"{url}/_proxy/admin/connections/{CONNECTION}", json=body) as r:
                assert r.status == 201, await r.text()
            await receiver.wait_for(lambda: len(receiver.accepted) == 1)
            async with client.delete(f"{url}/_proxy/admin/connections/{CONNECTION}") as r:
                assert r.status == 204, await r.text()
            await receiver.wait_for(lambda: len(receiver.accepted) == 2)
    finally:
        await receiver.close()
    assert receiver.rejected == []
    assert [(e["type"], e["connection"]["id"]) for e in receiver.accepted] == [
        ("connection.created", CONNECTION),
        ("connection.disconnected", CONNECTION),
    ]
    assert receiver.accepted[1]["connection"]["state"] == "disconnected"
