"""Graceful shutdown of a real `cloudbeds-proxy serve` process on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.redis_server import RedisServer
from tests.support import ProxyProcess, fake_env, wait_ready

pytestmark = pytest.mark.slow
HOTELS = "/api/v1.3/getHotels"


@pytest.fixture
async def processes() -> AsyncIterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    await asyncio.gather(*(process.astop() for process in started))


async def refused(port: int, timeout: float = 5.0) -> None:
    """Poll until a new connection to `port` is refused (or reset: one that reached the
    backlog as the listener closed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except (ConnectionRefusedError, ConnectionResetError):
            return
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert asyncio.get_running_loop().time() < deadline, "still accepting after SIGTERM"
        await asyncio.sleep(0.02)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url + HOTELS) as response:
        return response.status, await response.json()


async def test_sigterm_lets_requests_in_flight_finish_then_exits_0(
    fake_cloudbeds: Any, tmp_path: Path, processes: list[ProxyProcess]
) -> None:
    fake, fake_url = fake_cloudbeds
    grace = 10.0
    env = {**fake_env(fake_url), "CBPROXY_SHUTDOWN_GRACE": str(grace)}
    proxy = ProxyProcess(env, tmp_path / "proxy.log")
    processes.append(proxy)
    await asyncio.to_thread(proxy.start)
    await wait_ready(proxy.url)
    fake.api_delay = 2.0
    before = len(fake.requests_seen)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        requests = [asyncio.create_task(fetch(session, proxy.url)) for _ in range(10)]
        while len(fake.requests_seen) < before + 10:  # all ten are at Cloudbeds now
            assert not any(r.done() for r in requests), [r.result() for r in requests if r.done()]
            await asyncio.sleep(0.01)
        proxy.signal(signal.SIGTERM)
        await refused(proxy.port)
        # The listener closed while the fake still holds every request (2 s).
        assert not any(r.done() for r in requests)
        results = await asyncio.gather(*requests)
    assert [status for status, _ in results] == [200] * 10
    assert all(body["success"] for _, body in results)
    assert await asyncio.to_thread(proxy.wait, grace) == 0
    assert '"request.crashed"' not in proxy.log_text()


async def _lock_key_appears(client: aioredis.Redis, key: str) -> None:
    for _ in range(500):
        if await client.exists(key):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} never appeared")


@pytest.mark.parametrize(
    ("grace", "saved"),
    [
        pytest.param("10", True, id="refresh-finishes-within-grace"),
        pytest.param("0.5", False, id="refresh-cut-short-by-grace"),
    ],
)
async def test_sigterm_releases_the_refresh_lock_at_once(
    fake_cloudbeds: Any,
    tmp_path: Path,
    processes: list[ProxyProcess],
    private_redis: RedisServer,
    key_prefix: str,
    grace: str,
    saved: bool,
) -> None:
    fake, fake_url = fake_cloudbeds
    fake.token_delay = 3.0  # the start-up refresh holds the lock this long
    env = {
        **fake_env(fake_url),
        "CBPROXY_REDIS_URL": private_redis.url,
        "CBPROXY_REDIS_PREFIX": key_prefix,
        "CBPROXY_SHUTDOWN_GRACE": grace,
        "CBPROXY_LOCK_TTL": "60",
    }
    lock_key = f"{key_prefix}:{{cred:default}}:lock"
    proxy = ProxyProcess(env, tmp_path / "proxy.log")
    processes.append(proxy)
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await asyncio.to_thread(proxy.start)
        await _lock_key_appears(client, lock_key)
        # The lock is taken before the call: wait (bounded) for the call itself to arrive.
        for _ in range(500):
            if fake.token_calls["refresh_token"]:
                break
            await asyncio.sleep(0.01)
        assert fake.token_calls["refresh_token"] == 1
        proxy.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.wait, 20) == 0
        # Gone now, not in 60 s when its TTL would have freed it.
        assert await client.exists(lock_key) == 0
        record = await client.hget(f"{key_prefix}:{{conns}}:rec:default", "data")
        assert record is not None
        # Let through, the refresh that was under way is stored (generation 2);
        # cut short, only the seed (generation 1) is.
        assert (b'"generation":2' in record) is saved
    finally:
        await client.aclose()
    assert fake.token_calls["refresh_token"] == 1
