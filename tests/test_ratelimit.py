"""The rate limiter: the pure GCRA core, the Lua script on fakeredis, and a real Redis."""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ClusterDownError, SlotNotCoveredError

from proxy.app import make_limiter
from proxy.clock import FakeClock
from proxy.config import AppSettings, Settings
from proxy.errors import RateLimited, UnknownConnection
from proxy.fairqueue import FairQueue
from proxy.gcra import (
    Admit,
    Bucket,
    RateLimit,
    Refuse,
    decide,
    expected_wait,
    horizon,
    paused,
    split,
)
from proxy.metrics import Metrics
from proxy.ratelimit import Limiter
from proxy.redis_store import RedisStore
from proxy.store import MemoryStore

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


class SimTime:
    """Simulated time for concurrent tasks: `sleep` parks a task until `run` moves the fake
    clock to its wake-up time, earliest first; nothing really waits."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.clock() + max(seconds, 0.0), self._seq, future))
        await future

    async def run(self, seconds: float) -> None:
        """Let the tasks run while the clock moves `seconds` ahead, wake-up by wake-up."""
        end = self.clock() + seconds
        while True:
            for _ in range(20):
                await asyncio.sleep(0)
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            wake, _, future = heapq.heappop(self._sleepers)
            self.clock.value = max(self.clock.value, wake)
            future.set_result(None)
        self.clock.value = max(self.clock.value, end)


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


# --- the split of an app's budget --------------------------------------------------


def test_an_app_splits_into_requests_and_token_calls() -> None:
    requests, tokens = split(RateLimit(rate=10, burst=10), 0.2)
    assert (requests.rate, requests.burst) == pytest.approx((8, 8))
    assert (tokens.rate, tokens.burst) == pytest.approx((2, 2))
    requests, tokens = split(RateLimit(rate=5, burst=5), 0.2)
    assert (requests.rate, requests.burst, tokens.rate, tokens.burst) == pytest.approx((4, 4, 1, 1))
    # Each part keeps at least one of the burst, whatever the share.
    assert [p.burst for p in split(RateLimit(rate=10, burst=2), 0.05)] == [1, 1]
    assert [p.burst for p in split(RateLimit(rate=10, burst=10), 0.95)] == [1, 9]
    with pytest.raises(ValueError, match="cannot be split"):
        split(RateLimit(rate=5, burst=1), 0.2)
    with pytest.raises(ValueError, match="fraction"):
        split(FIVE, 0.0)


def test_split_parts_sum_to_the_app_limit() -> None:
    rng = random.Random(7)
    for _ in range(500):
        limit = RateLimit(rate=rng.uniform(0.5, 50), burst=rng.randint(2, 40))
        requests, tokens = split(limit, rng.uniform(0.01, 0.99))
        assert requests.rate + tokens.rate == pytest.approx(limit.rate)
        assert requests.burst + tokens.burst == limit.burst
        assert requests.burst >= 1 and tokens.burst >= 1
        assert requests.max_wait == tokens.max_wait == limit.max_wait


def test_the_two_budgets_together_stay_within_rate_plus_burst() -> None:
    rng = random.Random(11)
    limit = RateLimit(rate=10, burst=10)
    parts = split(limit, 0.2)
    buckets = [Bucket(), Bucket()]
    sent: list[float] = []
    for now in sorted(100 + rng.uniform(0, 20) for _ in range(1200)):
        which = rng.randrange(2)  # requests and token calls both flood
        outcome = decide(buckets[which], now, parts[which])
        if isinstance(outcome, Admit):
            buckets[which] = outcome.bucket
            sent.append(now + outcome.delay)
    assert max_in_window(sent) <= limit.rate + limit.burst


def test_a_slot_is_asked_for_only_when_near() -> None:
    assert horizon(FIVE).max_wait == pytest.approx(0.05)
    assert horizon(RateLimit(rate=5, max_wait=0)).max_wait == 0
    assert expected_wait(FIVE, 0.1, 3) == pytest.approx(0.7)


# --- round robin among the connections waiting ----------------------------------------


def test_connections_take_turns_each_in_its_own_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ["a1", "a2", "a3", "b1", "c1", "c2"]:
        queue.join(item[0], item)
    assert len(queue) == 6 and queue.connections() == 3
    assert [queue.pop() for _ in range(6)] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert queue.pop() is None
    assert queue.connections() == 0  # nothing is kept for a connection without waiters


def test_slots_ahead_count_at_most_one_turn_per_round() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(30):
        queue.join("flood", f"f{i}")
    queue.join("p1", "p1-0")
    assert queue.slots_ahead("p2") == 2  # one turn each for the flood and p1
    assert queue.slots_ahead("p1") == 1 + 2  # its own waiter, then a turn of the flood
    assert queue.slots_ahead("flood") == 30 + 1  # p1 has one waiter only


def test_remove_and_evict_drop_emptied_connections() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ["a1", "a2", "a3", "b1"]:
        queue.join(item[0], item)
    assert queue.remove("b", "b1") and not queue.remove("b", "b1")
    assert "b" not in queue
    assert queue.evict() == "a3"  # the newest of the longest queue
    assert queue.remove("a", "a1") and queue.remove("a", "a2")
    assert len(queue) == 0 and queue.connections() == 0 and queue.evict() is None


# --- the Limiter in process, on a fake clock -----------------------------------------


def local_limiter(
    t: FakeTime | SimTime, limits: dict[str, RateLimit] | None = None, **kw: Any
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
    t = SimTime()
    limit = RateLimit(rate=5, burst=1, max_wait=10, max_queue=3)
    limiter, _ = local_limiter(t, {"a": limit})
    assert await limiter.admit("a") == 0
    waiting = [asyncio.create_task(limiter.admit("a")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited, match="3 requests are already waiting"):
        await limiter.admit("a")
    await t.run(1.0)
    assert await asyncio.gather(*waiting) == pytest.approx([0.2, 0.4, 0.6])
    await t.run(0.2)
    assert await limiter.admit("a") == 0  # room again, and the slot is due


async def test_a_paced_connection_goes_ahead_of_a_flood() -> None:
    t = SimTime()
    limit = RateLimit(rate=10, burst=1, max_wait=2)
    limiter, _ = local_limiter(t, {"a": limit})
    sent: list[float] = []

    async def one(connection: str, at: float = 0.0) -> float:
        await t.sleep(at)
        waited = await limiter.admit("a", connection)
        sent.append(t.clock())
        return waited

    flood = [asyncio.create_task(one("flood")) for _ in range(40)]
    paced = [asyncio.create_task(one(f"p{i}", 0.5 + 0.3 * i)) for i in range(6)]
    await t.run(10)
    paced_waits = await asyncio.gather(*paced)  # none refused
    assert max(paced_waits) <= 2 * limit.interval + 1e-6  # the flood's turn, then theirs
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert 10 < len(refused) < 30  # the flood's excess, past its 2 s
    assert max(o for o in outcomes if isinstance(o, float)) <= limit.max_wait + 1e-6
    assert max_in_window(sent) <= limit.rate + limit.burst
    assert limiter.queued("a") == (0, 0)  # no state outlives the waiters


async def test_a_full_queue_makes_room_for_a_connection_with_no_waiter() -> None:
    t = SimTime()
    limiter, _ = local_limiter(t, {"a": RateLimit(rate=5, burst=1, max_wait=10, max_queue=4)})
    await limiter.admit("a", "flood")  # the burst
    flood = [asyncio.create_task(limiter.admit("a", "flood")) for _ in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited, match="already waiting"):
        await limiter.admit("a", "flood")  # the flood's own fifth: refused
    other = asyncio.create_task(limiter.admit("a", "other"))
    await t.run(5)
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    assert isinstance(outcomes[-1], RateLimited)  # the flood's newest gave way
    assert await other == pytest.approx(0.4)


async def test_a_waiter_that_leaves_leaves_nothing_behind() -> None:
    t = SimTime()
    limiter, _ = local_limiter(t, {"a": RateLimit(rate=5, burst=1, max_wait=10)})
    await limiter.admit("a", "x")
    tasks = [asyncio.create_task(limiter.admit("a", c)) for c in ["c1"] * 3 + ["c2"] * 3]
    await asyncio.sleep(0)
    assert limiter.queued("a") == (6, 2)  # each: one slot reserved, two queued
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await t.run(1)
    assert limiter.queued("a") == (0, 0)
    await limiter.close()


async def test_a_pause_holds_the_linked_token_budget_too() -> None:
    t = FakeTime()
    requests, tokens = split(RateLimit(rate=10, burst=10), 0.2)
    limiter, _ = local_limiter(
        t,
        {"app:x": requests, "app:x/tokens": tokens, "app:y": FIVE},
        linked={"app:x": ("app:x", "app:x/tokens"), "app:x/tokens": ("app:x", "app:x/tokens")},
    )
    await limiter.pause("app:x", 30)
    for budget in ("app:x", "app:x/tokens"):
        with pytest.raises(RateLimited, match="pause"):
            await limiter.admit(budget)
        assert limiter.describe(budget)["paused_until"] is not None
    assert await limiter.admit("app:y") == 0


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
    waits = [await one.admit("a")] + [await two.admit("a") for _ in range(3)]
    assert CountingRedis.commands - before == 1  # no waiters: one round trip per request
    assert waits == [0.0] * 4  # the burst, shared by both replicas
    with pytest.raises(RateLimited):  # the sixth would wait 0.2 s, more than one allows
        await two.admit("a", max_wait=0.1)
    assert one.mode == two.mode == "shared"


async def test_concurrent_requests_of_one_connection_within_the_burst_cost_one_trip() -> None:
    server = fakeredis.FakeServer()
    CountingRedis.commands = 0
    one, metrics = fake_limiter(server, "r1", redis=CountingRedis(server=server))
    await one.admit("b")  # loads the script
    before = CountingRedis.commands
    waits = await asyncio.gather(*(one.admit("a", "c") for _ in range(5)))
    assert waits == [0.0] * 5
    assert CountingRedis.commands - before == 5
    assert sample(metrics, "cbproxy_ratelimit_admitted_total", "a") == 5
    assert one.queued("a") == (0, 0)


async def test_script_refuses_past_max_wait() -> None:
    server = fakeredis.FakeServer()
    one, metrics = fake_limiter(
        server, "r1", sleep=asyncio.sleep, limits={"a": RateLimit(5, 5, max_wait=0.5)}
    )
    waits = [await one.admit("a") for _ in range(5)]
    assert waits == [0.0] * 5
    many = await asyncio.gather(*(one.admit("a") for _ in range(4)), return_exceptions=True)
    refused = [r for r in many if isinstance(r, RateLimited)]
    assert [round(w, 1) for w in many if isinstance(w, float)] == [0.2, 0.4]
    assert len(refused) == 2  # slots 0.6 and 0.8 s away: refused at once
    assert 0 < (refused[0].retry_after or 0) <= 0.3
    assert sample(metrics, "cbproxy_ratelimit_refused_total", "a") == 2


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
async def test_each_connection_keeps_its_order_across_replicas(
    replicas: Callable[..., list[Limiter]],
) -> None:
    limiters = replicas({"a": RateLimit(rate=20, burst=2, max_wait=2), "warm": FIVE})
    for limiter in limiters:  # each client loads the script first, so no call waits for that
        await limiter.admit("warm")
    done: list[tuple[int, int]] = []

    async def one(i: int) -> None:
        await limiters[i % 3].admit("a", f"c{i % 3}")
        done.append((i % 3, i))

    tasks = []
    for i in range(24):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    for replica in range(3):  # a connection's requests on one replica: first come, first sent
        mine = [i for r, i in done if r == replica]
        assert mine == sorted(mine)
    assert all(limiter.queued("a") == (0, 0) for limiter in limiters)


@pytest.mark.redis
async def test_a_paced_connection_is_not_refused_while_another_floods_three_replicas(
    replicas: Callable[..., list[Limiter]],
) -> None:
    limiters = replicas({"a": RateLimit(rate=20, burst=4, max_wait=1.0), "warm": FIVE})
    for limiter in limiters:
        await limiter.admit("warm")
    admitted: list[float] = []
    flood_refused = 0
    stop = time.monotonic() + 2.5

    async def flood(limiter: Limiter) -> None:
        nonlocal flood_refused
        while time.monotonic() < stop:
            try:
                await limiter.admit("a", "flood")
            except RateLimited:
                flood_refused += 1
                await asyncio.sleep(0.01)
            else:
                admitted.append(time.monotonic())

    async def paced() -> list[float]:
        waits = []
        for i in range(10):
            await asyncio.sleep(0.2)
            waits.append(await limiters[i % 3].admit("a", "paced"))  # never RateLimited
            admitted.append(time.monotonic())
        return waits

    results = await asyncio.gather(paced(), *(flood(limiters[i % 3]) for i in range(45)))
    assert max(results[0]) < 0.9  # under max_wait: a turn comes within a few slots
    assert flood_refused > 0
    assert max_in_window(admitted) <= 20 + 4


@pytest.mark.redis
async def test_pause_reaches_every_replica_and_only_its_credential(
    replicas: Callable[..., list[Limiter]],
) -> None:
    one, two, three = replicas({"a": FIVE, "b": FIVE})
    await one.pause("a", 0.6)
    started = time.monotonic()
    waited = await two.admit("a")
    assert 0.45 < waited <= 0.75  # the pause's end, as the queue's dispatcher sees it
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


async def test_the_app_factory_splits_each_app_and_links_its_pause() -> None:
    def app(name: str, share: float) -> AppSettings:
        return AppSettings(name, "id-" + name, "secret", "https://x.example/cb", token_share=share)

    settings = Settings(credentials=(), apps=(app("split", 0.2), app("whole", 0.0)))
    limiter = make_limiter(settings, MemoryStore(), Metrics(), FakeClock())
    assert (limiter.describe("app:split")["limit"], limiter.describe("app:split")["burst"]) == (
        pytest.approx(4),
        4,
    )
    assert limiter.describe("app:split/tokens")["limit"] == pytest.approx(1)
    assert limiter.describe("app:whole")["limit"] == 5
    await limiter.pause("app:split/tokens", 10)  # linked both ways
    assert limiter.describe("app:split")["paused_until"] is not None
    assert limiter.describe("app:whole")["paused_until"] is None
