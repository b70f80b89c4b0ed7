"""A fleet of real `serve` processes sharing one Redis: the token lifecycle end to end.

The fake Cloudbeds runs in this process on a real port, so its counters are read
directly; the proxies are real processes reached only through their HTTP ports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet

from proxy.clock import system_clock
from proxy.coordinator import OAuthCredential
from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.metrics import Metrics
from proxy.redis_store import RedisStore
from tests.redis_server import RedisServer
from tests.support import ProxyProcess, fake_env, settings_for

Fake = tuple[FakeCloudbeds, str]
API = "/api/v1.3/getHotels"
pytestmark = [pytest.mark.redis, pytest.mark.slow]


class TimedCounter(collections.Counter[str]):
    """`FakeCloudbeds.token_calls` that also remembers when each grant arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def __setitem__(self, key: str, value: int) -> None:
        if value > self.get(key, 0):
            self.times.append((time.monotonic(), key))
        super().__setitem__(key, value)

    def refreshes(self) -> list[float]:
        return [t for t, grant in self.times if grant == "refresh_token"]


def timed(state: FakeCloudbeds) -> TimedCounter:
    counter = TimedCounter()
    state.token_calls = counter
    return counter


@dataclasses.dataclass
class Traffic:
    """Concurrent GETs, round-robin over the live proxies; every outcome is kept."""

    alive: list[str]
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    inflight: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    _turn: int = 0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def _next(self) -> str:
        self._turn += 1
        return self.alive[self._turn % len(self.alive)]

    async def _loop(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            url = self._next()
            self.inflight[url] += 1
            try:
                async with session.get(url + API) as response:
                    body = await response.read()
                    self.statuses[response.status] += 1
                    if response.status != 200:
                        self.failures.append((url, f"{response.status} {body[:200]!r}"))
            except aiohttp.ClientError as exc:
                self.statuses[0] += 1
                self.failures.append((url, repr(exc)))
            finally:
                self.inflight[url] -= 1
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def running(self, concurrency: int = 8) -> AsyncIterator[Traffic]:
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            loops = [asyncio.create_task(self._loop(session, stop)) for _ in range(concurrency)]
            try:
                yield self
            finally:
                stop.set()
                await asyncio.gather(*loops)

    async def drop(self, url: str) -> None:
        """Send no more requests to `url`, and wait for the ones on their way."""
        self.alive.remove(url)
        async with asyncio.timeout(5):
            while self.inflight[url]:
                await asyncio.sleep(0.005)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[list[ProxyProcess]]]]:
    """Start `serve` processes (in parallel, off the loop the fake runs on); stop them all."""
    started: list[ProxyProcess] = []

    async def start(env: dict[str, str], count: int = 1) -> list[ProxyProcess]:
        procs = [ProxyProcess(env, tmp_path / f"proxy{len(started) + i}.log") for i in range(count)]
        started.extend(procs)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        return procs

    yield start
    await asyncio.gather(*(proc.astop() for proc in started))


