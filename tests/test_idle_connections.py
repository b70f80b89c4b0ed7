"""Refresh what is used, end to end: imported connections through real `serve` processes.

The fake Cloudbeds runs in this process on a real port (its counters are read directly);
two proxies share a Redis and are reached only through their HTTP ports. An imported
connection of an app that no request uses costs no token call; its first request makes
exactly one (and waits for it), and the other replica serves the same token. An idle API
key gets its keep-alive call from one replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import ProxyProcess, wait_ready
from tests.test_partner_fleet import (
    ALPHA,
    admin,
    app_table,
    eventually,
    hotels,
    partner_env,
    redis_env,
    register,
    write_config,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

Fake = tuple[FakeCloudbeds, str]
Start = Callable[..., Awaitable[list[ProxyProcess]]]
CONNECTIONS = 20


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Start]:
    started: list[ProxyProcess] = []

    async def start(env: dict[str, str], config: Path, count: int) -> list[ProxyProcess]:
        procs = [
            ProxyProcess(
                env, tmp_path / f"proxy-{len(started) + i}.log", args=("--config", str(config))
            )
            for i in range(count)
        ]
        started.extend(procs)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        for proc in procs:
            await wait_ready(proc.url)
        return procs

    yield start
    await asyncio.gather(*(p.astop() for p in started))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


async def test_an_idle_import_makes_no_token_call_until_a_request_then_one(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    replicas: Start,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    a, b = await replicas(env, config, count=2)
    client = ALPHA[1]
    for n in range(CONNECTIONS):
        prop = str(5000 + n)
        token = f"imported-idle-{n}"
        state.add_refresh_token(token, state.grant(client, properties=[prop]))
        body = {"app": "alpha", "refresh_token": token, "properties": [prop]}
        status, answer = await admin(session, "PUT", a.url, f"alpha.property.{prop}", body)
        assert status == 201, answer

    async def known_to_b() -> bool:
        status, _ = await admin(session, "GET", b.url, f"alpha.property.{5000 + CONNECTIONS - 1}")
        return status == 200

    await eventually(known_to_b, what="the imports reach the other replica")
    await asyncio.sleep(2.0)  # several poll intervals and feed reads: time to misbehave
    assert sum(state.token_calls_by_client[client].values()) == 0

    # The first request waits for the one refresh it needs, and succeeds.
    status, body, error = await hotels(session, a.url, {"X-PROPERTY-ID": "5003"})
    assert (status, error, body.get("success")) == (200, None, True), body
    assert state.token_calls_by_client[client]["refresh_token"] == 1
    # The token is shared: more requests, on either replica, make no further call.
    for proxy in (a, b, a, b):
        status, body, error = await hotels(session, proxy.url, {"X-PROPERTY-ID": "5003"})
        assert (status, error) == (200, None), body
    await asyncio.sleep(1.0)
    assert sum(state.token_calls_by_client[client].values()) == 1
    api_keys_or_tokens = {e["credential"] for e in state.api_log if e["path"].endswith("Hotels")}
    assert len(api_keys_or_tokens) == 1  # one access token served every request


async def test_an_idle_api_key_is_kept_alive_by_one_replica(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    replicas: Start,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    # A 4-second interval: a keep-alive 2 to 4 seconds after the key's last use.
    env = partner_env(
        fake_url,
        config,
        CBPROXY_KEEPALIVE_INTERVAL="4",
        **redis_env(redis_url, key_prefix),
    )
    key = state.mint_api_key(state.grant(ALPHA[1], properties=["5100"]))
    a, _ = await replicas(env, config, count=2)
    body = {"app": "alpha", "api_key": key, "properties": ["5100"]}
    status, answer = await admin(session, "PUT", a.url, "alpha.property.5100", body)
    assert status == 201, answer

    def keepalives() -> list[dict[str, object]]:
        return [e for e in state.api_log if e["path"] == "/api/v1.3/getHotels"]

    async def kept_alive() -> bool:
        return bool(keepalives())

    await eventually(kept_alive, what="a keep-alive call with the idle key")
    first = len(keepalives())
    assert keepalives()[0]["kind"] == "api_key"
    assert keepalives()[0]["status"] == 200
    status, answer = await admin(session, "GET", a.url, "alpha.property.5100")
    assert status == 200
    # Recorded as a use for the fleet (the admin API shows it).
    await eventually(lambda: _last_used(session, a.url), what="last_used_at set")
    await asyncio.sleep(4.0)
    # One interval later: at most one more, whichever replica made it (never one each).
    assert first <= len(keepalives()) <= first + 2
    assert key not in a.log_text()


async def _last_used(session: aiohttp.ClientSession, url: str) -> bool:
    status, answer = await admin(session, "GET", url, "alpha.property.5100")
    return status == 200 and answer["connection"]["last_used_at"] is not None
