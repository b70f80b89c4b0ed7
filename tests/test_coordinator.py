"""The coordinator against the fake Cloudbeds on a real port, with a fake clock.

The background loop waits with real timeouts computed from the clock, so tests move the
clock and wake the loop (`nudge`) instead of sleeping until a token expires.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from proxy import logs
from proxy.clock import FakeClock
from proxy.config import Settings
from proxy.coordinator import OAuthCredential
from proxy.errors import NoUsableToken, ReauthorizationRequired, StoreBusy, StoreUnavailable
from proxy.fake_cloudbeds import FakeCloudbeds, create_fake_app
from proxy.metrics import Metrics
from proxy.pacing import Pacer
from proxy.refresh import keepalive_time, phase, refresh_time
from proxy.store import MemoryStore, RefreshLock, TokenStore
from proxy.tokens import State, TokenRecord
from tests.support import serve, settings_for

NAME = "default"


class FlakyStore:
    """A TokenStore that raises StoreUnavailable while `down`; counts loads."""

    shared = False

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner or MemoryStore()
        self.down = False
        self.loads = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("store is down (test)")

    async def load(self, name: str) -> TokenRecord | None:
        self.loads += 1
        self._check()
        return await self.inner.load(name)

    def lock(self, name: str, ttl: float) -> RefreshLock:
        inner, store = self.inner.lock(name, ttl), self

        class Lock:
            async def acquire(self) -> bool:
                store._check()
                return await inner.acquire()

            async def release(self) -> None:
                store._check()
                await inner.release()

        return Lock()

    def __getattr__(self, name: str) -> Any:
        """Every other store method, failing while `down`."""
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return await attr(*args, **kwargs)

        return call

    async def close(self) -> None:
        await self.inner.close()


class Harness:
    """One credential, its store, the fake Cloudbeds and the clock they share."""

    def __init__(
        self, fake: FakeCloudbeds, clock: FakeClock, settings: Settings, store: TokenStore
    ) -> None:
        self.fake, self.clock, self.settings, self.store = fake, clock, settings, store
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def credential(self, **overrides: str) -> OAuthCredential:
        settings = self.settings
        if overrides:
            settings = settings_for(self.url, **self._env, **overrides)
        assert self.session is not None
        return OAuthCredential(
            settings.credentials[0],
            settings,
            store=self.store,
            session=self.session,
            metrics=Metrics(),
            clock=self.clock,
        )

    def run(self, credential: OAuthCredential) -> None:
        """Start the background refresher; the fixture cancels it."""
        task = asyncio.create_task(credential.run())
        self.tasks.add(task)

    async def started(self, **overrides: str) -> OAuthCredential:
        """A started credential with its refresher running and a first token."""
        credential = self.credential(**overrides)
        await credential.start()
        self.run(credential)
        await credential.header()
        return credential

    @property
    def calls(self) -> int:
        return self.fake.token_calls["refresh_token"]

    url = ""
    _env: dict[str, str] = {}  # noqa: RUF012 - set per harness


async def settle(predicate: Callable[[], bool] | None = None) -> None:
    """Let the loop run until `predicate` holds, or for a few short turns without one."""
    # A predicate gets up to 10 s of real time: generous for a loaded shared machine.
    for _ in range(2000 if predicate is not None else 20):
        if predicate is not None and predicate():
            return
        await asyncio.sleep(0.005)
    if predicate is not None:
        raise AssertionError("condition not reached")


def nudge(credential: OAuthCredential) -> None:
    """Wake the background loop so it re-reads the (fake) clock."""
    credential._wake.set()


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Any]]:
    runners, harnesses = [], []

    async def make(store: TokenStore | None = None, **env: str) -> Harness:
        clock = FakeClock()
        fake = FakeCloudbeds(clock=clock)
        runner, url = await serve(create_fake_app(fake))
        runners.append(runner)
        env = {"CBPROXY_WAIT_FOR_TOKEN": "0.3", **env}
        h = Harness(fake, clock, settings_for(url, **env), store or MemoryStore())
        h.url, h._env = url, env
        h.session = aiohttp.ClientSession()
        harnesses.append(h)
        return h

    yield make
    for h in harnesses:
        for task in h.tasks:
            task.cancel()
        await asyncio.gather(*h.tasks, return_exceptions=True)
        assert h.session is not None
        await h.session.close()
    for runner in runners:
        await runner.cleanup()


def bearer(credential: OAuthCredential) -> str:
    assert credential.record is not None
    assert credential.record.access_token is not None
    return credential.record.access_token


# -- start, fast path, expiry ------------------------------------------------------------------


async def test_start_seeds_from_the_refresh_token_and_gets_a_token(harness: Any) -> None:
    h = await harness()
    credential = h.credential()
    await credential.start()
    seeded = await h.store.load(NAME)
    assert seeded is not None
    assert (seeded.access_token, seeded.refresh_token) == (None, "fake-refresh-token")
    h.run(credential)
    name, value = await credential.header()
    assert name == "Authorization"
    assert value.removeprefix("Bearer ") in h.fake.valid_access_tokens()
    assert h.calls == 1
    stored = await h.store.load(NAME)
    assert stored is not None
    assert stored == credential.record
    assert stored.expires_at == h.clock() + h.fake.expires_in
    assert credential.ready() == (True, "ok")


async def test_start_keeps_a_stored_record_instead_of_reseeding(harness: Any) -> None:
    h = await harness()
    first = await h.started()
    second = h.credential()
    await second.start()
    assert second.record == first.record
    assert await second.header() == await first.header()
    assert h.calls == 1


async def test_header_fast_path_needs_no_store_and_no_token_call(harness: Any) -> None:
    h = await harness(FlakyStore())
    credential = await h.started()
    loads = h.store.loads
    headers = {await credential.header() for _ in range(200)}
    assert len(headers) == 1
    assert h.store.loads == loads
    assert h.calls == 1


async def test_eight_hour_token_is_not_refreshed_after_one_hour(harness: Any) -> None:
    h = await harness()
    h.fake.expires_in = 8 * 3600
    credential = await h.started()
    h.clock.advance(3 * 3600)
    nudge(credential)
    await settle()
    assert h.calls == 1
    h.clock.advance(5 * 3600 - 200)  # inside the 300 s leeway
    nudge(credential)
    await settle(lambda: h.calls == 2)


async def test_proactive_refresh_before_expiry_keeps_serving_the_old_token(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    old = await credential.header()
    h.fake.token_delay = 0.2
    h.clock.advance(3600 - 100)  # due, not expired
    nudge(credential)
    await settle(lambda: h.calls == 2)
    assert await credential.header() == old  # still valid while the refresh is in flight
    await settle(lambda: credential._header != old)
    assert bearer(credential) in h.fake.valid_access_tokens()


async def test_concurrent_headers_at_expiry_make_exactly_one_token_call(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    old = await credential.header()
    h.clock.advance(3600 + 1)
    h.fake.token_delay = 0.05  # keep the refresh in flight while all 50 arrive
    headers = await asyncio.gather(*(credential.header() for _ in range(50)))
    assert h.calls == 2
    assert len(set(headers)) == 1
    assert headers[0] != old
    assert headers[0][1].removeprefix("Bearer ") in h.fake.valid_access_tokens()


async def test_never_an_expired_token_when_the_endpoint_is_down(harness: Any) -> None:
    h = await harness(CBPROXY_WAIT_FOR_TOKEN="0.2")
    credential = await h.started()
    h.fake.token_failures = 1000
    h.clock.advance(3600)  # exactly at expiry: no longer usable
    results = await asyncio.gather(
        *(credential.header() for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, NoUsableToken) for r in results), results
    assert not isinstance(results[0], ReauthorizationRequired)
    assert results[0].retry_after  # type: ignore[union-attr]
    assert "fake-client-secret" not in str(results[0])
    # One failed attempt, then backoff: the waiting requests do not hammer the endpoint.
    assert 1 <= h.fake.token_calls["refresh_token"] - 1 <= 2
    assert credential.ready() == (False, "no valid access token")


async def test_transient_failure_backs_off_then_succeeds(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    h.fake.token_failures = 2
    h.clock.advance(3600 - 100)
    nudge(credential)
    await settle(lambda: h.calls == 2)
    await settle()
    assert h.calls == 2  # backing off: the clock has not reached the retry time
    assert credential.status()["last_error"] == "token endpoint answered HTTP 500"
    h.clock.advance(1.0)  # first backoff is under 1 s
    nudge(credential)
    await settle(lambda: h.calls == 3)
    await settle()
    assert h.calls == 3  # second backoff (1-2 s) not reached yet
    h.clock.advance(2.0)
    nudge(credential)
    await settle(lambda: h.calls == 4)
    await settle(lambda: bearer(credential) in h.fake.valid_access_tokens())
    assert credential.status()["last_error"] is None
    assert credential.record is not None
    assert credential.record.expires_at == h.clock() + 3600


# -- 4xx from the token endpoint ---------------------------------------------------------------


async def test_invalid_grant_requires_reauthorization_and_nothing_retries(harness: Any) -> None:
    h = await harness()
    h.fake.reject_refresh = True
    credential = h.credential()
    await credential.start()
    h.run(credential)
    with pytest.raises(ReauthorizationRequired):
        await credential.header()
    assert h.calls == 1
    stored = await h.store.load(NAME)
    assert stored is not None
    assert stored.state is State.REAUTHORIZATION_REQUIRED
    for _ in range(5):
        h.clock.advance(10_000)
        nudge(credential)
        await settle()
        with pytest.raises(ReauthorizationRequired):
            await credential.header()
    assert await credential.refresh_now() is not None
    assert not await credential.rejected(("Authorization", "Bearer whatever"))
    assert h.calls == 1
    assert credential.ready() == (False, "reauthorization_required")


async def test_rejected_refresh_keeps_the_valid_token_until_it_expires(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    valid = await credential.header()
    h.fake.reject_refresh = True
    h.clock.advance(3600 - 100)
    nudge(credential)
    await settle(
        lambda: (
            credential.record is not None
            and credential.record.state is State.REAUTHORIZATION_REQUIRED
        )
    )
    assert await credential.header() == valid
    h.clock.advance(100)
    with pytest.raises(ReauthorizationRequired):
        await credential.header()
    assert h.calls == 2


async def test_a_seed_with_a_different_refresh_token_recovers(harness: Any) -> None:
    h = await harness()
    h.fake.reject_refresh = True
    blocked = h.credential()
    await blocked.start()
    h.run(blocked)
    with pytest.raises(ReauthorizationRequired):
        await blocked.header()
    h.fake.reject_refresh = False
    # A restart with the same (rejected) seed stays blocked and calls nothing.
    same = h.credential()
    await same.start()
    with pytest.raises(ReauthorizationRequired):
        await same.header()
    assert h.calls == 1
    # A restart with a new refresh token recovers.
    h.fake.add_refresh_token("fresh-refresh-token")
    recovered = h.credential(CBPROXY_REFRESH_TOKEN="fresh-refresh-token")
    await recovered.start()
    h.run(recovered)
    _, value = await recovered.header()
    assert value.removeprefix("Bearer ") in h.fake.valid_access_tokens()
    assert recovered.record is not None
    assert recovered.record.state is State.OK
    assert recovered.record.refresh_token == "fresh-refresh-token"
    stored = await h.store.load(NAME)
    assert stored == recovered.record
    assert h.calls == 2


# -- 401 from Cloudbeds -------------------------------------------------------------------------


async def test_rejected_refreshes_only_for_the_current_header(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    current = await credential.header()
    h.clock.advance(60)
    # A header that is not the current one: the current one is the answer, no refresh.
    assert await credential.rejected(("Authorization", "Bearer some-older-token"))
    assert h.calls == 1
    h.fake.revoke_all()
    assert await credential.rejected(current)
    assert h.calls == 2
    renewed = await credential.header()
    assert renewed != current
    assert renewed[1].removeprefix("Bearer ") in h.fake.valid_access_tokens()
    # The old header again (a late 401 from before the refresh): no second refresh.
    assert await credential.rejected(current)
    assert h.calls == 2


async def test_a_storm_of_rejections_makes_one_token_call(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    current = await credential.header()
    h.clock.advance(60)
    h.fake.revoke_all()
    h.fake.token_delay = 0.05
    results = await asyncio.gather(*(credential.rejected(current) for _ in range(20)))
    assert all(results)
    assert h.calls == 2
    # Just refreshed: a second wave against the new token does not refresh again.
    newer = await credential.header()
    assert not await credential.rejected(newer)
    assert h.calls == 2


# -- store outage -------------------------------------------------------------------------------


async def test_store_down_refreshes_once_in_memory_and_writes_back(harness: Any) -> None:
    store = FlakyStore()
    h = await harness(store)
    credential = await h.started()
    before = credential.record
    assert before is not None
    store.down = True
    h.clock.advance(3600 + 1)
    h.fake.token_delay = 0.05
    headers = await asyncio.gather(*(credential.header() for _ in range(10)))
    assert len(set(headers)) == 1
    assert h.calls == 2
    assert credential.status()["unsaved"] is True
    nudge(credential)
    await settle()
    assert h.calls == 2
    with pytest.raises(StoreUnavailable):
        await credential.reload()
    store.down = False
    await credential.reload()
    stored = await store.inner.load(NAME)
    assert stored == credential.record
    assert stored is not None
    assert stored.generation == before.generation + 1
    assert credential.status()["unsaved"] is False


async def test_write_back_never_replaces_a_newer_generation(harness: Any) -> None:
    store = FlakyStore()
    h = await harness(store)
    credential = await h.started()
    store.down = True
    h.clock.advance(3600 + 1)
    await credential.header()
    assert h.calls == 2
    assert credential.record is not None
    # Meanwhile another replica wrote a newer record to the store.
    newer = credential.record.successor(access_token=h.fake.mint_access_token())
    newer = newer.successor()
    await store.inner.put(NAME, newer)
    store.down = False
    await credential.reload()
    assert await store.inner.load(NAME) == newer
    assert credential.record == newer
    assert credential.status()["unsaved"] is False


async def test_start_with_the_store_down_still_gets_a_token(harness: Any) -> None:
    store = FlakyStore()
    store.down = True
    h = await harness(store)
    credential = h.credential()
    await credential.start()
    h.run(credential)
    _, value = await credential.header()
    assert value.removeprefix("Bearer ") in h.fake.valid_access_tokens()
    assert h.calls == 1
    store.down = False
    await credential.reload()
    assert await store.inner.load(NAME) == credential.record


async def test_status_never_shows_tokens(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    text = repr(credential.status())
    assert bearer(credential) not in text
    assert "fake-refresh-token" not in text


async def test_tokens_adopted_from_another_replica_are_never_logged(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    other = credential.record.successor(
        access_token="token-from-another-replica", refresh_token="refresh-from-another-replica"
    )
    await h.store.put(NAME, other)
    await credential.reload()
    assert credential.record.generation == other.generation
    text = logs._scrub("saw token-from-another-replica and refresh-from-another-replica")
    assert "another-replica" not in text


async def test_an_authorisation_wins_over_a_refresh_written_meanwhile(harness: Any) -> None:
    h = await harness()
    credential = await h.started()
    before = credential.record
    # Another replica's refresh lands the generation this install is about to write.
    await h.store.put(NAME, before.successor(access_token="from-another-replica"))
    code = h.fake.issue_code()
    from proxy import cloudbeds

    assert h.session is not None
    response = await cloudbeds.send_token_request(
        h.session,
        h.settings.token_url,
        cloudbeds.code_form("fake-client-id", "fake-client-secret", h.fake.redirect_uri, code),
        5,
    )
    installed = await credential.install(response)
    stored = await h.store.load(NAME)
    assert stored is not None
    assert stored.access_token == response.access_token
    assert installed.generation == stored.generation == before.generation + 2


async def test_a_401_inside_the_storm_guard_waits_for_the_refresh_it_allows(harness: Any) -> None:
    """A token refreshed 1 s ago and revoked: the request waits for the guard, then replays."""
    h = await harness(CBPROXY_WAIT_FOR_TOKEN="10")
    credential = await h.started()
    current = await credential.header()
    h.clock.advance(1)  # the seed refresh was 1 s ago: inside min_forced_interval
    h.fake.revoke_all()
    waiting = asyncio.ensure_future(credential.rejected(current))
    await settle()
    assert not waiting.done()
    assert h.calls == 1  # the guard holds: no refresh yet
    h.clock.advance(5)
    assert await asyncio.wait_for(waiting, 5)
    assert h.calls == 2
    assert await credential.header() != current
    # Past the bound (the guard lifts later than CBPROXY_WAIT_FOR_TOKEN): the 401 at once.
    short = await harness(CBPROXY_WAIT_FOR_TOKEN="2")
    other = await short.started()
    token = await other.header()
    short.clock.advance(1)
    short.fake.revoke_all()
    assert not await other.rejected(token)
    assert short.calls == 1


async def test_a_store_that_does_not_answer_is_waited_for_while_the_token_has_time(
    harness: Any,
) -> None:
    """A busy store is not a missing one: no unlocked refresh while the token is good."""
    store = FlakyStore()
    h = await harness(store)
    credential = await h.started()
    assert h.calls == 1
    store.down = True
    h.clock.advance(3600 - 299)  # refresh time (leeway 300): 299 s left, more than 150
    nudge(credential)
    await settle()
    assert h.calls == 1  # no token call without the lock yet
    assert credential.last_error == "the store did not answer for the refresh lock"
    h.clock.advance(160)  # 139 s left: within half the leeway, the token must be renewed
    nudge(credential)
    await settle(lambda: h.calls == 2)
    assert h.calls == 2
    assert credential.status()["unsaved"] is True


# -- refresh what is used; keep-alives -------------------------------------------------------

CONNECTION = "alpha.property.1001"
WEEK = 7 * 24 * 3600.0


def app_connection(h: Harness, **env: str) -> OAuthCredential:
    """A connection of app `alpha`, imported with the fake's valid refresh token alone."""
    settings = settings_for(h.url, **h._env, **env) if env else h.settings
    configured = settings.credentials[0]
    connection = dataclasses.replace(configured, name=CONNECTION, app="alpha", refresh_token=None)
    assert h.session is not None
    return OAuthCredential(
        connection, settings, store=h.store, session=h.session, metrics=Metrics(), clock=h.clock
    )


