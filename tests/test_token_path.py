"""The credential on the request path, through the proxy's port, with a shared fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.conftest import Clocked
from tests.support import settings_for


async def test_concurrent_requests_at_expiry_cause_one_refresh(
    clocked: Clocked, start_proxy: Any
) -> None:
    clock, state, url = clocked
    proxy = await start_proxy(settings_for(url), clock=clock)
    assert state.token_calls["refresh_token"] == 1
    clock.advance(3600)  # every token is now expired, for the proxy and the fake alike
    state.token_delay = 0.2  # keep the refresh in flight while the requests pile up
    async with aiohttp.ClientSession() as session:

        async def call() -> int:
            async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
                return response.status

        statuses = await asyncio.gather(*(call() for _ in range(50)))
    assert statuses == [200] * 50
    assert state.token_calls["refresh_token"] == 2
    assert state.expired_token_calls == 0


async def test_expired_token_is_never_sent(clocked: Clocked, start_proxy: Any) -> None:
    clock, state, url = clocked
    proxy = await start_proxy(settings_for(url, CBPROXY_WAIT_FOR_TOKEN="0.5"), clock=clock)
    state.token_failures = 10_000
    clock.advance(3601)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/api/v1.3/getHotels") as response,
    ):
        assert response.status == 503
        assert response.headers["X-Cloudbeds-Proxy-Error"] == "no_usable_token"
        assert "Retry-After" in response.headers
    assert state.api_calls == 0
    assert state.expired_token_calls == 0


async def test_401_refreshes_once_and_replays_a_buffered_body(
    clocked: Clocked, start_proxy: Any
) -> None:
    clock, state, url = clocked
    proxy = await start_proxy(settings_for(url), clock=clock)
    clock.advance(60)  # past the minimum interval between forced refreshes
    state.revoke_all()
    async with aiohttp.ClientSession() as session:

        async def post() -> tuple[int, Any]:
            async with session.post(
                f"{proxy}/api/v1.3/fake/echo", data={"guestFirstName": "Zoë"}
            ) as response:
                return response.status, await response.json()

        results = await asyncio.gather(*(post() for _ in range(10)))
    assert [status for status, _ in results] == [200] * 10
    assert state.token_calls["refresh_token"] == 2  # start-up plus exactly one after the 401s


async def test_401_with_streamed_body_is_not_replayed(clocked: Clocked, start_proxy: Any) -> None:
    clock, state, url = clocked
    proxy = await start_proxy(settings_for(url, CBPROXY_REPLAY_BODY_BYTES="10"), clock=clock)
    clock.advance(60)
    state.revoke_all()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 100

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy}/api/v1.3/fake/echo", data=body()) as response:
            assert response.status == 401
            assert response.headers["X-Cloudbeds-Proxy-Not-Replayed"] == "body-streamed"
            assert (await response.json())["error"] == "access_denied"
        # The refresh happened, so the next request succeeds.
        async with session.post(f"{proxy}/api/v1.3/fake/echo", data=body()) as response:
            assert response.status == 200
    assert state.token_calls["refresh_token"] == 2


async def test_a_401_that_a_new_token_does_not_cure_causes_no_refresh_storm(
    clocked: Clocked, start_proxy: Any
) -> None:
    clock, state, url = clocked
    proxy = await start_proxy(settings_for(url), clock=clock)
    async with aiohttp.ClientSession() as session:

        async def status() -> int:
            async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
                return response.status

        clock.advance(60)
        state.revoke_all()
        assert await status() == 200  # one forced refresh cured it
        assert state.token_calls["refresh_token"] == 2
        # Cloudbeds keeps refusing (a revoked app, a property the token does not cover):
        # the forced token is not forced again, every 5 s or on every request.
        for _ in range(10):
            clock.advance(60)
            state.revoke_all()
            assert await status() == 401
        assert state.token_calls["refresh_token"] == 2
        clock.advance(900)
        state.revoke_all()
        assert await status() == 200
        assert state.token_calls["refresh_token"] == 3


async def test_a_401_right_after_a_refresh_waits_for_the_guard_and_is_replayed(
    clocked: Clocked, start_proxy: Any
) -> None:
    """Whether a revoked token is recovered must not depend on whether it is 4.9 or 5.1 s old."""
    clock, state, url = clocked
    proxy = await start_proxy(settings_for(url), clock=clock)
    clock.advance(1)  # the token is 1 s old: inside the guard between forced refreshes
    state.revoke_all()
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.get(f"{proxy}/api/v1.3/getHotels"))
        for _ in range(200):  # until the first answer, a 401, has reached the proxy
            if state.rejected_calls:
                break
            await asyncio.sleep(0.01)
        assert state.rejected_calls == 1
        assert state.token_calls["refresh_token"] == 1  # the guard holds meanwhile
        clock.advance(5)
        response = await asyncio.wait_for(pending, 10)
        assert response.status == 200
        response.release()
    assert state.token_calls["refresh_token"] == 2
    assert state.rejected_calls == 1