def proxy_env(fake_url: str, redis_url: str, prefix: str, **overrides: str) -> dict[str, str]:
    return {
        **fake_env(fake_url),
        "CBPROXY_REDIS_URL": redis_url,
        "CBPROXY_REDIS_PREFIX": prefix,
        "CBPROXY_POLL_INTERVAL": "0.5",
        "CBPROXY_TOKEN_TIMEOUT": "2",
        "CBPROXY_LOCK_TTL": "3",
        "CBPROXY_WAIT_FOR_TOKEN": "5",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


async def get(url: str, path: str = API, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url + path, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def all_ready(procs: list[ProxyProcess], timeout: float = 10.0) -> None:
    async def ready() -> bool:
        for proc in procs:
            status, _ = await get(proc.url, "/_proxy/readyz")
            if status != 200:
                return False
        return True

    await eventually(ready, timeout)


async def generations(procs: list[ProxyProcess]) -> list[int | None]:
    return [(await get(p.url, "/_proxy/tokens"))[1]["default"]["generation"] for p in procs]


def log_events(proc: ProxyProcess, event: str) -> list[dict[str, Any]]:
    found = []
    for line in proc.log_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
    return found


# --- steady state: one refresh per lifetime across four replicas -------------------------


async def test_four_replicas_refresh_once_per_lifetime_under_load(
    fake_cloudbeds: Fake, redis_url: str, key_prefix: str, real_redis: aioredis.Redis, fleet: Any
) -> None:
    state, fake_url = fake_cloudbeds
    lifetime, leeway, lifetimes = 4.0, 1.0, 5
    state.expires_in = int(lifetime)
    calls = timed(state)
    env = proxy_env(fake_url, redis_url, key_prefix, CBPROXY_REFRESH_LEEWAY=str(leeway))
    procs = await fleet(env, 4)
    await all_ready(procs)
    first = len(calls.refreshes())  # the seed refresh(es) before traffic starts

    traffic = Traffic([p.url for p in procs])
    started = time.monotonic()
    async with traffic.running(concurrency=8):
        await asyncio.sleep(lifetime * lifetimes)
    duration = time.monotonic() - started

    times = calls.refreshes()
    during = [t for t in times if t >= started]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Refreshes start at expires_at - leeway - jitter (jitter <= leeway/5): one per token.
    interval = lifetime - leeway
    print(
        f"\nfleet: {len(procs)} replicas, {duration:.1f}s = {duration / lifetime:.2f} lifetimes "
        f"of {lifetime:g}s (leeway {leeway:g}s); requests {traffic.total}, "
        f"failed {len(traffic.failures)}; refresh calls {len(during)} "
        f"= {len(during) / (duration / lifetime):.2f} per lifetime, "
        f"{len(during) / (duration / interval):.2f} per refresh interval of {interval:g}s; "
        f"seed refreshes {first}; min gap {min(gaps, default=0):.2f}s; "
        f"expired-token calls {state.expired_token_calls}; 401s {state.rejected_calls}"
    )
    assert traffic.failures == []
    assert traffic.total > 200
    assert state.expired_token_calls == 0
    assert state.rejected_calls == 0
    assert first == 1, "the seed refresh happened once for the whole fleet"
    assert min(gaps) >= lifetime / 2, f"two refreshes too close together: {gaps}"
    # One refresh per token: never more than duration / (shortest refresh interval) + 1.
    assert len(during) <= duration / (interval - leeway / 5) + 1
    assert len(during) >= duration / lifetime - 1
    assert state.token_calls["authorization_code"] == 0


# --- the lock holder dies mid refresh ------------------------------------------------------


async def find_holder(procs: list[ProxyProcess], generation: int) -> ProxyProcess:
    """The process that logged `token.refresh.started` for `generation` (it holds the lock)."""
    async with asyncio.timeout(15):
        while True:
            for proc in procs:
                if any(
                    e["generation"] == generation for e in log_events(proc, "token.refresh.started")
                ):
                    return proc
            await asyncio.sleep(0.01)


async def test_sigkilled_lock_holder_is_replaced_after_the_lock_ttl(
    fake_cloudbeds: Fake, redis_url: str, key_prefix: str, real_redis: aioredis.Redis, fleet: Any
) -> None:
    state, fake_url = fake_cloudbeds
    state.expires_in = 14
    lock_ttl, delay = 2.5, 1.5
    calls = timed(state)
    env = proxy_env(
        fake_url,
        redis_url,
        key_prefix,
        CBPROXY_REFRESH_LEEWAY="7",
        CBPROXY_TOKEN_TIMEOUT="2.2",
        CBPROXY_LOCK_TTL=str(lock_ttl),
    )
    procs = await fleet(env, 3)
    await all_ready(procs)
    (generation,) = set(await generations(procs))
    state.token_delay = delay  # every refresh from now on is slow
    lock_key = f"{key_prefix}:{{cred:default}}:lock"

    traffic = Traffic([p.url for p in procs])
    async with traffic.running(concurrency=6):
        holder = await find_holder(procs, generation)
        assert await real_redis.exists(lock_key)
        await traffic.drop(holder.url)
        holder.signal(signal.SIGKILL)
        holder.wait(5)
        killed_at = time.monotonic()
        survivors = [p for p in procs if p is not holder]

        async def refreshed() -> bool:
            return all(g is not None and g > generation for g in await generations(survivors))

        await eventually(refreshed, timeout=10)
        await asyncio.sleep(0.5)  # and traffic goes on with the new token

    times = calls.refreshes()
    assert len(times) == 3, "seed refresh, the killed holder's call, the replacement's"
    # The replacement waited for the dead holder's lock to expire: no second holder early.
    assert times[2] - times[1] >= lock_ttl - 0.2
    assert times[2] > killed_at - delay
    assert traffic.failures == []
    assert traffic.total > 100
    assert state.expired_token_calls == 0
    assert state.rejected_calls == 0
    assert len(set(await generations(survivors))) == 1
    assert all(e["generation"] <= generation for e in log_events(holder, "token.refresh.ok"))


# --- Redis goes away for longer than the leeway -------------------------------------------


async def stored_generation(url: str, prefix: str) -> int | None:
    client = aioredis.Redis.from_url(url)
    try:
        raw = await client.hget(f"{prefix}:{{conns}}:rec:default", "generation")
    finally:
        await client.aclose()
    return int(raw) if raw is not None else None


@pytest.mark.parametrize("rotate", [False, True], ids=["fixed", "rotating"])
async def test_redis_outage_longer_than_the_leeway(
    fake_cloudbeds: Fake, private_redis: RedisServer, key_prefix: str, fleet: Any, rotate: bool
) -> None:
    state, fake_url = fake_cloudbeds
    # Redis comes back 1.5 s before the old token expires: time to write back and converge.
    lifetime, leeway = 8.0, 3.0
    state.expires_in, state.rotate_refresh_tokens = int(lifetime), rotate
    calls = timed(state)
    env = proxy_env(fake_url, private_redis.url, key_prefix, CBPROXY_REFRESH_LEEWAY=str(leeway))
    procs = await fleet(env, 2)
    await all_ready(procs)
    (generation,) = set(await generations(procs))
    seeded = len(calls.refreshes())

    traffic = Traffic([p.url for p in procs])
    async with traffic.running(concurrency=4):
        await asyncio.sleep(0.5)
        private_redis.stop()
        down_at = time.monotonic()
        # Down past the refresh point (lifetime - leeway) but not to the next one.
        await asyncio.sleep(lifetime - leeway + 0.5)
        private_redis.start()
        up_at = time.monotonic()

        async def converged() -> bool:
            held = await generations(procs)
            stored = await stored_generation(private_redis.url, key_prefix)
            return len(set(held)) == 1 and stored is not None and stored >= max(held)

        await eventually(converged, timeout=10)
        await asyncio.sleep(0.5)

    during = [t for t in calls.refreshes() if down_at <= t <= up_at]
    assert 1 <= len(during) <= len(procs), "at most one refresh per process while down"
    for proc in procs:
        assert len(log_events(proc, "token.refresh.without_lock")) <= 1
    held = await generations(procs)
    assert held[0] is not None and held[0] > generation
    assert await stored_generation(private_redis.url, key_prefix) == held[0]
    assert len(calls.refreshes()) - seeded <= len(procs) + 1
    # With rotation, the replica that refreshed second was refused (the first had rotated
    # the token away): that refusal must not block the fleet nor lose the new token.
    for proc in procs:
        assert (await get(proc.url, "/_proxy/tokens"))[1]["default"]["state"] == "ok"
    store = RedisStore.from_url(private_redis.url, prefix=key_prefix)
    stored = await store.load("default")
    await store.close()
    assert stored is not None
    assert stored.refresh_token in state.valid_refresh_tokens()
    assert traffic.failures == []
    assert state.expired_token_calls == 0
    assert state.rejected_calls == 0


# --- late writers and rotated refresh tokens ----------------------------------------------


@pytest.mark.parametrize("rotate", [False, True], ids=["fixed", "rotating"])
async def test_stale_lock_holders_late_write_is_refused(
    fake_cloudbeds: Fake, redis_url: str, key_prefix: str, real_redis: aioredis.Redis, rotate: bool
) -> None:
    """A's lock expires mid call; B refreshes. A's late answer never replaces B's token.

    With rotating refresh tokens A's late answer is a refusal (B rotated the token away):
    that must not put the credential in reauthorization_required either.
    """
    state, fake_url = fake_cloudbeds
    state.rotate_refresh_tokens = rotate
    settings = dataclasses.replace(
        settings_for(fake_url, CBPROXY_REDIS_URL=redis_url, CBPROXY_REDIS_PREFIX=key_prefix),
        lock_ttl=0.5,  # shorter than the slow call below: A's lock expires mid refresh
        token_timeout=5.0,
    )
    stores = [RedisStore.from_url(redis_url, prefix=key_prefix) for _ in range(2)]
    async with aiohttp.ClientSession() as session:
        a, b = (
            OAuthCredential(
                settings.credentials[0],
                settings,
                store=store,
                session=session,
                metrics=Metrics(),
                clock=system_clock,
            )
            for store in stores
        )
        await a.start()
        await a.refresh_now()
        await b.start()
        assert a.record == b.record
        assert a.record is not None
        generation = a.record.generation

        state.token_delay = 1.5
        late = asyncio.create_task(a.refresh_now())
        await eventually(lambda: _true(state.token_calls["refresh_token"] == 2), timeout=5)
        await asyncio.sleep(0.7)  # A's lock has expired; its call is still at Cloudbeds
        state.token_delay = 0
        await b.refresh_now()  # B takes the lock, re-reads, refreshes, writes
        assert b.record is not None
        assert b.record.generation == generation + 1
        await late  # A's answer arrives and is written over B's: refused

        stored = await stores[0].load("default")
        assert stored is not None
        assert state.token_calls["refresh_token"] == 3
        assert stored.generation == generation + 1
        assert stored.access_token == b.record.access_token
        assert a.record == stored, "the late writer adopts the record that won"
        assert stored.state.value == "ok"
        assert stored.refresh_token in state.valid_refresh_tokens()
        assert a.ready() == (True, "ok")
        for store in stores:
            await store.close()


async def _true(value: bool) -> bool:
    return value


async def test_rotated_refresh_token_is_kept_across_refreshes_and_restarts(
    fake_cloudbeds: Fake, redis_url: str, key_prefix: str, real_redis: aioredis.Redis, fleet: Any
) -> None:
    state, fake_url = fake_cloudbeds
    state.expires_in, state.rotate_refresh_tokens = 2, True
    env = proxy_env(fake_url, redis_url, key_prefix, CBPROXY_REFRESH_LEEWAY="0.5")
    procs = await fleet(env, 2)
    await all_ready(procs)
    (first,) = set(await generations(procs))

    async def advanced(by: int) -> bool:
        held = await generations(procs)
        return all(g is not None and g >= first + by for g in held)

    await eventually(lambda: advanced(3), timeout=10)
    await asyncio.gather(*(proc.astop() for proc in procs))
    store = RedisStore.from_url(redis_url, prefix=key_prefix)
    stored = await store.load("default")
    await store.close()
    assert stored is not None
    assert stored.refresh_token != "fake-refresh-token"
    assert state.valid_refresh_tokens() == {stored.refresh_token}, "the newest one is stored"

    # A restart still seeds CBPROXY_REFRESH_TOKEN (long rotated away): the stored one wins.
    (restarted,) = await fleet(env, 1)
    await all_ready([restarted])
    status, _ = await get(restarted.url)
    assert status == 200
    before = state.token_calls["refresh_token"]
    await eventually(lambda: _true(state.token_calls["refresh_token"] > before), timeout=5)
    await all_ready([restarted])
    assert (await generations([restarted]))[0] > stored.generation
    assert "token.refresh.rejected" not in restarted.log_text()
    assert state.rejected_calls == 0
    assert state.expired_token_calls == 0


# --- invalid_grant: reauthorization_required, then recovery -------------------------------


async def test_invalid_grant_blocks_the_fleet_until_a_new_refresh_token_is_seeded(
    fake_cloudbeds: Fake, redis_url: str, key_prefix: str, real_redis: aioredis.Redis, fleet: Any
) -> None:
    state, fake_url = fake_cloudbeds
    state.expires_in = 4
    calls = timed(state)
    env = proxy_env(fake_url, redis_url, key_prefix, CBPROXY_REFRESH_LEEWAY="1")
    procs = await fleet(env, 3)
    await all_ready(procs)
    state.reject_refresh = True
    before = len(calls.refreshes())

    async def none_ready() -> bool:
        return [(await get(p.url, "/_proxy/readyz"))[0] for p in procs] == [503] * len(procs)

    await eventually(none_ready, timeout=8)
    rejected_at = calls.refreshes()[-1]
    if time.monotonic() - rejected_at < 0.5:  # the access token has about a second left
        for proc in procs:
            assert (await get(proc.url))[0] == 200, "the still-valid token keeps serving"

    async def all_blocked() -> bool:
        for proc in procs:
            status, body = await get(proc.url)
            if status != 503:
                return False
            assert body["error"] == "reauthorization_required", body
            assert "oauth/start" in body["message"]
        return True

    await eventually(all_blocked, timeout=5)
    async with aiohttp.ClientSession() as session, session.get(procs[1].url + API) as response:
        assert response.headers["X-Cloudbeds-Proxy-Error"] == "reauthorization_required"
        assert int(response.headers["Retry-After"]) > 0
    _, ready = await get(procs[2].url, "/_proxy/readyz")
    assert ready["checks"]["credential:default"]["detail"] == "reauthorization_required"
    await asyncio.sleep(1.5)  # nothing retries a rejected refresh token
    assert len(calls.refreshes()) - before == 1, "the token endpoint was called once"
    assert state.expired_token_calls == 0

    # Recovery: one replica restarts with a refresh token Cloudbeds accepts.
    state.reject_refresh = False
    state.add_refresh_token("fake-refresh-token-2")
    await procs[0].astop()
    (fresh,) = await fleet({**env, "CBPROXY_REFRESH_TOKEN": "fake-refresh-token-2"}, 1)
    fleet_now = [fresh, *procs[1:]]
    await all_ready(fleet_now)
    for proc in fleet_now:
        assert (await get(proc.url))[0] == 200
    assert len(calls.refreshes()) - before == 2, "one refresh for the whole fleet"
    assert len(set(await generations(fleet_now))) == 1


# --- encryption at rest ---------------------------------------------------------------------


async def test_no_token_in_plaintext_in_redis_with_an_encryption_key(
    fake_cloudbeds: Fake, redis_url: str, key_prefix: str, real_redis: aioredis.Redis, fleet: Any
) -> None:
    state, fake_url = fake_cloudbeds
    state.expires_in = 2
    key = Fernet.generate_key().decode()
    env = proxy_env(
        fake_url,
        redis_url,
        key_prefix,
        CBPROXY_REFRESH_LEEWAY="0.5",
        CBPROXY_ENCRYPTION_KEY=key,
        CBPROXY_RATE_LIMIT="5",  # so the limiter's keys are there to be checked too
    )
    procs = await fleet(env, 2)
    await all_ready(procs)
    (first,) = set(await generations(procs))

    async def refreshed() -> bool:
        return all(g is not None and g > first for g in await generations(procs))

    await eventually(refreshed, timeout=5)
    for proc in procs:
        assert (await get(proc.url))[0] == 200

    values: list[bytes] = []
    async for name in real_redis.scan_iter(match=f"{key_prefix}*"):
        kind = (await real_redis.type(name)).decode()
        if kind == "string":
            values.append(await real_redis.get(name) or b"")
        elif kind == "hash":
            values.extend((await real_redis.hgetall(name)).values())
        elif kind == "zset":
            values.extend(m for m, _ in await real_redis.zrange(name, 0, -1, withscores=True))
        else:
            values.append(repr(await real_redis.dump(name)).encode())
    assert values
    secrets = {*state._access_tokens, *state.valid_refresh_tokens(), state.client_secret, key}
    assert len(state._access_tokens) >= 2
    for value in values:
        for secret in secrets:
            assert secret.encode() not in value
    record = await real_redis.hget(f"{key_prefix}:{{conns}}:rec:default", "data")
    assert json.loads(record)["enc"] == 1
