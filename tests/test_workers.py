"""`cloudbeds-proxy serve --workers N`: N processes on one port sharing one token."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support import ProxyProcess, fake_env, wait_ready

pytestmark = pytest.mark.slow
HOTELS = "/api/v1.3/getHotels"


async def worker_pids(url: str, want: int, attempts: int = 300) -> set[int]:
    """Ask /_proxy/healthz on fresh connections until `want` processes have answered."""
    pids: set[int] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(attempts):
            async with session.get(f"{url}/_proxy/healthz") as response:
                pids.add((await response.json())["pid"])
            if len(pids) >= want:
                break
    return pids


def parent_of(pid: int) -> int | None:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_share_one_port_and_one_token(
    fake_cloudbeds: Any, real_redis: aioredis.Redis, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    fake, fake_url = fake_cloudbeds
    fake.expires_in = 2  # the leeway is capped at half of it: one refresh a second
    env = {**fake_env(fake_url), "CBPROXY_REDIS_URL": redis_url, "CBPROXY_REDIS_PREFIX": key_prefix}
    proxy = ProxyProcess(env, tmp_path / "proxy.log", args=("--workers", "2"))
    started = time.monotonic()
    await asyncio.to_thread(proxy.start)
    assert proxy.process is not None
    try:
        await wait_ready(proxy.url)
        pids = await worker_pids(proxy.url, 2)
        assert len(pids) == 2, pids
        assert proxy.process.pid not in pids
        if Path("/proc").is_dir():
            assert {parent_of(pid) for pid in pids} == {proxy.process.pid}

        # Four token lifetimes of traffic through the shared port: every answer 200.
        statuses = []
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = asyncio.get_running_loop().time() + 4
            while asyncio.get_running_loop().time() < deadline:
                async with session.get(proxy.url + HOTELS) as response:
                    statuses.append(response.status)
                await asyncio.sleep(0.05)
        assert set(statuses) == {200}, statuses
        assert fake.expired_token_calls == 0
        assert fake.rejected_calls == 0

        proxy.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.wait, 30) == 0
    finally:
        proxy.stop()
    elapsed = time.monotonic() - started
    for pid in pids:
        for _ in range(100):
            if gone(pid):
                break
            await asyncio.sleep(0.05)
        assert gone(pid), f"worker {pid} outlived the supervisor"

    # Each refresh made the next generation: no token was refreshed twice (the seed is
    # generation 1). A refresh comes at most once per 0.8 s (half of 2 s minus jitter).
    raw = await real_redis.hget(f"{key_prefix}:{{conns}}:rec:default", "data")
    assert raw is not None
    generation = json.loads(raw)["generation"]
    calls = fake.token_calls["refresh_token"]
    assert calls == generation - 1, (calls, generation)
    assert 4 <= calls <= elapsed / 0.8 + 1, (calls, elapsed)


@pytest.mark.parametrize(
    ("extra", "args", "names"),
    [
        pytest.param({}, ("--workers", "2"), "CBPROXY_REDIS_URL", id="workers-without-redis"),
        pytest.param(
            {"CBPROXY_REDIS_URL": "redis://127.0.0.1:1/0"},
            ("--workers", "0"),
            "--workers",
            id="zero-workers",
        ),
    ],
)
def test_workers_refused_at_start(
    fake_cloudbeds: Any, extra: dict[str, str], args: tuple[str, ...], names: str
) -> None:
    _, fake_url = fake_cloudbeds
    env = {**os.environ, **fake_env(fake_url), **extra}
    if "CBPROXY_REDIS_URL" not in extra:
        env.pop("CBPROXY_REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    assert names in result.stderr