async def imported(h: Harness, **env: str) -> OAuthCredential:
    record = TokenRecord(
        None, 0.0, "fake-refresh-token", 1, app="alpha", created_at=h.clock(), properties=("1",)
    )
    assert await h.store.put(CONNECTION, record)
    credential = app_connection(h, **env)
    await credential.start()
    h.run(credential)
    return credential


async def test_an_imported_connection_makes_no_token_call_until_a_request(harness: Any) -> None:
    h = await harness()
    credential = await imported(h)
    await settle()
    h.clock.advance(2 * 24 * 3600)  # two idle days: still nothing
    nudge(credential)
    await settle()
    assert h.calls == 0
    name, value = await credential.header()  # the request waits for the one refresh
    assert name == "Authorization"
    assert value.removeprefix("Bearer ") in h.fake.valid_access_tokens()
    assert h.calls == 1
    assert await credential.header() == (name, value)
    assert h.calls == 1


async def test_a_used_connection_is_refreshed_ahead_and_an_idle_one_is_not(harness: Any) -> None:
    h = await harness()
    credential = await imported(h)
    await credential.header()
    assert h.calls == 1
    record = credential.record
    assert record is not None
    due = refresh_time(record, credential._policy, phase(CONNECTION))
    h.clock.value = due + 1  # used within a lifetime: refreshed ahead, at its grid point
    nudge(credential)
    await settle(lambda: h.calls == 2)
    assert credential._usable()
    # No request since: at the next grid point it has been idle for over a lifetime.
    h.clock.advance(3300 + 10)
    nudge(credential)
    await settle()
    assert h.calls == 2
    h.clock.advance(3600)  # the token expired, unrefreshed
    nudge(credential)
    await settle()
    assert h.calls == 2
    assert not credential._usable()
    await credential.header()  # the next request refreshes it: one call
    assert h.calls == 3


