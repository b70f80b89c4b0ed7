"""The rate limiter: the pure GCRA core, the Lua script on fakeredis, and a real Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ClusterDownError, SlotNotCoveredError

from proxy.clock import FakeClock
from proxy.errors import RateLimited, UnknownConnection
from proxy.metrics import Metrics
from proxy.ratelimit import (
    Admit,
    Bucket,
    Limiter,
    RateLimit,
    Refuse,
    decide,
    paused,
)
from proxy.redis_store import RedisStore

FIVE = RateLimit(rate=5, burst=5)


def shared_store(client: Any, prefix: str) -> RedisStore | None:
    """The limiter's shared state on `client` (a fake or real Redis), as the app wires it."""
    return RedisStore(client, prefix=prefix) if client is not None else None


def sample(metrics: Metrics, name: str, credential: str) -> float:
    value = metrics.registry.get_sample_value(name, {"credential": credential})
    return value or 0.0


class FakeTime:
    """A FakeClock and a `sleep` that advances it instead of waiting."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.advance(seconds)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most timestamps in any half-open window [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# --- the pure core -------------------------------------------------------------------


def run(limit: RateLimit, arrivals: list[float], bucket: Bucket | None = None) -> list[Any]:
    """Feed arrivals (absolute times) to `decide`; return Admit/Refuse per arrival."""
    state = bucket or Bucket()
    out: list[Any] = []
    for now in arrivals:
        outcome = decide(state, now, limit)
        if isinstance(outcome, Admit):
            state = outcome.bucket
        out.append(outcome)
    return out


def test_defaults_and_validation() -> None:
    assert FIVE.burst == 5
    assert FIVE.max_wait == 2.0
    assert FIVE.max_queue == 15
    assert RateLimit(rate=0.5).burst == 1
    assert RateLimit(rate=10, burst=3).max_queue == 23
    assert RateLimit(rate=0).off
    assert RateLimit(rate=6, burst=5).share(3) == RateLimit(rate=2, burst=1, max_queue=17)
    with pytest.raises(ValueError, match="negative"):
        RateLimit(rate=-1)


def test_burst_passes_then_requests_are_shaped_in_arrival_order() -> None:
    outcomes = run(FIVE, [100.0] * 9)
    assert [o.delay for o in outcomes] == pytest.approx([0, 0, 0, 0, 0, 0.2, 0.4, 0.6, 0.8])


def test_past_max_wait_is_refused_without_taking_a_slot() -> None:
    outcomes = run(FIVE, [100.0] * 17)
    admitted = [o for o in outcomes if isinstance(o, Admit)]
    refused = [o for o in outcomes if isinstance(o, Refuse)]
    assert len(admitted) == 5 + 10  # the burst, then 2 s of slots at 0.2 s
    assert all(r.reason == "wait" for r in refused)
    assert refused[0].wait == pytest.approx(2.2)
    assert refused[0].retry_after == pytest.approx(0.2)
    last = admitted[-1].bucket
    assert decide(last, 100.0, FIVE) == refused[0]  # refusals left the state alone


def test_idle_refills_the_burst() -> None:
    outcomes = run(FIVE, [100.0] * 5 + [101.0] * 5 + [101.0])
    assert [o.delay for o in outcomes[:10]] == [0.0] * 10
    assert outcomes[10].delay == pytest.approx(0.2)


def test_no_window_ever_sees_more_than_rate_plus_burst() -> None:
    rng = random.Random(5)
    arrivals = sorted(100 + rng.uniform(0, 20) for _ in range(400))
    limit = RateLimit(rate=5, burst=5, max_wait=2)
    outcomes = run(limit, arrivals)
    slots = [t + o.delay for t, o in zip(arrivals, outcomes, strict=True) if isinstance(o, Admit)]
    assert max_in_window(slots) <= 10
    assert slots == sorted(slots)  # arrival order kept
    assert len(slots) >= 5 + 5 * 19  # shaping keeps the pipe full


def test_pause_holds_every_slot_until_its_end_then_releases_one_burst() -> None:
    limit = RateLimit(rate=5, burst=5, max_wait=2)
    bucket = paused(Bucket(), 100.0, 1.5)
    outcomes = run(limit, [100.0] * 8, bucket)
    assert [o.delay for o in outcomes[:7]] == pytest.approx([1.5] * 5 + [1.7, 1.9])
    assert isinstance(outcomes[7], Refuse)


def test_pause_longer_than_max_wait_refuses_at_once() -> None:
    outcome = decide(paused(Bucket(), 100.0, 3), 100.0, FIVE)
    assert outcome == Refuse(retry_after=pytest.approx(1.0), reason="paused", wait=3.0)


def test_a_pause_never_shortens_another() -> None:
    bucket = paused(paused(Bucket(), 100.0, 3), 101.0, 1)
    assert bucket.pause_until == 103.0


def test_full_queue_is_refused() -> None:
    outcome = decide(Bucket(), 100.0, FIVE, waiting=15)
    assert isinstance(outcome, Refuse)
    assert outcome.reason == "queue"


# --- the Limiter in process, on a fake clock -----------------------------------------


def local_limiter(
    t: FakeTime, limits: dict[str, RateLimit] | None = None, **kw: Any
) -> tuple[Limiter, Metrics]:
    metrics = Metrics()
    limiter = Limiter(
        limits or {"a": FIVE, "b": FIVE, "off": RateLimit(rate=0)},
        shared=shared_store(kw.pop("redis", None), "t"),
        metrics=metrics,
        clock=t.clock,
        sleep=t.sleep,
        replica_id="r1",
        **kw,
    )
    return limiter, metrics


async def test_local_limiter_shapes_and_counts() -> None:
    t = FakeTime()
    limiter, metrics = local_limiter(t)
    waits = [await limiter.admit("a") for _ in range(7)]
    # Each admit sleeps (advancing the fake clock), so the burst refills meanwhile.
    assert waits == pytest.approx([0, 0, 0, 0, 0, 0.2, 0.2], abs=1e-5)
    assert t.slept == pytest.approx([0.2, 0.2], abs=1e-5)
    assert sample(metrics, "cbproxy_ratelimit_admitted_total", "a") == 5
    assert sample(metrics, "cbproxy_ratelimit_delay_seconds_count", "a") == 2
    assert limiter.describe("a") == {
        "limit": 5,
        "burst": 5,
        "max_wait": 2.0,
        "paused_until": None,
        "mode": "local",
    }


async def test_refusal_says_the_limit_and_what_to_do() -> None:
    t = FakeTime()
    limiter, metrics = local_limiter(t)
    await limiter.pause("a", 10)
    with pytest.raises(RateLimited) as info:
        await limiter.admit("a")
    assert info.value.retry_after == pytest.approx(8)
    assert "pause" in info.value.message
    assert "retry after 8 s" in info.value.message
    assert sample(metrics, "cbproxy_ratelimit_refused_total", "a") == 1
    assert sample(metrics, "cbproxy_ratelimit_paused", "a") == 1
    assert limiter.describe("a")["paused_until"] == t.clock() + 10
    assert await limiter.admit("b") == 0  # another credential is untouched
    t.clock.advance(10)
    assert limiter.describe("a")["paused_until"] is None
    assert sample(metrics, "cbproxy_ratelimit_paused", "a") == 0


async def test_wait_refusal_message() -> None:
    t = FakeTime()
    limiter, _ = local_limiter(t, {"a": RateLimit(rate=5, burst=1, max_wait=0)})
    await limiter.admit("a")
    with pytest.raises(RateLimited, match=r"limited to 5 requests per second \(burst 1\)"):
        await limiter.admit("a")


async def test_rate_zero_is_off_and_unknown_credential_is_an_error() -> None:
    t = FakeTime()
    server = fakeredis.FakeServer()
    server.connected = False  # any Redis call would fail and count as an error
    limiter, metrics = local_limiter(t, redis=fakeredis.FakeAsyncRedis(server=server))
    assert [await limiter.admit("off") for _ in range(100)] == [0.0] * 100
    assert (
        metrics.registry.get_sample_value("cbproxy_redis_errors_total", {"operation": "ratelimit"})
        is None
    )
    assert limiter.mode == "shared"
    with pytest.raises(UnknownConnection):
        await limiter.admit("nobody")


async def test_a_full_queue_answers_at_once() -> None:
    release = asyncio.Event()

    async def blocked_sleep(seconds: float) -> None:
        await release.wait()

    limit = RateLimit(rate=5, burst=1, max_wait=10, max_queue=3)
    metrics = Metrics()
    limiter = Limiter(
        {"a": limit},
        shared=None,
        metrics=metrics,
        clock=FakeClock(),
        sleep=blocked_sleep,
        replica_id="r1",
    )
    assert await limiter.admit("a") == 0
    waiting = [asyncio.create_task(limiter.admit("a")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited, match="3 requests are already waiting"):
        await limiter.admit("a")
    release.set()
    assert await asyncio.gather(*waiting) == pytest.approx([0.2, 0.4, 0.6])
    assert await limiter.admit("a") == pytest.approx(0.8)  # room again


# --- the Lua script, on fakeredis ------------------------------------------------------


class CountingRedis(fakeredis.FakeAsyncRedis):
    """Counts commands sent, to show one round trip per admit."""

    commands = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        type(self).commands += 1
        return await super().execute_command(*args, **options)


def fake_limiter(
    server: fakeredis.FakeServer, replica: str, sleep: Any = None, **kw: Any
) -> tuple[Limiter, Metrics]:
    metrics = Metrics()
    limiter = Limiter(
        kw.pop("limits", {"a": FIVE, "b": FIVE}),
        shared=shared_store(kw.pop("redis", None) or fakeredis.FakeAsyncRedis(server=server), "t"),
        metrics=metrics,
        sleep=sleep or FakeTime().sleep,
        replica_id=replica,
        **kw,
    )
    return limiter, metrics


async def test_script_shapes_across_replicas_in_one_round_trip() -> None:
    server = fakeredis.FakeServer()
    CountingRedis.commands = 0
    one, _ = fake_limiter(server, "r1", redis=CountingRedis(server=server))
    two, _ = fake_limiter(server, "r2")
    await one.admit("a")  # first call also loads the script
    before = CountingRedis.commands
    waits = [await one.admit("a")] + [await two.admit("a") for _ in range(6)]
    assert CountingRedis.commands - before == 1
    # Nobody really sleeps, so server time barely moves: slots follow arrival.
    assert waits[:4] == [0.0] * 4
    assert waits[4:] == pytest.approx([0.2, 0.4, 0.6], abs=0.05)
    assert one.mode == two.mode == "shared"


async def test_script_refuses_past_max_wait() -> None:
    server = fakeredis.FakeServer()
    one, metrics = fake_limiter(server, "r1", limits={"a": RateLimit(5, 5, max_wait=0.5)})
    waits = [await one.admit("a") for _ in range(7)]
    assert waits[-1] == pytest.approx(0.4, abs=0.05)
    with pytest.raises(RateLimited) as info:
        await one.admit("a")
    assert info.value.retry_after == pytest.approx(0.2, abs=0.05)
    assert sample(metrics, "cbproxy_ratelimit_refused_total", "a") == 1


async def test_pause_is_shared_but_per_credential() -> None:
    server = fakeredis.FakeServer()
    one, _ = fake_limiter(server, "r1")
    two, metrics = fake_limiter(server, "r2")
    await one.pause("a", 5)
    with pytest.raises(RateLimited, match="pause"):
        await two.admit("a")
    assert sample(metrics, "cbproxy_ratelimit_paused", "a") == 1
    assert two.describe("a")["paused_until"] is not None
    assert await two.admit("b") == 0


async def test_heartbeat_counts_live_replicas_and_forgets_silent_ones() -> None:
    server = fakeredis.FakeServer()
    limiters = [fake_limiter(server, f"r{i}", heartbeat_interval=0.05)[0] for i in range(3)]
    assert [await limiter.heartbeat() for limiter in limiters] == [1, 2, 3]
    await asyncio.sleep(0.2)
    assert await limiters[0].heartbeat() == 1


async def test_redis_down_falls_back_to_an_even_share_and_back() -> None:
    server = fakeredis.FakeServer()
    t = FakeTime()
    limits = {"a": RateLimit(rate=6, burst=3)}
    limiters = [fake_limiter(server, f"r{i}", limits=limits, sleep=t.sleep)[0] for i in range(3)]
    mine = Limiter(
        limits,
        shared=shared_store(fakeredis.FakeAsyncRedis(server=server), "t"),
        metrics=Metrics(),
        clock=t.clock,
        sleep=t.sleep,
        replica_id="r0",
    )
    for limiter in [*limiters[1:], mine]:
        await limiter.heartbeat()
    assert mine.replicas == 3
    server.connected = False
    with structlog.testing.capture_logs() as logs:
        waits = [await mine.admit("a") for _ in range(4)]
        t.clock.advance(5)
        await mine.admit("a")  # retries Redis, still down: no second log line
        assert mine.mode == "local-fallback"
        assert mine.describe("a")["mode"] == "local-fallback"
        server.connected = True
        t.clock.advance(1)  # the next call after a failure waits a second to retry Redis
        await mine.admit("a")
    assert waits == pytest.approx([0, 0.5, 0.5, 0.5])  # 6/s over 3 replicas: 2/s, burst 1
    events = [entry["event"] for entry in logs]
    assert events == ["ratelimit.fallback.local", "ratelimit.fallback.ended"]
    assert mine.mode == "shared"


async def test_without_redis_a_pause_is_local() -> None:
    t = FakeTime()
    limiter, _ = local_limiter(t)
    await limiter.pause("a", 1)
    assert await limiter.admit("a") == 1.0


# --- a real Redis, three replicas ----------------------------------------------------


@pytest.fixture
async def replicas(
    redis_url: str, key_prefix: str, real_redis: aioredis.Redis
) -> AsyncIterator[Callable[..., list[Limiter]]]:
    clients: list[aioredis.Redis] = []

    def make(limits: dict[str, RateLimit], n: int = 3, **kw: Any) -> list[Limiter]:
        out = []
        for i in range(n):
            client = aioredis.Redis.from_url(redis_url)
            clients.append(client)
            out.append(
                Limiter(
                    limits,
                    shared=RedisStore(client, prefix=key_prefix),
                    metrics=Metrics(),
                    replica_id=f"replica-{i}",
                    **kw,
                )
            )
        return out

    yield make
    for client in clients:
        await client.aclose()


@pytest.mark.redis
async def test_three_replicas_never_exceed_rate_plus_burst(
    replicas: Callable[..., list[Limiter]],
) -> None:
    limiters = replicas({"a": RateLimit(rate=5, burst=5, max_wait=1.0)})
    admitted: list[float] = []
    refused = 0
    stop = time.monotonic() + 2.5

    async def caller(limiter: Limiter) -> None:
        nonlocal refused
        while time.monotonic() < stop:
            try:
                await limiter.admit("a")
            except RateLimited as exc:
                refused += 1
                await asyncio.sleep(min(exc.retry_after or 0.05, 0.05))
            else:
                admitted.append(time.monotonic())

    await asyncio.gather(*(caller(limiters[i % 3]) for i in range(30)))
    assert max_in_window(admitted) <= 10
    assert len(admitted) >= 5 + 5 * 2  # the limiter lets the full rate through
    assert refused > 0


@pytest.mark.redis
async def test_arrival_order_is_kept_across_replicas(
    replicas: Callable[..., list[Limiter]],
) -> None:
    limiters = replicas({"a": RateLimit(rate=20, burst=2, max_wait=2), "warm": FIVE})
    for limiter in limiters:  # each client loads the script first, so no call waits for that
        await limiter.admit("warm")
    done: list[int] = []

    async def one(i: int) -> None:
        await limiters[i % 3].admit("a")
        done.append(i)

    tasks = []
    for i in range(12):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert done == list(range(12))


@pytest.mark.redis
async def test_past_max_wait_is_refused_at_once(
    replicas: Callable[..., list[Limiter]],
) -> None:
    t = FakeTime()  # only records the waits: the slots are taken in Redis regardless
    [limiter] = replicas({"a": RateLimit(rate=5, burst=5, max_wait=0.5)}, n=1, sleep=t.sleep)
    waits = [await limiter.admit("a") for _ in range(7)]
    assert waits[5:] == pytest.approx([0.2, 0.4], abs=0.05)
    started = time.monotonic()
    with pytest.raises(RateLimited) as info:
        await limiter.admit("a")
    assert time.monotonic() - started < 0.1
    assert 0 < (info.value.retry_after or 0) <= 0.3


@pytest.mark.redis
async def test_pause_reaches_every_replica_and_only_its_credential(
    replicas: Callable[..., list[Limiter]],
) -> None:
    one, two, three = replicas({"a": FIVE, "b": FIVE})
    await one.pause("a", 0.6)
    started = time.monotonic()
    waited = await two.admit("a")
    assert 0.45 < waited <= 0.6
    assert time.monotonic() - started >= 0.45
    assert await three.admit("b") == 0
    await one.pause("a", 5)
    with pytest.raises(RateLimited, match="pause"):
        await three.admit("a")
    assert three.describe("a")["paused_until"] is not None
    assert three.describe("b")["paused_until"] is None


@pytest.mark.redis
async def test_redis_down_local_share_of_last_seen_replicas(
    replicas: Callable[..., list[Limiter]], redis_url: str, key_prefix: str
) -> None:
    t = FakeTime()
    limits = {"a": RateLimit(rate=6, burst=3)}
    others = replicas(limits, n=2)
    client = aioredis.Redis.from_url(redis_url)
    mine = Limiter(
        limits,
        shared=RedisStore(client, prefix=key_prefix),
        metrics=Metrics(),
        clock=t.clock,
        sleep=t.sleep,
        replica_id="mine",
    )
    for limiter in [*others, mine]:
        await limiter.heartbeat()
    assert mine.replicas == 3
    # Redis "goes away": new connections of this client go to a dead port.
    pool = client.connection_pool
    pool.connection_kwargs["port"] = 1
    await pool.disconnect()
    pool.reset()
    try:
        with structlog.testing.capture_logs() as logs:
            waits = [await mine.admit("a") for _ in range(4)]
            assert await mine.heartbeat() == 3  # keeps the last seen count
        assert waits == pytest.approx([0, 0.5, 0.5, 0.5])
        assert mine.mode == "local-fallback"
        assert [e["event"] for e in logs] == ["ratelimit.fallback.local"]
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_no_redis_at_all_uses_the_assumed_replica_count(key_prefix: str) -> None:
    t = FakeTime()
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    limiter = Limiter(
        {"a": RateLimit(rate=6, burst=3)},
        shared=RedisStore(client, prefix=key_prefix),
        metrics=Metrics(),
        clock=t.clock,
        sleep=t.sleep,
        replica_id="x",
        assumed_replicas=2,
    )
    try:
        waits = [await limiter.admit("a") for _ in range(3)]
        await limiter.pause("a", 1)
    finally:
        await client.aclose()
    assert waits == pytest.approx([0, 1 / 3, 1 / 3])  # 6/s over 2: 3/s, burst 1
    assert limiter.describe("a")["mode"] == "local-fallback"


async def test_a_longer_max_wait_admits_what_the_default_refuses() -> None:
    # A token refresh waits for its slot rather than losing to a flood of requests.
    t = FakeTime()
    limiter, _ = local_limiter(t, {"a": RateLimit(rate=5, burst=1, max_wait=0)})
    await limiter.admit("a")
    with pytest.raises(RateLimited):
        await limiter.admit("a")
    assert await limiter.admit("a", max_wait=1.0) == pytest.approx(0.2, abs=1e-5)


@pytest.mark.parametrize(
    "error", [ClusterDownError("down"), SlotNotCoveredError("slot"), ConnectionResetError()]
)
async def test_any_store_error_sends_the_limiter_to_its_local_share(error: Exception) -> None:
    """Every Redis error is translated once, in the store: a cluster error is an outage too."""

    class Broken(fakeredis.FakeAsyncRedis):
        async def execute_command(self, *args: Any, **options: Any) -> Any:
            raise error

    t = FakeTime()
    limiter, _ = local_limiter(t, redis=Broken(server=fakeredis.FakeServer()))
    assert await limiter.admit("a") == 0.0
    assert limiter.mode == "local-fallback"
    await limiter.pause("a", 1.0)  # and a pause stays local, never raises
