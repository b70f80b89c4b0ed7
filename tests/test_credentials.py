"""The API-key credential's keep-alive, against the fake Cloudbeds on a fake clock.

Cloudbeds expires an API key unused for 30 days: an idle key gets one cheap authenticated
call (`getHotels`) between half an interval and an interval after its last use in the
fleet, made by one replica under the connection's lock and recorded as a use.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest

from proxy.clock import FakeClock
from proxy.config import CredentialSettings, Kind
from proxy.credentials import ApiKeyCredential, KeepAlive
from proxy.fake_cloudbeds import FakeCloudbeds, create_fake_app
from proxy.refresh import keepalive_after, phase
from proxy.store import MemoryStore
from proxy.tokens import State, TokenRecord
from tests.support import serve

NAME = "alpha.property.2001"
WEEK = 7 * 24 * 3600.0
SETTINGS = CredentialSettings(name=NAME, kind=Kind.API_KEY, app="alpha")


class CountingStore(MemoryStore):
    """Counts the fleet's last-use reads."""

    reads = 0

    async def last_used(self, names: Sequence[str]) -> dict[str, float]:
        self.reads += 1
        return await super().last_used(names)


class Fleet:
    """Replicas' API-key credentials for one connection, sharing a store and the fake."""

    def __init__(self, fake: FakeCloudbeds, url: str, session: aiohttp.ClientSession) -> None:
        self.fake, self.url, self.session = fake, url, session
        self.clock = fake.clock if isinstance(fake.clock, FakeClock) else FakeClock()
        self.store = CountingStore()
        self.gated: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.credentials: list[ApiKeyCredential] = []

    async def gate(self, budget: str, connection: str, wait: float) -> None:
        self.gated.append(budget)
        assert connection == NAME

    async def replica(self) -> ApiKeyCredential:
        keepalive = KeepAlive(
            self.session,
            f"{self.url}/api/v1.3/getHotels",
            interval=WEEK,
            timeout=2.0,
            lock_ttl=5.0,
            clock=self.clock,
            gate=self.gate,
        )
        credential = ApiKeyCredential(SETTINGS, self.store, keepalive=keepalive)
        await credential.start()
        self.tasks.append(asyncio.create_task(credential.run()))
        self.credentials.append(credential)
        await asyncio.sleep(0.01)  # its timer starts from now
        return credential

    def keepalives(self) -> int:
        return sum(1 for e in self.fake.api_log if e["path"].endswith("/getHotels"))

    async def at(self, moment: float, turns: int = 20) -> None:
        """Move the clock and wake every replica's timer."""
        self.clock.value = moment
        for credential in self.credentials:
            credential._wake.set()
        for _ in range(turns):
            await asyncio.sleep(0.01)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    clock = FakeClock()
    fake = FakeCloudbeds(clock=clock)
    runner, url = await serve(create_fake_app(fake))
    async with aiohttp.ClientSession() as session:
        f = Fleet(fake, url, session)
        await f.store.put(
            NAME,
            TokenRecord(
                fake.api_key, 0.0, None, 1, kind=Kind.API_KEY, app="alpha", created_at=clock()
            ),
        )
        yield f
        for task in f.tasks:
            task.cancel()
        await asyncio.gather(*f.tasks, return_exceptions=True)
    await runner.cleanup()


async def test_an_idle_key_gets_one_keepalive_per_interval_from_one_replica(fleet: Fleet) -> None:
    await fleet.replica()
    await fleet.replica()  # two replicas: one call between them
    created = fleet.clock()
    due = keepalive_after(created, phase(NAME), WEEK)
    await fleet.at(created + WEEK / 2)
    assert fleet.keepalives() == 0
    await fleet.at(due + 1)
    assert fleet.keepalives() == 1
    assert fleet.gated == ["app:alpha"]  # the token calls' budget (no share set: the app's)
    used = await fleet.store.last_used([NAME])
    assert used[NAME] >= due
    # Used again by a request (the registry's batch): no keep-alive until idle again.
    await fleet.store.touch({NAME: due + 3 * 24 * 3600})
    await fleet.at(due + WEEK - 10)
    assert fleet.keepalives() == 1
    await fleet.at(keepalive_after(due + 3 * 24 * 3600, phase(NAME), WEEK) + 1)
    assert fleet.keepalives() == 2


async def test_a_key_in_use_gets_no_keepalive(fleet: Fleet) -> None:
    credential = await fleet.replica()
    start = fleet.clock()
    for day in range(3, 40, 3):  # used every three days, for longer than Cloudbeds' 30
        await fleet.store.touch({NAME: start + day * 24 * 3600 - 60})
        await fleet.at(start + day * 24 * 3600)
        assert await credential.header() == ("x-api-key", fleet.fake.api_key)
    assert fleet.keepalives() == 0


async def test_a_failed_keepalive_is_retried_and_never_logs_the_key(
    fleet: Fleet, captured_logs: io.StringIO
) -> None:
    await fleet.replica()
    due = keepalive_after(fleet.clock(), phase(NAME), WEEK)
    fleet.fake.rate_limit_next = 1  # Cloudbeds answers 429 once
    await fleet.at(due + 1)
    assert fleet.keepalives() == 1
    assert "api_key.keepalive.failed" in captured_logs.getvalue()
    assert await fleet.store.last_used([NAME]) == {}  # a failure is not a use
    await fleet.at(due + 3600)  # past the backoff's first steps
    assert fleet.keepalives() == 2
    assert "api_key.keepalive.ok" in captured_logs.getvalue()
    assert fleet.fake.api_key not in captured_logs.getvalue()


async def test_a_key_without_keepalive_just_waits(fleet: Fleet) -> None:
    credential = ApiKeyCredential(SETTINGS, fleet.store)
    task = asyncio.create_task(credential.run())
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_first_look_is_after_a_minute_and_within_the_hour(fleet: Fleet) -> None:
    await fleet.replica()
    start = fleet.clock()
    await fleet.at(start + 59)
    assert fleet.store.reads == 0  # a start is no burst of reads
    await fleet.at(start + 3661)
    assert fleet.store.reads == 1  # then one read tells it when the key comes due
    assert fleet.keepalives() == 0  # created just now: not due for half a week


async def test_a_key_in_use_costs_one_read_per_half_interval_or_less(fleet: Fleet) -> None:
    await fleet.replica()
    start = fleet.clock()
    for hour in range(1, 30 * 24, 6):  # used four times a day for thirty days
        await fleet.store.touch({NAME: start + hour * 3600 - 60})
        await fleet.at(start + hour * 3600, turns=3)
    await fleet.at(start + 30 * 24 * 3600)
    assert fleet.store.reads >= 30 / 7
    assert fleet.store.reads <= 30 / 3.5 + 2
    assert fleet.keepalives() == 0


async def test_a_disconnected_key_is_left_alone(fleet: Fleet, captured_logs: io.StringIO) -> None:
    stored = await fleet.store.load(NAME)
    assert stored is not None
    gone = stored.successor(access_token=None, state=State.DISCONNECTED)
    assert await fleet.store.put(NAME, gone)
    await fleet.replica()
    await fleet.at(fleet.clock() + 40 * 24 * 3600)
    assert fleet.keepalives() == 0
    assert fleet.store.reads == 0
    assert "api_key.keepalive.failed" not in captured_logs.getvalue()
