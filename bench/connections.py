"""What a partner's fleet costs as its number of connections grows.

Starts, as processes on 127.0.0.1: the fake Cloudbeds (`--expires-in` = the token
lifetime) with one app, a private `redis-server`, and `--replicas` replicas of `serve`
sharing it with an `[apps.bench]` table. Imports `--connections` connections (one property
each) through the admin API, concurrently and bounded, then reports:
- time to ready and to route the last imported connection, on every replica (and, at the
  end, for one replica restarted with every connection already in Redis, also the time
  until its background load is done, from `/_proxy/status`);
- RSS per replica after the import and at the end;
- idle Redis commands per second by command, and idle CPU per replica, while the
  connections are imported but not yet used (a connection nobody uses is not refreshed);
- then the first use: one request per connection (connection i on replica i % replicas),
  each waiting for its connection's first token call; from then on the connections are in
  use for the run (`--idle-after`) and refreshed ahead by the replica that used them;
- token calls per connection per refresh cycle (lifetime - leeway) over `--duration`,
  duplicate calls for one generation, the busiest second of token calls over the mean
  from the end of the first use (right after it, every connection's token is new);
- `/_proxy/metrics` size and scrape time, `/_proxy/readyz` and `/_proxy/status` times;
- p50/p99 latency of routed requests (a paced loop over random connections).

    .venv/bin/python bench/connections.py --connections 1000 [--replicas 3]
        [--lifetime 120 --leeway 30] [--duration 300] [--rate-limit 5 --rate-burst 5]

Every wait is bounded; every process it started is stopped on the way out (Ctrl-C and
errors included). Token calls are counted twice: by the fake (`token_calls_by_client`,
`per_second_by_client`) and from the replicas' `token.refresh.started` log lines, which
name the connection and the generation a call refreshes (two calls for one generation
are a duplicate: the refresh token is the same, as the fake does not rotate it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.redis_server import RedisServer
from tests.support import ProxyProcess, free_port

APP, CLIENT_ID, CLIENT_SECRET = "bench", "bench-client", "bench-secret"
REDIRECT_URI = "https://partner.example/bench/callback"
ADMIN_TOKEN = "bench-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOTELS = "/api/v1.3/getHotels"
FIRST_PROPERTY = 300_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
TIMEOUT = aiohttp.ClientTimeout(total=30)


def property_of(i: int) -> str:
    return str(FIRST_PROPERTY + i)


def connection_of(i: int) -> str:
    return f"{APP}.property.{property_of(i)}"


# --- processes -----------------------------------------------------------------------


class Processes:
    """Everything this run started, stopped in reverse order by `stop()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.fake: subprocess.Popen[bytes] | None = None
        self.redis: RedisServer | None = None
        self.replicas: list[ProxyProcess] = []

    def start_fake(self, lifetime: int) -> str:
        port = free_port()
        log = (self.workdir / "fake.log").open("ab")
        self.fake = subprocess.Popen(
            [sys.executable, "-m", "proxy", "fake-cloudbeds", "--port", str(port),
             "--expires-in", str(lifetime)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/_fake/state", timeout=1)
                return url
            time.sleep(0.1)
        raise RuntimeError("fake Cloudbeds did not start")

    def start_redis(self) -> str:
        self.redis = RedisServer()
        self.redis.start()
        return self.redis.url

    def new_replica(self, env: dict[str, str], config: Path) -> ProxyProcess:
        index = len(self.replicas)
        proc = ProxyProcess(
            env, self.workdir / f"replica-{index}.log", args=("--config", str(config))
        )
        self.replicas.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.replicas:
            with contextlib.suppress(Exception):
                proc.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.fake is not None and self.fake.poll() is None:
            self.fake.terminate()
            try:
                self.fake.wait(10)
            except subprocess.TimeoutExpired:
                self.fake.kill()
                self.fake.wait()


def pid_of(proc: ProxyProcess) -> int | None:
    alive = proc.process is not None and proc.process.poll() is None
    return proc.process.pid if alive and proc.process is not None else None


def rss_mb(pid: int | None) -> float | None:
    """VmRSS of a live process, in MiB."""
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a live process, in seconds."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def replica_env(
    fake_url: str, redis_url: str, leeway: float, idle_after: float | None = None
) -> dict[str, str]:
    """A replica's environment; `idle_after` sets CBPROXY_REFRESH_IDLE_AFTER (else its
    default, one token lifetime)."""
    env = {
        "CBPROXY_UPSTREAM_URL": fake_url,
        "CBPROXY_TOKEN_URL": f"{fake_url}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{fake_url}/api/v1.3/oauth",
        "CBPROXY_REDIS_URL": redis_url,
        "CBPROXY_REDIS_PREFIX": "bench",
        "CBPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "CBPROXY_REFRESH_LEEWAY": str(leeway),
        "CBPROXY_SHUTDOWN_GRACE": "2",
        "CBPROXY_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    if idle_after is not None:
        env["CBPROXY_REFRESH_IDLE_AFTER"] = str(idle_after)
    return env


def write_config(workdir: Path, rate_limit: float, rate_burst: int) -> Path:
    path = workdir / "proxy.toml"
    path.write_text(
        f"[apps.{APP}]\n"
        f'client_id = "{CLIENT_ID}"\nclient_secret = "{CLIENT_SECRET}"\n'
        f'redirect_uri = "{REDIRECT_URI}"\n'
        f"rate_limit = {rate_limit}\nrate_burst = {rate_burst}\n"
    )
    return path


# --- HTTP helpers --------------------------------------------------------------------


async def bounded(jobs: Iterable[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    """Run the jobs with at most `concurrency` in flight."""
    queue = collections.deque(jobs)

    async def worker() -> None:
        while queue:
            await queue.popleft()()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def fake_control(session: aiohttp.ClientSession, fake_url: str, body: Any) -> None:
    async with session.post(f"{fake_url}/_fake/control", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"fake control {body}: {response.status} {await response.text()}")
        await response.read()


async def fake_state(session: aiohttp.ClientSession, fake_url: str) -> dict[str, Any]:
    async with session.get(f"{fake_url}/_fake/state") as response:
        return dict(await response.json())


def refresh_calls(state: dict[str, Any]) -> int:
    return int(state["token_calls_by_client"].get(CLIENT_ID, {}).get("refresh_token", 0))


async def poll_until(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> float | None:
    """Seconds until `check()` is true, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            if await check():
                return time.monotonic() - started
        await asyncio.sleep(interval)
    return None


def status_is(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Callable:
    async def check() -> bool:
        async with session.get(url, headers=headers) as response:
            await response.read()
            return response.status == 200

    return check


async def routes(session: aiohttp.ClientSession, proc: ProxyProcess, i: int, timeout: float):
    """Seconds until `proc` serves a request routed to connection `i` (None: never)."""
    check = status_is(session, proc.url + HOTELS, {"X-Cloudbeds-Connection": connection_of(i)})
    return await poll_until(check, timeout)


async def holds_all(
    session: aiohttp.ClientSession, proc: ProxyProcess, n: int, timeout: float
) -> float | None:
    """Seconds until `proc`'s readyz counts `n` connections of the app (None: never)."""

    async def check() -> bool:
        async with session.get(proc.url + "/_proxy/readyz") as response:
            counts = (await response.json()).get("connections", {}).get(APP, {})
            return sum(counts.values()) >= n

    return await poll_until(check, timeout, interval=0.5)


def quiet_redis(client: redis.Redis, timeout: float) -> float | None:
    """Seconds until Redis serves fewer than 20 commands in a second: the replicas have
    caught up with the change feed (None: not within `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = int(client.info("stats")["total_commands_processed"])
        time.sleep(1.0)
        if int(client.info("stats")["total_commands_processed"]) - before < 20:
            return time.monotonic() - started
    return None


