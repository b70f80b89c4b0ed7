"""One rate limiter per credential, shared by every replica through Redis (issue 5).

Rules (a generic cell rate algorithm, GCRA, that shapes before it refuses):

- A limit is `rate` requests per second with a `burst`; the emission interval is
  T = 1 / rate. The state per credential is the theoretical arrival time `tat` and
  `pause_until`, both absolute seconds. `rate == 0` turns the limiter off.
- A request at `now` takes the next slot in arrival order:
      base  = max(tat, now, pause_until)
      tat'  = base + T
      slot  = max(tat' - burst * T, pause_until, now)
      delay = slot - now
  so an idle credential lets `burst` requests through at once, then one every T. In any
  one-second window no more than rate + burst requests get a slot.
- A request whose delay is at most `max_wait` is admitted: `tat` becomes tat' and the
  caller sleeps `delay` before sending. Past `max_wait` it is refused at once, `tat` is
  untouched (a refusal consumes no slot), and `retry_after = max(delay - max_wait, T)`
  is the earliest time a retry could be admitted. Times are compared to the
  microsecond (`EPSILON`): float sums of T must not turn a slot into a refusal.
- A pause (Cloudbeds answered 429 or 503 with Retry-After) sets
  `pause_until = max(pause_until, now + seconds)`: no slot starts before it, so every
  request of the credential waits for the pause end or is refused. After the pause the
  bucket is full again (the fleet sent nothing meanwhile).
- At most `max_queue` requests of one credential may be in the limiter (waiting or
  asking) in one process; one more is refused at once. `max_wait` already bounds the
  fleet-wide queue; this bounds the tasks a single process holds.
- With Redis, the rules run in one Lua script per request on Redis' clock
  (`TIME`), so replicas with skewed clocks agree; the script lives in the store
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
from proxy.metrics import Metrics
from proxy.store import SharedBudgets

log = structlog.get_logger(__name__)

Mode = Literal["shared", "local", "local-fallback"]

EPSILON = 1e-6
"""Seconds below which a delay is none; Redis stores times to the microsecond."""


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimit:
    """A credential's limit. `burst` and `max_queue` of 0 mean "derive the default"."""

    rate: float
    burst: int = 0
    max_wait: float = 2.0
    max_queue: int = 0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 0 or self.max_wait < 0 or self.max_queue < 0:
            raise ValueError(f"rate limit values must not be negative: {self}")
        if self.burst == 0:
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate)))
        if self.max_queue == 0:
            object.__setattr__(self, "max_queue", int(self.rate * self.max_wait) + self.burst)

    @property
    def off(self) -> bool:
        return self.rate == 0

    @property
    def interval(self) -> float:
        """Seconds between two slots (T)."""
        return 1.0 / self.rate

    def share(self, replicas: int) -> RateLimit:
        """This replica's even share when the fleet of `replicas` cannot coordinate."""
        n = max(1, replicas)
        return dataclasses.replace(self, rate=self.rate / n, burst=max(1, self.burst // n))


@dataclasses.dataclass(frozen=True, slots=True)
class Bucket:
    tat: float = 0.0
    pause_until: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Admit:
    delay: float
    bucket: Bucket


@dataclasses.dataclass(frozen=True, slots=True)
class Refuse:
    retry_after: float
    reason: Literal["wait", "queue", "paused"]
    wait: float = 0.0


def check_queue(limit: RateLimit, waiting: int) -> Refuse | None:
    """Refuse when this process already holds `max_queue` requests of the credential."""
    if waiting >= limit.max_queue:
        return Refuse(retry_after=limit.interval, reason="queue")
    return None


def refusal(limit: RateLimit, delay: float, paused_for: float) -> Refuse:
    """The refusal for a request whose slot lies `delay` seconds ahead."""
    reason: Literal["wait", "paused"] = "paused" if paused_for > limit.max_wait else "wait"
    return Refuse(max(delay - limit.max_wait, limit.interval), reason, delay)


def decide(bucket: Bucket, now: float, limit: RateLimit, waiting: int = 0) -> Admit | Refuse:
    """Apply the rules at the top of this module to one request."""
    full = check_queue(limit, waiting)
    if full is not None:
        return full
    interval = limit.interval
    new_tat = max(bucket.tat, now, bucket.pause_until) + interval
    slot = max(new_tat - limit.burst * interval, bucket.pause_until, now)
    delay = slot - now if slot - now >= EPSILON else 0.0
    if delay > limit.max_wait + EPSILON:
        return refusal(limit, delay, bucket.pause_until - now)
    return Admit(delay, dataclasses.replace(bucket, tat=new_tat))


def paused(bucket: Bucket, now: float, seconds: float) -> Bucket:
    """The bucket after Cloudbeds asked for a pause of `seconds`."""
    return dataclasses.replace(bucket, pause_until=max(bucket.pause_until, now + seconds))


# Failures that send the limiter to its local fallback: the store's own error (every Redis
# error is translated there) and our own bound on the round trip.
_SHARED_FAILURES = (StoreUnavailable, TimeoutError)


class Limiter:
    """Admits each credential's requests at its rate: shared through Redis, or local."""

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
    ) -> None:
        self._limits = dict(limits)
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

    async def admit(self, credential: str, *, max_wait: float | None = None) -> float:
        """Wait for the credential's next slot; return the seconds waited.

        Raises `RateLimited` when the wait would exceed `max_wait` (the limit's, unless
        given: a token refresh may wait longer than a request) or the queue is full.
        """
        limit = self._limit(credential)
        if limit.off:
            return 0.0
        if max_wait is not None:
            limit = dataclasses.replace(limit, max_wait=max_wait, max_queue=limit.max_queue + 1)
        full = check_queue(limit, self._waiting[credential])
        if full is not None:
            raise self._refused(credential, limit, full)
        self._waiting[credential] += 1
        try:
            outcome = await self._decide(credential, limit)
            if isinstance(outcome, Refuse):
                raise self._refused(credential, limit, outcome)
            if outcome.delay > 0:
                self._metrics.ratelimit_delayed.labels(credential).observe(outcome.delay)
                await self._sleep(outcome.delay)
            else:
                self._metrics.ratelimit_admitted.labels(credential).inc()
            return outcome.delay
        finally:
            self._waiting[credential] -= 1

    async def pause(self, credential: str, seconds: float) -> None:
        """Pause the credential for `seconds` on every replica (locally without Redis)."""
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