async def test_refresh_idle_after_is_configurable(harness: Any) -> None:
    h = await harness()
    credential = await imported(h, CBPROXY_REFRESH_IDLE_AFTER="60")
    await credential.header()
    h.clock.advance(30)
    await credential.header()  # used 30 s after the refresh
    record = credential.record
    assert record is not None
    # A grid point inside the minute after that use is still "used"; later ones are not.
    assert refresh_time(record, credential._policy, phase(CONNECTION)) > h.clock() + 60
    h.clock.value = refresh_time(record, credential._policy, phase(CONNECTION)) + 1
    nudge(credential)
    await settle()
    assert h.calls == 1


async def test_an_idle_connection_is_kept_alive_once_per_interval(harness: Any) -> None:
    h = await harness()
    credential = await imported(h)
    await credential.header()
    assert h.calls == 1
    for expected in (2, 3, 4):
        record = credential.record
        assert record is not None
        assert record.refreshed_at is not None
        at = keepalive_time(record, credential._policy, phase(CONNECTION), 0.999)
        assert record.refreshed_at + WEEK / 2 < at <= record.refreshed_at + WEEK + 1
        h.clock.value = at - 2
        nudge(credential)
        await settle()
        assert h.calls == expected - 1  # idle, not due yet: nothing
        h.clock.value = at
        nudge(credential)
        await settle(lambda n=expected: h.calls == n)
        await settle()
        assert h.calls == expected  # one keep-alive, and it leaves the connection idle
        if expected > 2:  # on the grid from the first keep-alive on: one interval apart
            assert record.refreshed_at + WEEK - 2 < at < record.refreshed_at + WEEK + 2


