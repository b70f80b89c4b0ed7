"""Shared fixtures. A real Redis is required where it matters; in CI its absence fails."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.app import create_app
from proxy.config import Settings
from proxy.fake_cloudbeds import FakeCloudbeds, create_fake_app
from tests.support import serve, wait_ready

REDIS_URL = os.environ.get("CBPROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_url() -> str:
    """URL of the machine's real Redis. Skips locally if absent; fails under CI=true."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A key prefix unique to one test, so tests never see each other's keys."""
    return f"cbproxy-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def real_redis(redis_url: str, key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{key_prefix}*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
async def fake_cloudbeds() -> AsyncIterator[tuple[FakeCloudbeds, str]]:
    """The fake Cloudbeds on a real port: (its state, its base URL)."""
    state = FakeCloudbeds()
    runner, url = await serve(create_fake_app(state))
    yield state, url
    await runner.cleanup()


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start the proxy app in this process on a real port; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(settings: Settings, *, ready: bool = True, **kwargs: Any) -> str:
        runner, url = await serve(create_app(settings, **kwargs))
        runners.append(runner)
        if ready:
            await wait_ready(url)
        return url

    yield start
    for runner in reversed(runners):
        await runner.cleanup()