async def loaded(session: aiohttp.ClientSession, proc: ProxyProcess, timeout: float):
    """Seconds until `proc`'s background load of the stored connections is done (None:
    never, or a replica without `/_proxy/status`)."""

    async def check() -> bool:
        async with session.get(proc.url + "/_proxy/status") as response:
            if response.status != 200:
                return False
            return (await response.json()).get("load", {}).get("state") == "done"

    return await poll_until(check, timeout, interval=0.05)


async def start_replica(
    session: aiohttp.ClientSession, proc: ProxyProcess, last: int | None, timeout: float
) -> dict[str, Any]:
    """Start one replica: seconds to readyz 200, (given `last`) to routing it, and to the
    end of its background load."""
    started = time.monotonic()
    await asyncio.to_thread(proc.start, timeout)
    ready = await poll_until(status_is(session, proc.url + "/_proxy/readyz", {}), timeout)
    out: dict[str, Any] = {"ready": None if ready is None else time.monotonic() - started}
    if last is not None:
        routed = await routes(session, proc, last, timeout)
        out["routed"] = None if routed is None else time.monotonic() - started
        done = await loaded(session, proc, timeout)
        out["loaded"] = None if done is None else time.monotonic() - started
    return out


# --- phases --------------------------------------------------------------------------


async def register_tokens(session: aiohttp.ClientSession, fake_url: str, n: int) -> None:
    """The app and one refresh token per connection (one property each) in the fake."""
    app = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uri": REDIRECT_URI}
    await fake_control(session, fake_url, {"add_app": app})

    def job(i: int) -> Callable[[], Awaitable[None]]:
        token = {"token": f"bench-rt-{i}", "client_id": CLIENT_ID, "properties": [property_of(i)]}
        return lambda: fake_control(session, fake_url, {"add_refresh_token": token})

    await bounded((job(i) for i in range(n)), 16)


