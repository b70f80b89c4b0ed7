"""Delivering connection events: the shell around `proxy.events`.

Rules (DESIGN.md, "Events"):

- Only the replica holding the store's outbox lease delivers. The lease lives
  `LEASE_TTL` seconds and is renewed at every poll and before every POST; a POST's
  timeout is a third of the TTL, so the holder renews well before the lease lapses. A
  replica that dies stops renewing, and another takes over when the lease lapses: an
  event whose POST was in flight is sent again, so delivery is at least once.
- Idle cost does not grow with the number of connections: one lease call and one
  `outbox_pending` read per poll interval (the lease holder only). A write of events on
  this replica wakes the loop at once (`wake`); after a round that delivered something
  the loop looks again at once, since `deliverable` gives one event per connection.
- A 2xx answer is delivered (`outbox_done`). Any other status, a timeout or a connection
  error is a failure: the event is rescheduled by `proxy.events.retry` (`outbox_retry`),
  or, 24 hours after it occurred, dropped with an error log.
- Per connection in order: an event waits while an earlier one of its connection is
  undelivered (`proxy.events.deliverable`). Events of different connections are POSTed
  concurrently, at most `CONCURRENCY` at a time.
- The aiohttp session is handed in; time is the app's clock. Logs name the event, its
  type and connection, never the secret, the signature or the URL (it may hold a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import uuid
from collections.abc import Callable

import aiohttp
import structlog

from proxy.clock import Clock
from proxy.errors import StoreUnavailable
from proxy.events import SIGNATURE_HEADER, Event, deliverable, retry, sign
from proxy.metrics import Metrics
from proxy.store import TokenStore

log = structlog.get_logger("proxy.delivery")

LEASE_TTL = 15.0
"""Seconds the outbox lease lives without renewal: how long a dead holder delays events."""
POLL_INTERVAL = 1.0
BATCH = 100
"""Events read per poll."""
CONCURRENCY = 8
"""POSTs in flight at once (of different connections)."""


def replica_id() -> str:
    """Who holds the lease, as the store shows it: host, process and a random tail."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Delivery:
    """The background task that POSTs outbox events to CBPROXY_EVENTS_URL."""

    def __init__(
        self,
        store: TokenStore,
        session: aiohttp.ClientSession,
        *,
        url: str,
        secret: str,
        metrics: Metrics,
        clock: Clock,
        owner: str | None = None,
        poll_interval: float | None = None,
        lease_ttl: float = LEASE_TTL,
        timeout: float | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store, self._session, self._url, self._secret = store, session, url, secret
        self._metrics, self._clock, self._jitter = metrics, clock, jitter
        self.owner = owner or replica_id()
        self._poll_interval = poll_interval if poll_interval is not None else POLL_INTERVAL
        self._lease_ttl = lease_ttl
        # A POST may take a third of the lease's life in all (connect, send, answer).
        post_timeout = timeout if timeout is not None else lease_ttl / 3
        self._timeout = aiohttp.ClientTimeout(total=post_timeout)
        self._woken = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self.holding = False
        self._store_ok = True

    def wake(self) -> None:
        """Events were just written here: look at the outbox now, not at the next poll."""
        self._woken.set()

    async def run(self) -> None:
        """Forever: deliver while holding the lease, waiting a poll interval between rounds."""
        while True:
            busy = False
            try:
                busy = await self.round()
                self._store_back()
            except StoreUnavailable:
                self._store_lost()
            except Exception:
                # A bug must not end delivery for good; the next poll tries again.
                log.exception("events.crashed")
            if not busy:
                await self._idle()

    async def round(self) -> bool:
        """One poll: deliver what is due; True when something was delivered."""
        if not await self._lease():
            self._metrics.events_pending.set(0)
            return False
        pending = await self._store.outbox_pending(BATCH)
        self._metrics.events_pending.set(len(pending))
        due = deliverable(pending, self._clock())
        # Every POST of the round finishes (or fails) before a store error goes up.
        results = await asyncio.gather(*(self._slot(e) for e in due), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return any(result is True for result in results)

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll_interval):
                await self._woken.wait()
        self._woken.clear()

    async def _lease(self) -> bool:
        held = await self._store.outbox_lease(self.owner, self._lease_ttl)
        if held != self.holding:
            log.info("events.lease_taken" if held else "events.lease_lost", owner=self.owner)
            self.holding = held
        return held

    async def _slot(self, event: Event) -> bool:
        async with self._slots:
            # Renewed before each POST: a slow round must not outlive the lease. A store
            # error after the POST leaves the event pending: it is sent again (at least once).
            return await self._lease() and await self.deliver(event)

    async def deliver(self, event: Event) -> bool:
        """POST one event and record the outcome; True when the receiver took it."""
        now = self._clock()
        body = event.body()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, body, int(now)),
        }
        status, reason = await self._post(body, headers)
        facts = {
            "event_id": event.id,
            "type": event.type.value,
            "connection": event.connection_id,
            "attempts": event.attempts + 1,
        }
        if status is not None and 200 <= status < 300:
            await self._store.outbox_done(event.id)
            self._metrics.event_deliveries.labels("delivered").inc()
            log.info("events.delivered", status=status, **facts)
            return True
        later = retry(event, self._clock(), self._jitter())
        if later is None:
            await self._store.outbox_done(event.id)
            self._metrics.event_deliveries.labels("dropped").inc()
            log.error("events.dropped", reason=reason, status=status, **facts)
            return False
        await self._store.outbox_retry(later)
        self._metrics.event_deliveries.labels("failed").inc()
        log.warning(
            "events.delivery_failed",
            reason=reason,
            status=status,
            retry_in=round(later.next_at - self._clock(), 3),
            **facts,
        )
        return False

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        """(status, reason) of one POST; a timeout or a broken connection has no status."""
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,  # a redirect is not a delivery
            ) as response:
                return response.status, f"status {response.status}"
        except TimeoutError:
            return None, "timeout"
        except aiohttp.ClientError as exc:
            # The exception's text may name the URL, which may hold a token: only its class.
            return None, f"unreachable ({type(exc).__name__})"

    def _store_lost(self) -> None:
        self._metrics.redis_errors.labels("outbox").inc()
        if self._store_ok:
            log.warning("events.store_unavailable", action="delivery waits for the store")
        self._store_ok = False

    def _store_back(self) -> None:
        if not self._store_ok:
            log.info("events.store_available")
        self._store_ok = True
