"""What the proxy adds to a request: latency and throughput against a direct baseline.

Starts the fake Cloudbeds and a proxy (`serve`, rate limiter off, optionally with Redis) as
real processes, then measures, in the same run:
- sequential GET /getHotels: median and p99 latency, direct to the fake vs through the proxy;
- concurrent requests: requests per second, direct vs through the proxy.

    .venv/bin/python bench/overhead.py [--requests 2000] [--concurrency 32] [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import ProxyProcess, fake_env, free_port


def start_fake(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "fake-cloudbeds", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/state", timeout=1)
            return process
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("fake Cloudbeds did not start")


async def sequential(url: str, n: int, headers: dict[str, str]) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # warm the pools
            async with session.get(url, headers=headers) as response:
                await response.read()
        for _ in range(n):
            started = time.perf_counter()
            async with session.get(url, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            times.append(time.perf_counter() - started)
    return times


async def concurrent(url: str, n: int, concurrency: int, headers: dict[str, str]) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        remaining = n

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def redis_commands(url: str | None) -> int:
    """Commands the Redis server has processed so far (0 without Redis)."""
    if url is None:
        return 0
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis", default=None, help="redis URL for the proxy's store")
    args = parser.parse_args()

    fake_port = free_port()
    fake = start_fake(fake_port)
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = {**fake_env(fake_url), "CBPROXY_LOG_FORMAT": "json"}
    if args.redis:
        env |= {"CBPROXY_REDIS_URL": args.redis, "CBPROXY_REDIS_PREFIX": f"bench{os.getpid()}"}
    log = Path(f"/tmp/cbproxy-bench-{os.getpid()}.log")
    proxy = ProxyProcess(env, log).start()
    try:
        path = "/api/v1.3/getHotels"
        direct_headers = {"x-api-key": FakeCloudbeds().api_key}
        direct = await sequential(fake_url + path, args.requests, direct_headers)
        commands_before = redis_commands(args.redis)
        via = await sequential(proxy.url + path, args.requests, {})
        commands = redis_commands(args.redis) - commands_before
        direct_rps = await concurrent(
            fake_url + path, args.requests, args.concurrency, direct_headers
        )
        via_rps = await concurrent(proxy.url + path, args.requests, args.concurrency, {})
    finally:
        proxy.stop()
        fake.terminate()
        fake.wait()
    d_med, v_med = statistics.median(direct), statistics.median(via)
    q = statistics.quantiles
    print(f"store: {'redis' if args.redis else 'in-process'}; {args.requests} requests")
    print(
        f"sequential median: direct {ms(d_med)}, via proxy {ms(v_med)}, "
        f"added {ms(v_med - d_med)} (ratio {v_med / d_med:.2f}x)"
    )
    print(
        f"sequential p99:    direct {ms(q(direct, n=100)[98])}, via proxy {ms(q(via, n=100)[98])}"
    )
    if args.redis:
        # Background work (poll, heartbeat) runs a few commands a second; the request
        # path itself adds none: the token is held in memory.
        print(
            f"redis commands during the proxied sequential run: {commands} "
            f"({commands / args.requests:.3f} per request)"
        )
    print(
        f"throughput at {args.concurrency} concurrent: direct {direct_rps:.0f} req/s, "
        f"via proxy {via_rps:.0f} req/s (ratio {via_rps / direct_rps:.2f}x)"
    )


if __name__ == "__main__":
    asyncio.run(main())
