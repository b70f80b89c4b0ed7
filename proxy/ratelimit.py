"""One rate limiter per budget (an app, or a configured credential), shared by every
replica through Redis; its rules are `proxy.gcra`'s.

- Fair within a budget (`proxy.fairqueue`). A request of a connection that has no other
  request waiting in this process takes the budget's next slot in arrival order: one
  round trip, and a paced connection's request is never behind another's backlog. A
  request of a connection that already has one waiting takes a slot only if one is due
  now and nobody is queued here (still one round trip); else it joins that connection's
  FIFO queue, and this process's dispatcher for the budget hands slots to the
  connections with queued requests in turn (round robin). The dispatcher asks the shared
  GCRA only for a slot due within a quarter interval (`horizon`), so a backlog never
  reserves ahead of the fleet's newcomers, and sleeps until the next slot is near
  between asks. A queued request whose expected wait (the next slot plus `slots_ahead`
  intervals) exceeds `max_wait` is refused at once, one still queued at `max_wait` then:
  a flood's excess is refused, not queued. Only waiters hold state: a connection's queue
  is dropped when it empties, a budget's queue with its last waiter.
- A pause holds the budget and the budgets linked to it (an app's request and token
  budgets: Cloudbeds counts per client id), on every replica.
- At most `max_queue` requests of one budget may be in the limiter (waiting or asking)
  in one process; one more is refused at once, unless its connection has no waiter: then
  the newest waiter of the longest queue is refused in its place. `max_wait` already
  bounds the fleet-wide queue; this bounds the tasks a single process holds.
- With Redis, the rules run in one Lua script per ask on Redis' clock (`TIME`), so
  replicas with skewed clocks agree; the script lives in the store
  (`proxy.redis_store`, `budget_admit`), which owns every Redis call. Without Redis they
  run in process.
- Redis down: each replica falls back to an even share of the limit,
  rate / n and max(1, burst // n), n being the replicas it last saw alive in the
  heartbeat set. The local bucket starts from the fleet's last known `tat`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import structlog

from proxy.clock import Clock, system_clock
from proxy.errors import RateLimited, StoreUnavailable, UnknownConnection
from proxy.fairqueue import FairQueue
from proxy.gcra import (
    EPSILON,
    Admit,
    Bucket,
    RateLimit,
    Refuse,
    check_queue,
    decide,
    expected_wait,
    horizon,
    next_slot,
    paused,
    refusal,
)
from proxy.metrics import Metrics
from proxy.store import SharedBudgets

log = structlog.get_logger(__name__)

Mode = Literal["shared", "local", "local-fallback"]

# Failures that send the limiter to its local fallback: the store's own error (every Redis
# error is translated there) and our own bound on the round trip.
_SHARED_FAILURES = (StoreUnavailable, TimeoutError)


@dataclasses.dataclass(eq=False, slots=True)
class _Waiter:
    """A request queued for a slot; compared by identity (a queue removes this one)."""

    key: str
    future: asyncio.Future[float]
    limit: RateLimit
    started: float

    @property
    def deadline(self) -> float:
        return self.started + self.limit.max_wait


class Limiter:
    """Admits each budget's requests at its rate, fairly across connections: shared
    through Redis, or local."""

    def __init__(
        self,
        limits: Mapping[str, RateLimit],
        *,
        shared: SharedBudgets | None,
        metrics: Metrics,
        replica_id: str,
        clock: Clock = system_clock,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        heartbeat_interval: float = 5.0,
        redis_timeout: float = 0.5,
        assumed_replicas: int = 1,
        linked: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._limits = dict(limits)
        self._linked = dict(linked or {})
        self._redis = shared
        self._metrics = metrics
        self._replica_id = replica_id
        self._clock = clock
        self._sleep = sleep
        self._heartbeat_interval = heartbeat_interval
        self._redis_timeout = redis_timeout
        self._replicas = max(1, assumed_replicas)
        self._local: dict[str, Bucket] = {}
        self._waiting: collections.Counter[str] = collections.Counter()
        self._paused_until: dict[str, float] = {}
        self._fallback = False
        self._retry_redis_at = 0.0
        # Only while a budget has waiters in this process: its queue and its dispatcher.
        self._queues: dict[str, FairQueue[_Waiter]] = {}
        self._dispatchers: dict[str, asyncio.Task[None]] = {}
        # Only while a request of (budget, connection) holds a slot it reserved ahead.
        self._reserving: collections.Counter[tuple[str, str]] = collections.Counter()

    async def admit(
        self, credential: str, connection: str | None = None, *, max_wait: float | None = None
    ) -> float:
        """Wait for a slot of the budget `credential`; return the seconds waited.

        `connection` names whose request it is: when the budget is contended, connections
        with waiters take turns. Raises `RateLimited` when the wait would exceed
        `max_wait` (the limit's, unless given: a token refresh may wait longer than a
        request) or the queue is full.
        """
        limit = self._limit(credential)
        if limit.off:
            return 0.0
        if max_wait is not None:
            limit = dataclasses.replace(limit, max_wait=max_wait, max_queue=limit.max_queue + 1)
        key = connection or ""
        self._make_room(credential, key, limit)
        self._waiting[credential] += 1
        try:
            started = self._clock()
            queue = self._queues.get(credential)
            if (credential, key) not in self._reserving and (queue is None or key not in queue):
                return await self._reserve(credential, key, limit)
            if queue is None:  # nobody queued here: a slot due now is the connection's
                outcome = await self._decide(credential, horizon(limit))
                if isinstance(outcome, Admit):
                    return await self._admitted(credential, outcome.delay)
                delay = outcome.wait
            else:  # its queue, at the next slot as last seen
                delay = next_slot(self._bucket(credential), started, limit)[0]
            return await self._queue(credential, key, limit, started, delay)
        finally:
            self._waiting[credential] -= 1

    def _make_room(self, credential: str, key: str, limit: RateLimit) -> None:
        """Refuse a request past `max_queue`, unless its connection has no waiter: then the
        newest waiter of the longest queue is refused instead."""
        full = check_queue(limit, self._waiting[credential])
        if full is None:
            return
        queue = self._queues.get(credential)
        victim = queue.evict() if queue is not None and key not in queue else None
        if victim is None:
            raise self._refused(credential, limit, full)
        if not victim.future.done():
            refuse = Refuse(retry_after=victim.limit.interval, reason="queue")
            victim.future.set_exception(self._refused(credential, victim.limit, refuse))

    async def _reserve(self, credential: str, key: str, limit: RateLimit) -> float:
        """Take the budget's next slot in arrival order (one round trip), and wait for it."""
        mine = (credential, key)
        self._reserving[mine] += 1
        try:
            outcome = await self._decide(credential, limit)
            if isinstance(outcome, Refuse):
                raise self._refused(credential, limit, outcome)
            return await self._admitted(credential, outcome.delay)
        finally:
            self._reserving[mine] -= 1
            if not self._reserving[mine]:
                del self._reserving[mine]

    async def _admitted(self, credential: str, delay: float) -> float:
        if delay > 0:
            self._metrics.ratelimit_delayed.labels(credential).observe(delay)
            await self._sleep(delay)
        else:
            self._metrics.ratelimit_admitted.labels(credential).inc()
        return delay

    async def _queue(
        self, credential: str, key: str, limit: RateLimit, started: float, delay: float
    ) -> float:
        """Wait in `key`'s queue for the dispatcher to hand this request a slot."""
        now = self._clock()
        paused_for = max(self._paused_until.get(credential, 0.0) - now, 0.0)
        queue = self._queues.get(credential)
        ahead = queue.slots_ahead(key) if queue is not None else 0
        expected = expected_wait(limit, max(delay - (now - started), paused_for), ahead)
        if expected > limit.max_wait - (now - started) + EPSILON:
            raise self._refused(credential, limit, refusal(limit, expected, paused_for))
        waiter = _Waiter(key, asyncio.get_running_loop().create_future(), limit, started)
        if queue is None:
            queue = self._queues[credential] = FairQueue()
            first = max(delay - (now - started) - horizon(limit).max_wait, 0.0)
            self._dispatchers[credential] = asyncio.create_task(
                self._dispatch(credential, queue, first), name=f"ratelimit:{credential}"
            )
        queue.join(key, waiter)
        try:
            await waiter.future
        finally:
            queue.remove(key, waiter)  # it left, or its time ran out; a no-op once served
        waited = self._clock() - started
        self._metrics.ratelimit_delayed.labels(credential).observe(waited)
        return waited

    async def _dispatch(self, credential: str, queue: FairQueue[_Waiter], first: float) -> None:
        """Hand the budget's slots to `queue`'s connections in turn while it has waiters."""
        try:
            if first > 0:
                await self._sleep(self._nap(queue, first))
            await self._serve(credential, queue)
        except Exception:  # a bug must not leave the waiters hanging: they are refused below
            log.exception("ratelimit.dispatch.crashed", credential=credential)
        finally:
            # No await between the last look at the queue and this: a request that finds
            # the queue joins a live dispatcher, one that does not starts a new one.
            for waiter in queue.waiters():
                if not waiter.future.done():
                    refuse = Refuse(waiter.limit.interval, "wait", waiter.limit.max_wait)
                    waiter.future.set_exception(self._refused(credential, waiter.limit, refuse))
            if self._queues.get(credential) is queue:
                del self._queues[credential]
                del self._dispatchers[credential]

    async def _serve(self, credential: str, queue: FairQueue[_Waiter]) -> None:
        while True:
            self._expire(credential, queue)
            if not queue:
                return
            limit = self._limit(credential)
            near = horizon(limit)
            outcome = await self._decide(credential, near)
            if isinstance(outcome, Refuse):  # wake when the next slot is near
                await self._sleep(self._nap(queue, outcome.wait - near.max_wait))
                continue
            if outcome.delay > 0:
                await self._sleep(outcome.delay)
            waiter = queue.pop()  # the turn is decided when the slot is due
            while waiter is not None and waiter.future.done():
                waiter = queue.pop()
            if waiter is not None:
                waiter.future.set_result(outcome.delay)
            # The next slot as the budget last answered: no ask before it is near.
            later = next_slot(self._bucket(credential), self._clock(), limit)[0] - near.max_wait
            if later > 0 and queue:
                await self._sleep(self._nap(queue, later))

    def _nap(self, queue: FairQueue[_Waiter], seconds: float) -> float:
        """`seconds`, but not past the first waiter's deadline, and never zero."""
        return max(min(seconds, self._until_deadline(queue)), EPSILON)

    def _until_deadline(self, queue: FairQueue[_Waiter]) -> float:
        """Seconds until the first waiter's time runs out (at least a microsecond)."""
        soonest = min((w.deadline for w in queue.waiters()), default=math.inf)
        return max(soonest - self._clock(), EPSILON)

    def _expire(self, credential: str, queue: FairQueue[_Waiter]) -> None:
        """Refuse the waiters whose `max_wait` ran out before a slot came."""
        now = self._clock()
        paused_for = max(self._paused_until.get(credential, 0.0) - now, 0.0)
        for waiter in queue.waiters():
            if waiter.deadline <= now + EPSILON and not waiter.future.done():
                waited = now - waiter.started
                outcome = refusal(waiter.limit, waited + waiter.limit.interval, paused_for)
                waiter.future.set_exception(self._refused(credential, waiter.limit, outcome))
        for waiter in [w for w in queue.waiters() if w.future.done()]:
            queue.remove(waiter.key, waiter)

    async def pause(self, credential: str, seconds: float) -> None:
        """Pause the budget and those linked to it for `seconds` on every replica (locally
        without Redis): Cloudbeds' pause holds for the app's token calls too."""
        for budget in self._linked.get(credential, (credential,)):
            await self._pause_one(budget, seconds)

    async def _pause_one(self, credential: str, seconds: float) -> None:
        now = self._clock()
        self._local[credential] = paused(self._bucket(credential), now, seconds)
        self._note_pause(credential, now, seconds)
        log.warning("ratelimit.paused", credential=credential, seconds=seconds)
        if self._redis is None or not self._redis_usable(now):
            return
        try:
            async with asyncio.timeout(self._redis_timeout):
                await self._redis.budget_pause(credential, seconds)
        except _SHARED_FAILURES as exc:
            self._enter_fallback(exc)
        else:
            self._leave_fallback()

    async def close(self) -> None:
        """Stop the dispatchers (at shutdown); their waiters are refused."""
        tasks = list(self._dispatchers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self, credential: str) -> dict[str, Any]:
        """The credential's limit and state, for the status page. Never a Redis call."""
        limit = self._limit(credential)
        until = self._paused_until.get(credential, 0.0)
        paused_until = until if until > self._clock() else None
        self._metrics.ratelimit_paused.labels(credential).set(1 if paused_until else 0)
        return {
            "limit": limit.rate,
            "burst": limit.burst,
            "max_wait": limit.max_wait,
            "paused_until": paused_until,
            "mode": self.mode,
        }

    def queued(self, credential: str) -> tuple[int, int]:
        """(requests waiting, connections they are for) of the budget in this process: the
        only per-connection state the limiter holds."""
        queue = self._queues.get(credential)
        waiting = queue.waiters() if queue is not None else []
        reserving = {k: n for (b, k), n in self._reserving.items() if b == credential}
        keys = {w.key for w in waiting} | set(reserving)
        return len(waiting) + sum(reserving.values()), len(keys)

    @property
    def mode(self) -> Mode:
        if self._redis is None:
            return "local"
        return "local-fallback" if self._fallback else "shared"

    @property
    def replicas(self) -> int:
        """Live replicas last seen in the heartbeat set (or the assumed count)."""
        return self._replicas

    async def heartbeat(self) -> int:
        """Register this replica, learn how many are alive; return that count."""
        for credential in self._limits:
            self.describe(credential)  # refreshes the pause gauges as pauses end
        if self._redis is None:
            return self._replicas
        try:
            async with asyncio.timeout(self._redis_timeout):
                live = await self._redis.heartbeat(self._replica_id, 3 * self._heartbeat_interval)
        except _SHARED_FAILURES as exc:
            self._enter_fallback(exc)
        else:
            self._replicas = max(1, int(live))
            self._leave_fallback()
        return self._replicas

    async def run_heartbeat(self) -> None:
        """Heartbeat every `heartbeat_interval` seconds until cancelled."""
        while True:
            await self.heartbeat()
            await self._sleep(self._heartbeat_interval)

    def _limit(self, credential: str) -> RateLimit:
        try:
            return self._limits[credential]
        except KeyError:
            raise UnknownConnection(
                f"no rate limit is configured for credential {credential!r}"
            ) from None

    def _bucket(self, credential: str) -> Bucket:
        return self._local.get(credential, Bucket())

    def _redis_usable(self, now: float) -> bool:
        """False without Redis, and for a second after it failed; then one call probes it."""
        if self._redis is None or (self._fallback and now < self._retry_redis_at):
            return False
        if self._fallback:
            self._retry_redis_at = now + 1.0  # the other calls stay local meanwhile
        return True

    async def _decide(self, credential: str, limit: RateLimit) -> Admit | Refuse:
        now = self._clock()
        if self._redis is None or not self._redis_usable(now):
            return self._decide_local(credential, limit, now)
        try:
            async with asyncio.timeout(self._redis_timeout):
                raw = await self._redis.budget_admit(
                    credential, limit.interval, limit.burst, limit.max_wait
                )
        except _SHARED_FAILURES as exc:
            self._enter_fallback(exc)
            return self._decide_local(credential, limit, self._clock())
        self._leave_fallback()
        allowed, delay, paused_for, tat_ahead = raw
        now = self._clock()
        # Keep the fleet's state in local terms: the fallback starts from it.
        self._local[credential] = Bucket(now + tat_ahead, now + paused_for)
        self._note_pause(credential, now, paused_for)
        if not allowed:
            return refusal(limit, delay, paused_for)
        return Admit(delay, self._local[credential])

    def _decide_local(self, credential: str, limit: RateLimit, now: float) -> Admit | Refuse:
        share = limit.share(self._replicas) if self._redis is not None else limit
        # The queue was checked in `admit`; the share must not shrink it.
        outcome = decide(self._bucket(credential), now, share)
        if isinstance(outcome, Admit):
            self._local[credential] = outcome.bucket
        self._note_pause(credential, now, self._bucket(credential).pause_until - now)
        return outcome

    def _note_pause(self, credential: str, now: float, paused_for: float) -> None:
        if paused_for > 0:
            until = max(self._paused_until.get(credential, 0.0), now + paused_for)
            self._paused_until[credential] = until
        self._metrics.ratelimit_paused.labels(credential).set(
            1 if self._paused_until.get(credential, 0.0) > now else 0
        )

    def _refused(self, credential: str, limit: RateLimit, refuse: Refuse) -> RateLimited:
        self._metrics.ratelimit_refused.labels(credential).inc()
        retry = math.ceil(refuse.retry_after)
        where = f"credential {credential!r} is limited to {limit.rate:g} requests per second"
        where += f" (burst {limit.burst})"
        if refuse.reason == "paused":
            what = f"Cloudbeds asked to pause credential {credential!r} for {refuse.wait:.1f} s"
        elif refuse.reason == "queue":
            what = f"{where} and {limit.max_queue} requests are already waiting"
        else:
            what = f"{where} and this request would wait {refuse.wait:.1f} s, "
            what += f"more than the {limit.max_wait:g} s allowed"
        return RateLimited(
            f"{what}; retry after {retry} s, or spread requests out",
            retry_after=refuse.retry_after,
        )

    def _enter_fallback(self, exc: BaseException) -> None:
        self._metrics.redis_errors.labels("ratelimit").inc()
        self._retry_redis_at = self._clock() + 1.0
        if not self._fallback:
            self._fallback = True
            log.warning(
                "ratelimit.fallback.local",
                replicas=self._replicas,
                error=type(exc).__name__,
            )

    def _leave_fallback(self) -> None:
        if self._fallback:
            self._fallback = False
            log.info("ratelimit.fallback.ended", replicas=self._replicas)
