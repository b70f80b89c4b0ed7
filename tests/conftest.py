"""Shared fixtures. A real Redis is required where it matters; in CI its absence fails."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from proxy import logs
from proxy.app import create_app
from proxy.clock import FakeClock
from proxy.config import Settings
from proxy.fake_cloudbeds import FakeCloudbeds, create_fake_app
from tests.redis_server import RedisServer
from tests.support import fresh_state_file, serve, wait_ready

DEFAULT_STATE_FILE = Settings(credentials=()).state_file
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
        if settings.state_file == DEFAULT_STATE_FILE:
            # Never the working directory's file: a test sees no other test's records.
            settings = dataclasses.replace(settings, state_file=fresh_state_file())
        runner, url = await serve(create_app(settings, **kwargs))
        runners.append(runner)
        if ready:
            await wait_ready(url)
        return url

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


Clocked = tuple[FakeClock, FakeCloudbeds, str]


@pytest.fixture
async def clocked() -> AsyncIterator[Clocked]:
    """A fake Cloudbeds on a fake clock that the proxy under test shares: (clock, state, url)."""
    clock = FakeClock()
    state = FakeCloudbeds(clock=clock)
    runner, url = await serve(create_fake_app(state))
    yield clock, state, url
    await runner.cleanup()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port, free to stop, kill and restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """structlog and the stdlib root logger configured to a buffer, restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("json", stream=stream)
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