async def import_connections(
    session: aiohttp.ClientSession, replicas: list[ProxyProcess], n: int, concurrency: int
) -> dict[str, Any]:
    """PUT every connection, round robin over the replicas; statuses and latencies."""
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []

    def job(i: int) -> Callable[[], Awaitable[None]]:
        async def put() -> None:
            url = f"{replicas[i % len(replicas)].url}/_proxy/admin/connections/{connection_of(i)}"
            body = {"app": APP, "refresh_token": f"bench-rt-{i}", "properties": [property_of(i)]}
            started = time.perf_counter()
            try:
                async with session.put(url, json=body, headers=ADMIN) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - started)

        return put

    started = time.monotonic()
    await bounded((job(i) for i in range(n)), concurrency)
    return {"seconds": time.monotonic() - started, "statuses": statuses, "latencies": latencies}


async def first_use(
    session: aiohttp.ClientSession, replicas: list[ProxyProcess], n: int, concurrency: int
) -> dict[str, Any]:
    """One request per connection, connection i on replica i % replicas: a connection
    nobody used has no token yet, so each request waits for its connection's first token
    call, and from then on that replica refreshes it ahead (it is in use there)."""
    statuses: collections.Counter[str] = collections.Counter()

    def job(i: int) -> Callable[[], Awaitable[None]]:
        async def get() -> None:
            proc = replicas[i % len(replicas)]
            headers = {"X-Cloudbeds-Connection": connection_of(i)}
            try:
                async with session.get(proc.url + HOTELS, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1

        return get

    started = time.monotonic()
    await bounded((job(i) for i in range(n)), concurrency)
    return {"seconds": time.monotonic() - started, "statuses": statuses}


def command_stats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def idle_window(
    session: aiohttp.ClientSession,
    fake_url: str,
    client: redis.Redis,
    replicas: list[ProxyProcess],
    seconds: float,
) -> dict[str, Any]:
    """Redis commands by command and CPU per replica over a window with no traffic."""
    pids = [pid_of(p) for p in replicas]
    cpu_before = [cpu_seconds(pid) for pid in pids]
    calls_before = refresh_calls(await fake_state(session, fake_url))
    commands_before = command_stats(client)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    commands_after = command_stats(client)
    elapsed = time.monotonic() - started
    cpu_after = [cpu_seconds(pid) for pid in pids]
    calls = refresh_calls(await fake_state(session, fake_url)) - calls_before
    per_command = {
        name: (count - commands_before.get(name, 0)) / elapsed
        for name, count in commands_after.items()
        if name != "info" and count > commands_before.get(name, 0)  # INFO: this benchmark's
    }
    cpu = [
        None if a is None or b is None else 100 * (a - b) / elapsed
        for a, b in zip(cpu_after, cpu_before, strict=True)
    ]
    return {"seconds": elapsed, "commands": per_command, "cpu": cpu, "token_calls": calls}


async def scrape_metrics(session: aiohttp.ClientSession, proc: ProxyProcess) -> dict[str, Any]:
    started = time.perf_counter()
    async with session.get(f"{proc.url}/_proxy/metrics") as response:
        body = await response.read()
    seconds = time.perf_counter() - started
    lines = body.decode(errors="replace").splitlines()
    series = sum(1 for line in lines if line and not line.startswith("#"))
    started = time.perf_counter()
    async with session.get(f"{proc.url}/_proxy/readyz") as response:
        await response.read()
    ready = time.perf_counter() - started
    started = time.perf_counter()
    async with session.get(f"{proc.url}/_proxy/status") as response:
        status = len(await response.read())
    status_seconds = time.perf_counter() - started
    return {
        "bytes": len(body),
        "seconds": seconds,
        "series": series,
        "readyz": ready,
        "status": status_seconds,
        "status_bytes": status,
    }


async def latency_loop(
    session: aiohttp.ClientSession,
    replicas: list[ProxyProcess],
    n: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Requests at `rate` per second to random connections on random replicas, routed by
    `X-PROPERTY-ID` or `X-Cloudbeds-Connection` in turn; latencies of the 200s."""
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    in_flight: set[asyncio.Task[None]] = set()
    limit = asyncio.Semaphore(64)

    async def one(k: int) -> None:
        i = random.randrange(n)
        proc = random.choice(replicas)
        headers = (
            {"X-PROPERTY-ID": property_of(i)}
            if k % 2
            else {"X-Cloudbeds-Connection": connection_of(i)}
        )
        async with limit:
            started = time.perf_counter()
            try:
                async with session.get(proc.url + HOTELS, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
                    if response.status == 200:
                        latencies.append(time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1

    started = time.monotonic()
    for k in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, started + k / rate - time.monotonic()))
        task = asyncio.create_task(one(k))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=35)
    return {"latencies": latencies, "statuses": statuses}


def refresh_log(replicas: list[ProxyProcess]) -> list[tuple[float, str, int]]:
    """(time, connection, generation) of every `token.refresh.started` in the replicas' logs."""
    found = []
    for proc in replicas:
        with contextlib.suppress(OSError):
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if '"token.refresh.started"' not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError):
                    entry = json.loads(line)
                    when = datetime.fromisoformat(entry["timestamp"]).timestamp()
                    found.append((when, entry["credential"], int(entry["generation"])))
    return sorted(found)


def warnings_logged(replicas: list[ProxyProcess]) -> collections.Counter[str]:
    """Warning and error events in the replicas' logs, by event name."""
    found: collections.Counter[str] = collections.Counter()
    for proc in replicas:
        with contextlib.suppress(OSError):
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if '"level": "warning"' in line or '"level": "error"' in line:
                    with contextlib.suppress(ValueError, KeyError):
                        found[json.loads(line)["event"]] += 1
    return found


def token_figures(
    calls: list[tuple[float, str, int]], cycle: float, since: float
) -> dict[str, Any]:
    """Duplicates per generation; refresh interval per connection; calls per refresh cycle
    (a token's lifetime less the leeway: the most a token can serve before its refresh)."""
    per_generation = collections.Counter((name, gen) for _, name, gen in calls)
    duplicates = sum(count - 1 for count in per_generation.values())
    by_connection: dict[str, list[float]] = collections.defaultdict(list)
    for when, name, _ in calls:
        by_connection[name].append(when)
    intervals = [b - a for times in by_connection.values() for a, b in itertools.pairwise(times)]
    # After a connection's first two refreshes it is on its place of the fleet's grid: the
    # intervals from then on are the steady state (the first one aligns it, once).
    steady = [b - a for times in by_connection.values() for a, b in itertools.pairwise(times[1:])]
    refreshed = sum(1 for times in by_connection.values() if any(t > since for t in times))
    mean = statistics.mean(intervals) if intervals else None
    steady_mean = statistics.mean(steady) if steady else None
    return {
        "logged": len(calls),
        "duplicates": duplicates,
        "connections_refreshed": refreshed,
        "mean_interval": mean,
        "per_cycle": None if not mean else cycle / mean,
        "steady_per_cycle": None if not steady_mean else cycle / steady_mean,
    }


def busiest_refresh_second(
    calls: list[tuple[float, str, int]], since: float, until: float
) -> dict[str, Any] | None:
    """The busiest second of logged token calls in [since, until) over the window's mean."""
    seconds = collections.Counter(int(when) for when, _, _ in calls if since <= when < until)
    span = int(until) - int(since)
    if not seconds or span <= 0:
        return None
    mean = sum(seconds.values()) / span
    peak = max(seconds.values())
    return {"calls": sum(seconds.values()), "span": span, "peak": peak, "ratio": peak / mean}


# --- report --------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def secs(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"


def mib(values: Iterable[float | None]) -> str:
    return ", ".join("dead" if v is None else f"{v:.0f}" for v in values) + " MiB"


def pct(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def line(label: str, text: str) -> None:
    print(f"{label:<38} {text}", flush=True)


# --- main ----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--lifetime", type=int, default=120, help="access token lifetime, s")
    parser.add_argument("--leeway", type=float, default=30, help="CBPROXY_REFRESH_LEEWAY, s")
    parser.add_argument(
        "--duration", type=float, default=300, help="seconds the fleet runs after the first use"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=10_000,
        help="the app's budget per second; 5 (with --rate-burst 5) is the default budget",
    )
    parser.add_argument("--rate-burst", type=int, default=10_000)
    parser.add_argument("--import-concurrency", type=int, default=16)
    parser.add_argument("--idle", type=float, default=20, help="idle window, s")
    parser.add_argument(
        "--idle-after",
        type=float,
        default=0,
        help="CBPROXY_REFRESH_IDLE_AFTER (default: the run's length plus an hour, so a "
        "connection used once is in use for the whole run)",
    )
    parser.add_argument("--rate", type=float, default=50, help="routed requests per second")
    parser.add_argument("--latency-seconds", type=float, default=10)
    parser.add_argument("--timeout", type=float, default=120, help="bound on each wait, s")
    parser.add_argument("--no-restart", action="store_true", help="skip the restart at the end")
    return parser.parse_args()


async def run(args: argparse.Namespace, procs: Processes) -> None:
    n, lifetime = args.connections, args.lifetime
    print(
        f"{n} connections, {args.replicas} replicas, lifetime {lifetime} s, leeway "
        f"{args.leeway} s, budget {args.rate_limit}/s burst {args.rate_burst}, logs in "
        f"{procs.workdir}",
        flush=True,
    )
    fake_url = procs.start_fake(lifetime)
    redis_url = procs.start_redis()
    client = redis.Redis.from_url(redis_url)
    idle_after = args.idle_after or args.duration + 3600  # used once: in use for the run
    env = replica_env(fake_url, redis_url, args.leeway, idle_after)
    config = write_config(procs.workdir, args.rate_limit, args.rate_burst)
    async with aiohttp.ClientSession(
        timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=128)
    ) as session:
        await register_tokens(session, fake_url, n)
        replicas = [procs.new_replica(env, config) for _ in range(args.replicas)]
        started = await asyncio.gather(
            *(start_replica(session, p, None, args.timeout) for p in replicas)
        )
        line("ready after start (empty store)", ", ".join(secs(s["ready"]) for s in started))

        imported = await import_connections(session, replicas, n, args.import_concurrency)
        import_end = time.monotonic()
        lat = imported["latencies"]
        line(
            "import",
            f"{imported['seconds']:.1f} s ({n / imported['seconds']:.0f}/s at "
            f"{args.import_concurrency} concurrent), PUT p50 {ms(pct(lat, 50))} p99 "
            f"{ms(pct(lat, 99))}, statuses {dict(imported['statuses'])}",
        )
        routed = await asyncio.gather(*(routes(session, p, n - 1, args.timeout) for p in replicas))
        line("last connection routed, after import", ", ".join(secs(s) for s in routed))

        offset = time.monotonic() - import_end
        held = await asyncio.gather(*(holds_all(session, p, n, args.timeout) for p in replicas))
        line(
            "every connection held, after import",
            ", ".join(secs(None if s is None else s + offset) for s in held),
        )
        quiet = await asyncio.to_thread(quiet_redis, client, args.timeout)
        line("redis quiet (< 20 commands/s)", f"{secs(quiet)} after that")
        line("RSS after import", mib(rss_mb(pid_of(p)) for p in replicas))
        info = client.info("memory")
        line("redis used_memory", f"{int(info['used_memory']) / 2**20:.1f} MiB")

        idle = await idle_window(session, fake_url, client, replicas, args.idle)
        total = sum(idle["commands"].values())
        top = sorted(idle["commands"].items(), key=lambda kv: -kv[1])
        line(
            f"idle redis commands ({idle['seconds']:.0f} s)",
            f"{total:.1f}/s: " + ", ".join(f"{k} {v:.1f}" for k, v in top[:8]),
        )
        line(
            "idle CPU per replica",
            ", ".join("dead" if c is None else f"{c:.1f}%" for c in idle["cpu"]),
        )
        line("token calls in the idle window", f"{idle['token_calls']} (nothing is in use)")

        scrapes = [await scrape_metrics(session, p) for p in replicas if pid_of(p)]
        line(
            "metrics scrape",
            ", ".join(
                f"{s['bytes'] / 1024:.1f} KiB {s['series']} series {ms(s['seconds'])}"
                for s in scrapes
            ),
        )
        line("readyz answer time", ", ".join(ms(s["readyz"]) for s in scrapes))
        line(
            "status answer time",
            ", ".join(f"{ms(s['status'])} ({s['status_bytes']} B)" for s in scrapes),
        )

        calls_before = refresh_calls(await fake_state(session, fake_url))
        used = await first_use(session, replicas, n, args.import_concurrency)
        use_end, use_end_wall = time.monotonic(), time.time()
        calls_made = refresh_calls(await fake_state(session, fake_url)) - calls_before
        line(
            "first use (one request each)",
            f"{used['seconds']:.1f} s, {calls_made} token calls, statuses {dict(used['statuses'])}",
        )
        loop = await latency_loop(session, replicas, n, args.rate, args.latency_seconds)
        lat = loop["latencies"]
        line(
            f"routed requests ({args.rate:.0f}/s)",
            f"p50 {ms(pct(lat, 50))} p99 {ms(pct(lat, 99))}, statuses {dict(loop['statuses'])}",
        )

        remaining = use_end + args.duration - time.monotonic()
        while remaining > 0 and any(pid_of(p) for p in replicas):
            await asyncio.sleep(min(5.0, remaining))
            remaining = use_end + args.duration - time.monotonic()
        end_wall = time.time()
        line("RSS at the end", mib(rss_mb(pid_of(p)) for p in replicas))
        state = await fake_state(session, fake_url)
        calls = refresh_log(replicas)
        cycle = lifetime - min(args.leeway, lifetime / 2)
        figures = token_figures(calls, cycle, use_end_wall)
        line(
            "token calls (fake / logged)",
            f"{refresh_calls(state)} / {figures['logged']}, {figures['connections_refreshed']} "
            f"connections refreshed after the first use",
        )
        per = figures["per_cycle"]
        line(
            "token calls per connection per cycle",
            ("-" if per is None else f"{per:.3f}") + f" (cycle = lifetime - leeway = {cycle:g} s;"
            f" mean interval {secs(figures['mean_interval'])}; per lifetime "
            + ("-" if per is None else f"{per * lifetime / cycle:.2f}")
            + ")",
        )
        steady = figures["steady_per_cycle"]
        line(
            "  once on the grid (steady state)",
            "-"
            if steady is None
            else f"{steady:.3f} per cycle, {steady * lifetime / cycle:.2f} per lifetime",
        )
        line("duplicate calls for a generation", str(figures["duplicates"]))
        warned = warnings_logged(replicas).most_common(8)
        line("warnings logged", ", ".join(f"{k} {v}" for k, v in warned) or "none")
        peak = busiest_refresh_second(calls, use_end_wall + 1, end_wall - 1)
        line(
            "busiest second / mean (token calls)",
            "no refresh in the window"
            if peak is None
            else f"{peak['ratio']:.2f}x ({peak['peak']} in a second, {peak['calls']} calls over "
            f"{peak['span']} s from the end of the first use); the fake's busiest sliding "
            f"second of token calls {state['max_token_calls_in_window'].get(CLIENT_ID)}",
        )
        if not args.no_restart and pid_of(replicas[0]):
            await asyncio.to_thread(replicas[0].stop)
            again = procs.new_replica(env, config)
            before = command_stats(client)
            result = await start_replica(session, again, n - 1, args.timeout)
            after = command_stats(client)
            # Includes the two other replicas' idle commands over those seconds (a few a second).
            started_commands = {k: v - before.get(k, 0) for k, v in after.items() if k != "info"}
            top = sorted(started_commands.items(), key=lambda kv: -kv[1])
            line(
                "restarted replica (N in redis)",
                f"ready {secs(result['ready'])}, last connection routed {secs(result['routed'])}, "
                f"all loaded {secs(result['loaded'])}, RSS {mib([rss_mb(pid_of(again))])}",
            )
            line(
                "redis commands during the restart",
                ", ".join(f"{k} {v}" for k, v in top[:6] if v),
            )


def run_fleet(
    run: Callable[[argparse.Namespace, Processes], Awaitable[None]],
    args: argparse.Namespace,
    name: str,
) -> None:
    """Run a benchmark of processes: `run(args, procs)`, and every process stopped after."""
    for key in [k for k in os.environ if k.startswith("CBPROXY_")]:
        del os.environ[key]  # the replicas get only what this benchmark gives them
    # Ctrl-C, and SIGTERM too, raise KeyboardInterrupt (even where SIGINT came in ignored,
    # as in a background job): `finally` stops the fleet.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs = Processes(Path(tempfile.mkdtemp(prefix=f"cbproxy-bench-{name}-")))
    try:
        asyncio.run(run(args, procs))
    except KeyboardInterrupt:
        print("interrupted; stopping everything", flush=True)
    finally:
        procs.stop()


def main() -> None:
    run_fleet(run, parse_args(), "connections")


if __name__ == "__main__":
    main()