async def test_a_configured_credential_is_refreshed_ahead_without_requests(harness: Any) -> None:
    h = await harness()
    credential = h.credential()
    await credential.start()
    h.run(credential)
    await settle(lambda: h.calls == 1)  # the seed: at once, no request needed
    record = credential.record
    assert record is not None
    h.clock.value = refresh_time(record, credential._policy, phase(NAME)) + 1
    nudge(credential)
    await settle(lambda: h.calls == 2)


async def test_two_replicas_at_one_grid_point_make_one_call_per_cycle(harness: Any) -> None:
    h = await harness()
    one = await imported(h)
    other = app_connection(h)  # a second replica of the same connection, same store
    await other.start()
    h.run(other)
    await one.header()
    await other.reload()
    await other.header()  # used on both
    assert h.calls == 1
    for cycle in (2, 3):
        record = one.record
        assert record is not None
        h.clock.value = refresh_time(record, one._policy, phase(CONNECTION)) + 1
        await one.header()
        await other.header()  # both still in use: both want to refresh at the grid point
        nudge(one)
        nudge(other)
        await settle(lambda n=cycle: h.calls == n)
        await settle(lambda: one.record == other.record)
        await settle()
        assert h.calls == cycle  # the lock and the re-read: never a second call


async def test_an_eight_hour_connection_of_an_app_follows_its_grid(harness: Any) -> None:
    h = await harness()
    h.fake.expires_in = 8 * 3600
    credential = await imported(h)
    await credential.header()
    assert h.calls == 1
    # The first token was issued off the grid: it is refreshed at its grid point, once.
    assert credential.record is not None
    first = refresh_time(credential.record, credential._policy, phase(CONNECTION), 0.999)
    h.clock.value = first
    await credential.header()  # in use
    nudge(credential)
    await settle(lambda: h.calls == 2)
    # On the grid now: the next refresh is one cycle (8 hours less the leeway) later.
    for hours in (3, 6):
        h.clock.value = first + hours * 3600
        await credential.header()
        nudge(credential)
        await settle()
        assert h.calls == 2
    h.clock.value = first + 8 * 3600 - 300 - 2
    await credential.header()
    nudge(credential)
    await settle()
    assert h.calls == 2
    h.clock.advance(3)  # past the grid point and this replica's offset of under a second
    nudge(credential)
    await settle(lambda: h.calls == 3)


