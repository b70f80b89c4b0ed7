"""The rate limiter's rules: a generic cell rate algorithm (GCRA) that shapes before it
refuses, and how an app's limit splits. Pure: it awaits nothing (`proxy.ratelimit` runs
it, in process or, through the store, in Redis).

- A limit is `rate` requests per second with a `burst`; the emission interval is
  T = 1 / rate. The state per budget is the theoretical arrival time `tat` and
  `pause_until`, both absolute seconds. `rate == 0` turns the limiter off.
- A request at `now` takes the next slot in arrival order:
      base  = max(tat, now, pause_until)
      tat'  = base + T
      slot  = max(tat' - burst * T, pause_until, now)
      delay = slot - now
  so an idle budget lets `burst` requests through at once, then one every T. In any
  one-second window no more than rate + burst requests get a slot.
- A request whose delay is at most `max_wait` is admitted: `tat` becomes tat' and the
  caller sleeps `delay` before sending. Past `max_wait` it is refused at once, `tat` is
  untouched (a refusal consumes no slot), and `retry_after = max(delay - max_wait, T)`
  is the earliest time a retry could be admitted. Times are compared to the
  microsecond (`EPSILON`): float sums of T must not turn a slot into a refusal.
- An app's limit splits in two budgets (`split`): requests at (1 - share) * rate and
  token calls at share * rate, the app's burst divided between them (each at least 1,
  the sum the app's burst), so the two together stay within rate + burst in any second
  and requests always have the rest when refreshes pile up. A share of 0 keeps one
  budget for both.
- A pause (Cloudbeds answered 429 or 503 with Retry-After) sets
  `pause_until = max(pause_until, now + seconds)`: no slot starts before it. After the
  pause the bucket is full again (the fleet sent nothing meanwhile).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

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


def next_slot(bucket: Bucket, now: float, limit: RateLimit) -> tuple[float, float]:
    """(delay, tat') of the budget's next slot, by the rules at the top of this module."""
    interval = limit.interval
    new_tat = max(bucket.tat, now, bucket.pause_until) + interval
    slot = max(new_tat - limit.burst * interval, bucket.pause_until, now)
    return (slot - now if slot - now >= EPSILON else 0.0), new_tat


def decide(bucket: Bucket, now: float, limit: RateLimit, waiting: int = 0) -> Admit | Refuse:
    """Apply the rules at the top of this module to one request."""
    full = check_queue(limit, waiting)
    if full is not None:
        return full
    delay, new_tat = next_slot(bucket, now, limit)
    if delay > limit.max_wait + EPSILON:
        return refusal(limit, delay, bucket.pause_until - now)
    return Admit(delay, dataclasses.replace(bucket, tat=new_tat))


def paused(bucket: Bucket, now: float, seconds: float) -> Bucket:
    """The bucket after Cloudbeds asked for a pause of `seconds`."""
    return dataclasses.replace(bucket, pause_until=max(bucket.pause_until, now + seconds))


def split(limit: RateLimit, share: float) -> tuple[RateLimit, RateLimit]:
    """An app's limit as (requests, token calls): `share` of the rate for token calls, the
    rest for requests; the burst divided so that each has at least 1 and the two sum to
    the app's burst (token calls get `share` of it, rounded half up)."""
    if not 0 < share < 1:
        raise ValueError(f"a token share is a fraction between 0 and 1, not {share}")
    if limit.burst < 2:
        raise ValueError(f"a burst of {limit.burst} cannot be split: each part needs 1")
    token_burst = min(limit.burst - 1, max(1, math.floor(limit.burst * share + 0.5)))
    token_rate = limit.rate * share
    return (
        RateLimit(limit.rate - token_rate, limit.burst - token_burst, limit.max_wait),
        RateLimit(token_rate, token_burst, limit.max_wait),
    )


HORIZON = 0.25
"""The share of an interval ahead within which a slot counts as due now."""


def horizon(limit: RateLimit) -> RateLimit:
    """The limit a slot due now is asked for with (by a queue's dispatcher, and by a
    connection's further request while nobody is queued): a slot is taken only when it is
    due within a quarter interval. A dispatcher that reserved a whole interval ahead
    would ask again the moment its slot came and always find the next one free, starving
    the replicas that wait for theirs; asked this close, every replica with a queue wakes
    when a slot is due and the first to ask takes it."""
    return dataclasses.replace(limit, max_wait=min(limit.interval * HORIZON, limit.max_wait))


def expected_wait(limit: RateLimit, delay: float, ahead: int) -> float:
    """Seconds a request waits: the budget's next slot `delay` away, then `ahead` slots
    handed out to others (and its own connection's earlier waiters) one interval apart."""
    return delay + ahead * limit.interval
