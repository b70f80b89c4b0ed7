"""Whether one connection's flood starves the other connections of its app.

Starts, as processes on 127.0.0.1 (the same way as `bench/connections.py`): the fake
Cloudbeds, a private `redis-server`, and `--replicas` replicas of `serve` sharing one
`[apps.bench]` table (`--rate`, `--burst`, `--token-share`). Imports `--paced + 1`
connections through the admin API, measures an unloaded baseline latency, then for
`--duration` seconds:
- connection 0 floods: `--flood` requests in flight at all times (a refused one waits
  `--flood-backoff` seconds before it is sent again), spread over the replicas;
- each of the `--paced` other connections sends `--paced-rate` requests per second, at
  random phases, to a random replica.

It prints, for the paced connections, the 429s and the p50/p99/max added delay (latency
minus the baseline p50); for the flood, its admitted rate and its 429s; and the app's
busiest sliding second of upstream calls as the fake counts them (requests and token
calls, over the whole run) against rate + burst, with the busiest second of token calls
alone against their share. Tokens live `--lifetime` seconds, so connections refresh during
the load and token calls compete with it.

    .venv/bin/python bench/fairness.py [--replicas 3] [--rate 10 --burst 10]
        [--token-share 0.2] [--flood 50] [--paced 10 --paced-rate 0.3] [--duration 40]

Every process it started is stopped on the way out (Ctrl-C and errors included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.connections import (
    APP,
    CLIENT_ID,
    CLIENT_SECRET,
    HOTELS,
    REDIRECT_URI,
    Processes,
    connection_of,
    fake_state,
    import_connections,
    poll_until,
    refresh_calls,
    register_tokens,
    replica_env,
    run_fleet,
    start_replica,
)
from tests.support import ProxyProcess

PROXY_ERROR = "X-Cloudbeds-Proxy-Error"
TIMEOUT = aiohttp.ClientTimeout(total=30)


def write_config(workdir: Path, args: argparse.Namespace) -> Path:
    path = workdir / "proxy.toml"
    path.write_text(
        f"[apps.{APP}]\n"
        f'client_id = "{CLIENT_ID}"\nclient_secret = "{CLIENT_SECRET}"\n'
        f'redirect_uri = "{REDIRECT_URI}"\n'
        f"rate_limit = {args.rate}\nrate_burst = {args.burst}\n"
        + (f"token_share = {args.token_share}\n" if args.token_share is not None else "")
    )
    return path


class Tally:
    """Outcomes of one group of requests: latencies of the 2xx, counts by status."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: collections.Counter[str] = collections.Counter()

    @property
    def limited(self) -> int:
        return self.statuses["429 rate_limited"]