async def test_paced_refreshes_of_two_connections_both_happen(harness: Any) -> None:
    h = await harness()
    pacer = Pacer(h.clock)
    credentials = []
    for name in ("alpha.property.1", "alpha.property.2"):
        record = TokenRecord(
            None, 0.0, "fake-refresh-token", 1, app="alpha", created_at=h.clock(), properties=("1",)
        )
        assert await h.store.put(name, record)
        settings = dataclasses.replace(
            h.settings.credentials[0], name=name, app="alpha", refresh_token=None
        )
        assert h.session is not None
        credential = OAuthCredential(
            settings,
            h.settings,
            store=h.store,
            session=h.session,
            metrics=Metrics(),
            clock=h.clock,
            pacer=pacer,
        )
        await credential.start()
        h.run(credential)
        await credential.header()
        credentials.append(credential)
    assert h.calls == 2
    h.clock.advance(3300 + 2)  # both past their grid points, tokens still valid
    for credential in credentials:
        await credential.header()
        nudge(credential)
    await settle(lambda: h.calls == 4)  # the second waited for its slot, then refreshed
    assert all(c._usable() for c in credentials)


class BusyStore(FlakyStore):
    """Answers late while `down`: StoreBusy (a pool wait or a command timed out)."""

    def _check(self) -> None:
        if self.down:
            raise StoreBusy("store is busy (test)")


async def test_a_busy_store_never_leads_to_a_refresh_without_the_lock(harness: Any) -> None:
    store = BusyStore()
    h = await harness(store)
    credential = await h.started()
    assert h.calls == 1
    store.down = True
    h.clock.advance(3600 - 100)  # within half the leeway: an unreachable store would refresh
    nudge(credential)
    await settle()
    assert h.calls == 1  # busy: the lock is tried again later, never skipped
    assert credential.last_error == "the store was busy for the refresh lock"
    store.down = False
    h.clock.advance(60)  # past the backoff: the lock is there again
    nudge(credential)
    await settle(lambda: h.calls == 2)
    assert credential.status()["unsaved"] is False
