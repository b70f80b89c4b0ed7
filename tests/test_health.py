"""Liveness, readiness and the token status page, against a private Redis that tests stop."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import create_app
from proxy.clock import FakeClock
from proxy.fake_cloudbeds import FakeCloudbeds
from tests.redis_server import RedisServer
from tests.support import serve, settings_for, wait_ready
from tests.test_metrics import scrape

HOTELS = "/api/v1.3/getHotels"


async def get(url: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        return response.status, await response.json()


async def until(url: str, path: str, status: int, timeout: float = 10.0) -> Any:
    """Poll `path` until it answers `status`; returns that answer's body."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got, body = await get(url, path)
        if got == status:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} still {got} after {timeout}s: {body}")
        await asyncio.sleep(0.05)


async def test_healthz_is_liveness_only(fake_cloudbeds: Any, start_proxy: Any) -> None:
    fake, fake_url = fake_cloudbeds
    fake.reject_refresh = True  # never ready: liveness must not care
    proxy = await start_proxy(settings_for(fake_url), ready=False)
    status, body = await get(proxy, "/_proxy/healthz")
    assert (status, body) == (200, {"status": "alive", "pid": os.getpid()})
    assert (await until(proxy, "/_proxy/readyz", 503))["ready"] is False
    for _ in range(200):  # the refresh Cloudbeds rejects, then readiness says why
        body = (await get(proxy, "/_proxy/readyz"))[1]
        if body["checks"]["credential:default"]["detail"] == "reauthorization_required":
            break
        await asyncio.sleep(0.02)
    assert body["checks"]["credential:default"]["detail"] == "reauthorization_required"
    assert (await get(proxy, "/_proxy/healthz"))[0] == 200
    assert fake.token_calls["refresh_token"] == 1  # healthz made no token call


async def test_readiness_follows_redis(
    fake_cloudbeds: Any, start_proxy: Any, private_redis: RedisServer
) -> None:
    _, fake_url = fake_cloudbeds
    settings = settings_for(
        fake_url, CBPROXY_REDIS_URL=private_redis.url, CBPROXY_POLL_INTERVAL="0.1"
    )
    proxy = await start_proxy(settings)
    status, body = await get(proxy, "/_proxy/readyz")
    assert status == 200
    load = body.pop("load")
    assert load["state"] in ("loading", "done")  # ready does not wait for the load
    assert body == {
        "ready": True,
        "checks": {
            "store": {"ok": True, "detail": "reachable"},
            "credential:default": {"ok": True, "detail": "ok"},
        },
        "connections": {},
    }

    private_redis.stop()
    body = await until(proxy, "/_proxy/readyz", 503)
    assert body["ready"] is False
    assert body["checks"]["store"]["ok"] is False
    assert "Redis unreachable" in body["checks"]["store"]["detail"]
    assert body["checks"]["credential:default"] == {"ok": True, "detail": "ok"}
    # Still alive, and still serving from the token in memory.
    assert (await get(proxy, "/_proxy/healthz"))[0] == 200
    assert (await get(proxy, HOTELS))[0] == 200
    deadline = asyncio.get_running_loop().time() + 10
    while (await scrape(proxy)).value("cbproxy_redis_errors_total", operation="poll") < 1:
        assert asyncio.get_running_loop().time() < deadline, "no Redis error counted"
        await asyncio.sleep(0.05)

    private_redis.start()
    body = await until(proxy, "/_proxy/readyz", 200)
    assert body["checks"]["store"] == {"ok": True, "detail": "reachable"}


async def test_readiness_fails_on_rejection_and_recovers_with_a_new_refresh_token(
    clocked: tuple[FakeClock, FakeCloudbeds, str], private_redis: RedisServer
) -> None:
    clock, fake, fake_url = clocked

    async def start(refresh_token: str) -> tuple[web.AppRunner, str]:
        settings = settings_for(
            fake_url, CBPROXY_REDIS_URL=private_redis.url, CBPROXY_REFRESH_TOKEN=refresh_token
        )
        return await serve(create_app(settings, clock=clock))

    runner, proxy = await start(fake.refresh_token)
    await wait_ready(proxy)
    fake.reject_refresh = True
    fake.revoke_all()
    clock.advance(10)
    assert (await get(proxy, HOTELS))[0] == 401  # the forced refresh was rejected
    status, body = await get(proxy, "/_proxy/readyz")
    assert status == 503
    assert body["checks"]["store"]["ok"] is True
    assert body["checks"]["credential:default"] == {
        "ok": False,
        "detail": "reauthorization_required",
    }
    assert (await get(proxy, "/_proxy/tokens"))[1]["default"]["state"] == (
        "reauthorization_required"
    )
    await runner.cleanup()

    # A restart with the refresh token Cloudbeds rejected does not clear the state.
    fake.reject_refresh = False
    runner, proxy = await start(fake.refresh_token)
    assert (await get(proxy, "/_proxy/readyz"))[0] == 503
    await runner.cleanup()
    assert fake.token_calls["refresh_token"] == 2

    # A restart with a new one does.
    fake.add_refresh_token("fake-refresh-token-2")
    runner, proxy = await start("fake-refresh-token-2")
    try:
        body = await until(proxy, "/_proxy/readyz", 200)
        assert body["checks"]["credential:default"] == {"ok": True, "detail": "ok"}
        assert (await get(proxy, HOTELS))[0] == 200
        tokens = (await get(proxy, "/_proxy/tokens"))[1]["default"]
        assert tokens["state"] == "ok"
        assert tokens["last_error"] is None
    finally:
        await runner.cleanup()


async def test_tokens_page_shows_state_and_never_a_secret(
    clocked: tuple[FakeClock, FakeCloudbeds, str], start_proxy: Any
) -> None:
    clock, fake, fake_url = clocked
    proxy = await start_proxy(settings_for(fake_url), clock=clock)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy}/_proxy/tokens") as response:
            assert response.status == 200
            text = await response.text()
            tokens = (await response.json())["default"]
    assert tokens["kind"] == "oauth"
    assert tokens["state"] == "ok"
    assert tokens["generation"] == 2  # the seed, then the first refresh
    assert tokens["last_refresh"] == clock()
    assert tokens["expires_at"] == clock() + 3600
    assert tokens["expires_in"] == 3600
    assert tokens["has_refresh_token"] is True
    assert tokens["properties"] == ["1001"]
    secrets = [fake.client_secret, fake.refresh_token, *fake._access_tokens]
    assert len(secrets) == 3
    for secret in secrets:
        assert secret not in text


async def test_a_busy_store_is_reported_but_does_not_fail_readiness(
    fake_cloudbeds: Any, start_proxy: Any
) -> None:
    from proxy.errors import StoreBusy, StoreUnavailable
    from proxy.store import MemoryStore

    class SlowStore(MemoryStore):
        shared = True
        failure: StoreUnavailable | None = None

        async def ping(self) -> None:
            if self.failure is not None:
                raise self.failure

    _, fake_url = fake_cloudbeds
    store = SlowStore()
    proxy = await start_proxy(settings_for(fake_url), store=store)
    store.failure = StoreBusy("Redis is busy (test)")
    status, body = await get(proxy, "/_proxy/readyz")
    assert status == 200
    assert body["checks"]["store"] == {"ok": True, "detail": "Redis is busy (test)"}
    store.failure = StoreUnavailable("Redis unreachable (test)")
    status, body = await get(proxy, "/_proxy/readyz")
    assert status == 503
    assert body["checks"]["store"] == {"ok": False, "detail": "Redis unreachable (test)"}