async def one(
    session: aiohttp.ClientSession, proc: ProxyProcess, i: int, tally: Tally
) -> str | None:
    """One routed request; its outcome goes to `tally`; the proxy's error code, if any."""
    headers = {"X-Cloudbeds-Connection": connection_of(i)}
    started = time.perf_counter()
    try:
        async with session.get(proc.url + HOTELS, headers=headers) as response:
            await response.read()
            code = response.headers.get(PROXY_ERROR)
            status = f"{response.status} {code}" if code else str(response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.statuses[type(exc).__name__] += 1
        return "error"
    tally.statuses[status] += 1
    if 200 <= response.status < 300:
        tally.latencies.append(time.perf_counter() - started)
    return code


async def baseline(
    session: aiohttp.ClientSession, replicas: list[ProxyProcess], paced: int
) -> float:
    """The unloaded latency, p50 of paced requests over every replica and connection."""
    tally = Tally()
    for k in range(40):
        await one(session, replicas[k % len(replicas)], 1 + k % paced, tally)
        await asyncio.sleep(0.15)  # well under the budget: no wait in the limiter
    return statistics.median(tally.latencies)


async def flood(
    session: aiohttp.ClientSession,
    replicas: list[ProxyProcess],
    stop: float,
    backoff: float,
    tally: Tally,
) -> None:
    """One of the flood's in-flight slots: connection 0, request after request."""
    k = random.randrange(len(replicas))
    while time.monotonic() < stop:
        k += 1
        code = await one(session, replicas[k % len(replicas)], 0, tally)
        if code is not None:
            await asyncio.sleep(backoff)


async def paced(
    session: aiohttp.ClientSession,
    replicas: list[ProxyProcess],
    i: int,
    rate: float,
    stop: float,
    tally: Tally,
) -> None:
    """Connection `i` at `rate` requests per second, from a random phase."""
    await asyncio.sleep(random.uniform(0, 1 / rate))
    while time.monotonic() < stop:
        tick = time.monotonic()
        await one(session, random.choice(replicas), i, tally)
        await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - tick)))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def line(label: str, text: str) -> None:
    print(f"{label:<44} {text}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--token-share", type=float, help="default: the app's default")
    parser.add_argument("--flood", type=int, default=50, help="the flood's requests in flight")
    parser.add_argument("--flood-backoff", type=float, default=0.05)
    parser.add_argument("--paced", type=int, default=10, help="paced connections")
    parser.add_argument("--paced-rate", type=float, default=0.3, help="requests/s each")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--lifetime", type=int, default=30, help="token lifetime, seconds")
    parser.add_argument("--leeway", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    return parser.parse_args()


async def run(args: argparse.Namespace, procs: Processes) -> None:
    n = args.paced + 1
    share = "default" if args.token_share is None else f"{args.token_share:g}"
    print(
        f"{args.replicas} replicas, app {args.rate:g}/s burst {args.burst} token share "
        f"{share}; flood {args.flood} in flight on 1 connection, {args.paced} "
        f"paced at {args.paced_rate:g}/s, {args.duration:g} s; logs in {procs.workdir}",
        flush=True,
    )
    fake_url = procs.start_fake(args.lifetime)
    redis_url = procs.start_redis()
    env = {**replica_env(fake_url, redis_url, args.leeway), "CBPROXY_LOG_FORMAT": "json"}
    config = write_config(procs.workdir, args)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        await register_tokens(session, fake_url, n)
        replicas = [procs.new_replica(env, config) for _ in range(args.replicas)]
        await asyncio.gather(*(start_replica(session, p, None, args.timeout) for p in replicas))
        imported = await import_connections(session, replicas, n, 4)
        line("import", f"statuses {dict(imported['statuses'])}")

        async def all_tokens() -> bool:
            return refresh_calls(await fake_state(session, fake_url)) >= n

        await poll_until(all_tokens, args.timeout, interval=0.2)
        base = await baseline(session, replicas, args.paced)
        line("unloaded latency (p50)", f"{base * 1000:.1f} ms")
        before = await fake_state(session, fake_url)

        stop = time.monotonic() + args.duration
        flooded, steady = Tally(), Tally()
        await asyncio.gather(
            *(
                flood(session, replicas, stop, args.flood_backoff, flooded)
                for _ in range(args.flood)
            ),
            *(
                paced(session, replicas, 1 + i, args.paced_rate, stop, steady)
                for i in range(args.paced)
            ),
        )
        after = await fake_state(session, fake_url)
        report(args, base, flooded, steady, before, after)


def report(
    args: argparse.Namespace,
    base: float,
    flooded: Tally,
    steady: Tally,
    before: dict[str, Any],
    after: dict[str, Any],
) -> None:
    added = [max(0.0, latency - base) for latency in steady.latencies]
    sent = sum(steady.statuses.values())
    line("paced: requests, 429s", f"{sent}, {steady.limited}")
    line("paced: statuses", str(dict(steady.statuses)))
    if added:
        line(
            "paced: added delay p50 / p99 / max",
            f"{pct(added, 50) * 1000:.0f} / {pct(added, 99) * 1000:.0f} / "
            f"{max(added) * 1000:.0f} ms",
        )
    ok = len(flooded.latencies)
    line(
        "flood: admitted rate, 429s",
        f"{ok / args.duration:.2f}/s ({ok} in {args.duration:g} s), {flooded.limited}",
    )
    line("flood: statuses", str(dict(flooded.statuses)))
    token_calls = refresh_calls(after) - refresh_calls(before)
    line("token calls during the load", str(token_calls))
    busiest = after["max_in_window"].get(CLIENT_ID, 0)
    line(
        "app's busiest sliding second (fake), whole run",
        f"{busiest} (rate + burst = {args.rate + args.burst:g})",
    )
    tokens = after.get("max_token_calls_in_window", {}).get(CLIENT_ID, 0)
    line("busiest second of token calls alone", str(tokens))


def main() -> None:
    run_fleet(run, parse_args(), "fairness")


if __name__ == "__main__":
    main()
