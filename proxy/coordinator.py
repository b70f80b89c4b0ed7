"""Turns refresh decisions into store, lock and token-endpoint calls, one credential each.

- Fast path: `header()` reads the token held in memory; no store round trip.
- One background task per OAuth credential refreshes ahead of expiry (`proxy.refresh`).
- In a process, one refresh in flight that everyone awaits. Across processes, the store's
  lock; the holder re-reads the record before calling Cloudbeds and writes with the
  generation compare-and-set, so a late writer cannot replace a newer token.
- Replicas that did not get the lock watch for the new record (pub/sub, poll) and retry
  the lock about once a second, so a holder that died is replaced once its lock expires.
- Store down: keep serving from memory, refresh without the lock (once per process), and
  write the record back when the store returns; a returned refresh token is never lost.

This module is longer than our 300-line habit on purpose: the request path, the refresh
loop and the store writes all read and replace one record and wake on one event, and
splitting them would spread one state machine over several files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from typing import Any

import aiohttp
import structlog

from proxy import cloudbeds
from proxy.clock import Clock
from proxy.config import CredentialSettings, Kind, Settings
from proxy.credentials import Listener, TokenGate
from proxy.errors import (
    ConnectionDisconnected,
    NoUsableToken,
    ProxyError,
    ReauthorizationRequired,
    RecordUnreadable,
    StoreBusy,
    StoreUnavailable,
    TokenEndpointUnavailable,
    TokenEndpointUnrecognised,
    TokenRejected,
)
from proxy.events import Event, EventType, new_event
from proxy.logs import hold_secrets, register_secret
from proxy.metrics import Metrics
from proxy.pacing import Pacer
from proxy.refresh import (
    DEFAULT_LIFETIME,
    Action,
    Decision,
    RefreshPolicy,
    backoff,
    decide,
    force_at,
    pace_limit,
    phase,
    refreshed,
)
from proxy.store import TokenStore
from proxy.tokens import (
    Outcome,
    State,
    TokenRecord,
    Write,
    granted_after,
    rebased,
    resolve,
    seed_record,
)

log = structlog.get_logger("proxy.coordinator")


def _long_backoff(policy: RefreshPolicy) -> RefreshPolicy:
    """Backoff after a 4xx without an OAuth error body: from 30 s, up to 15 minutes."""
    return dataclasses.replace(policy, backoff_base=30.0, backoff_cap=900.0)


_UNREADABLE_RECHECK = 60.0
"""Seconds between two looks at a connection whose stored record this replica cannot read."""
_LOCK_MARGIN = 1.0
"""Seconds of the lock kept spare after the token call's own timeout."""


class OAuthCredential:
    """An OAuth credential whose access token is shared through the store."""

    def __init__(
        self,
        settings: CredentialSettings,
        proxy_settings: Settings,
        *,
        store: TokenStore,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Clock,
        gate: TokenGate | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.name, self.settings = settings.name, settings
        self._proxy = proxy_settings
        self._store, self._session, self._metrics, self._clock = store, session, metrics, clock
        self._gate, self._pacer = gate, pacer
        # A connection of an app is refreshed on the fleet's grid, ahead only while it is
        # used; a configured credential as it always was, ahead at expires_at - leeway -
        # jitter (readiness and the single-credential setup depend on it).
        self._policy = RefreshPolicy(
            leeway=proxy_settings.refresh_leeway,
            grid=settings.app is not None,
            on_use=settings.app is not None,
            idle_after=proxy_settings.refresh_idle_after,
            keepalive=proxy_settings.keepalive_interval,
        )
        self._place = phase(self.name)
        self._jitter = random.random()  # noqa: S311 - spreading load, not security
        self._last_used: float | None = None
        """When a request last asked for the header here (the clock's time)."""
        self._idle = False
        """The refresher sleeps until a keep-alive or a use: the next use wakes it."""
        self.record: TokenRecord | None = None
        self.listener: Listener | None = None
        self._header: tuple[str, str] | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._inflight: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._attempt = 0
        self.pending: set[str] = set()
        self._kept: TokenRecord | None = None
        self._unsaved_events: tuple[Event, ...] = ()
        self._unsaved_write = Write.REFRESH
        self._lock_until = 0.0
        self.unreadable: str | None = None
        """Why the stored record cannot be read (wrong key, corruption), while it cannot."""
        self.last_error: str | None = None
        # Metric series are per budget: one per configured credential, and a connection of
        # an app counts under the app (series per connection would grow with installs).
        self._series = settings.budget
        if settings.app is None:
            metrics.token_expires_in.labels(self.name).set_function(self._seconds_left)

    # -- the request path ---------------------------------------------------------------

    @property
    def properties(self) -> tuple[str, ...]:
        learned = self.record.properties if self.record else ()
        return self.settings.properties + tuple(
            p for p in learned if p not in self.settings.properties
        )

    async def header(self) -> tuple[str, str]:
        if self.unreadable is not None:
            raise RecordUnreadable(self.unreadable)
        now = self._last_used = self._clock()
        if self._idle:
            self._wake.set()  # used again: the refresher plans ahead from now on
        record, header = self.record, self._header
        if header is not None and record is not None and now < record.expires_at:
            return header
        return await self._wait_for_token()

    async def _wait_for_token(self) -> tuple[str, str]:
        deadline = asyncio.get_running_loop().time() + self._proxy.wait_for_token
        while True:
            record = self.record
            if record is not None and record.usable(self._clock()) and self._header:
                return self._header
            self._raise_if_hopeless(record)
            self._wake.set()
            changed = self._changed
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise NoUsableToken(
                    f"credential {self.name!r} has no valid access token yet: a refresh is "
                    f"in progress or failing ({self.last_error or 'no detail'}); retry shortly"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await changed.wait()

    def _raise_if_hopeless(self, record: TokenRecord | None) -> None:
        if record is not None and record.state is State.DISCONNECTED:
            raise ConnectionDisconnected(
                f"connection {self.name!r} was disconnected; the property must install the "
                "app again before requests can use it"
            )
        if record is not None and record.state is State.REAUTHORIZATION_REQUIRED:
            if self.settings.app is not None:
                raise ReauthorizationRequired(
                    f"Cloudbeds rejected the refresh token of connection {self.name!r}; the "
                    f"property must install the app again (/_proxy/apps/{self.settings.app}"
                    "/install), or import a new refresh token through the admin API"
                )
            raise ReauthorizationRequired(
                f"Cloudbeds rejected the refresh token of credential {self.name!r}; "
                "re-authorise: open /_proxy/oauth/start or run "
                "'cloudbeds-proxy auth exchange', or set a new CBPROXY_REFRESH_TOKEN"
            )
        if record is None or record.refresh_token is None:
            raise NoUsableToken(
                f"credential {self.name!r} is not authorised yet: open /_proxy/oauth/start, "
                "run 'cloudbeds-proxy auth exchange', or set CBPROXY_REFRESH_TOKEN",
                retry_after=60,
            )

    async def rejected(self, header: tuple[str, str]) -> bool:
        record = self.record
        if record is not None and header == self._header:
            at = force_at(record, self._policy)
            if at is not None and await self._until(at, record):
                await self._single_flight(force_generation=record.generation)
        return self._header is not None and header != self._header and self._usable()

    async def _until(self, at: float, record: TokenRecord) -> bool:
        """Wait until `at` (the storm guard lifts), bounded by CBPROXY_WAIT_FOR_TOKEN.

        False when `at` lies beyond the bound, or when another record arrived meanwhile:
        the newer token is the answer then, no refresh is needed.
        """
        loop = asyncio.get_running_loop()
        bound = self._proxy.wait_for_token
        if at - self._clock() > bound:
            return False
        deadline = loop.time() + bound
        while self._clock() < at:
            remaining = deadline - loop.time()
            if self.record is not record or remaining <= 0:
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, at - self._clock(), 0.05)):
                    await changed.wait()
        return self.record is record

    def _usable(self) -> bool:
        return self.record is not None and self.record.usable(self._clock())

    # -- adopting records -----------------------------------------------------------------

    def adopt(self, record: TokenRecord, *, force: bool = False) -> bool:
        """Make `record` the one in memory if it is newer (or `force`); wake waiters."""
        current = self.record
        if not force and current is not None and record.generation <= current.generation:
            return False
        self.record = record
        if self.listener is not None:
            self.listener(self.name, self.properties)
        # Tokens from this process's refreshes and from other replicas alike: never logged.
        # The newest are searched for anywhere in a line; every one is looked up by word
        # while it is held and while it could still be used: an access token until it
        # expires, a refresh token one lifetime more (once rotated, Cloudbeds refuses it).
        register_secret(record.access_token)
        register_secret(record.refresh_token)
        life = record.expires_at - self._clock()
        hold_secrets(f"{self.name} access", record.access_token, usable_for=life)
        hold_secrets(self.name, record.refresh_token, usable_for=life + DEFAULT_LIFETIME)
        self._header = (
            ("Authorization", f"Bearer {record.access_token}") if record.access_token else None
        )
        if self.settings.app is None:
            for state in State:
                self._metrics.credential_state.labels(self.name, state.value).set(
                    1 if record.state is state else 0
                )
        self._retry_at, self._attempt = 0.0, 0
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._wake.set()
        return True

    async def reload(self) -> None:
        """Re-read the store; write back a record the store missed while it was down."""
        if self._unsaved is not None:
            await self._save(self._unsaved, write=self._unsaved_write, events=self._unsaved_events)
        try:
            stored = await self._store.load(self.name)
        except RecordUnreadable as exc:
            self._unreadable_record(exc)
            return
        if self.unreadable is not None:
            log.info("store.record_readable", credential=self.name)
            self.unreadable = None
        if stored is not None:
            self.adopt(stored)

    def _unreadable_record(self, exc: RecordUnreadable) -> None:
        """Stop using the connection: no token call and no write until its record reads."""
        if self.unreadable is None:
            log.error("store.record_unreadable", credential=self.name, reason=exc.message)
        self.unreadable = exc.message
        self._changed.set()

    @property
    def unsaved(self) -> bool:
        return self._unsaved is not None

    @property
    def _unsaved(self) -> TokenRecord | None:
        """A record the store has not taken yet (written back by `reload`)."""
        return self._kept

    @_unsaved.setter
    def _unsaved(self, record: TokenRecord | None) -> None:
        self._kept = record
        (self.pending.discard if record is None else self.pending.add)(self.name)

    def keep(self, record: TokenRecord, write: Write, events: tuple[Event, ...]) -> None:
        """Serve `record`, which the store could not take, and write it when it returns."""
        self.adopt(record, force=True)
        self._unsaved, self._unsaved_events, self._unsaved_write = record, events, write
        log.warning("token.write.deferred", credential=self.name, generation=record.generation)

    async def start(self, record: TokenRecord | None = None) -> None:
        """Load the stored record, seeding or recovering it from CBPROXY_REFRESH_TOKEN.

        `record`: the stored record as the caller just read it (a page of the registry's
        load), so that it is not read a second time.
        """
        try:
            stored = record if record is not None else await self._store.load(self.name)
        except StoreUnavailable as exc:
            log.warning("store.unavailable.at_start", credential=self.name, error=exc.message)
            stored = None
        except RecordUnreadable as exc:
            self._unreadable_record(exc)
            return
        seed = self.settings.refresh_token
        if stored is not None:
            self.adopt(stored)
        if seed and (stored is None or _recovers(stored, seed)):
            generation = stored.generation if stored else 0
            # The old access token died with the rejected grant: refresh at once.
            base = stored or seed_record(seed, generation)
            record = base.successor(
                access_token=None, expires_at=0.0, refresh_token=seed, state=State.OK
            )
            if stored is not None:
                log.info("token.reseeded", credential=self.name, generation=record.generation)
            self.adopt(record)
            await self._save(record)

    async def install(self, response: cloudbeds.TokenResponse) -> TokenRecord:
        """Store tokens from an authorization-code exchange (callback or CLI)."""
        try:
            stored = await self._store.load(self.name)
        except StoreUnavailable:
            stored = None
        base = max(
            (r for r in (stored, self.record) if r is not None),
            key=lambda r: r.generation,
            default=TokenRecord(None, 0.0, None, 0),
        )
        record = refreshed(
            base,
            self._clock(),
            access_token=response.access_token,
            expires_in=response.expires_in,
            refresh_token=response.refresh_token,
            properties=response.properties,
        )
        self.adopt(record)
        await self._save(record, write=Write.AUTHORIZATION)
        installed = self.record or record  # one generation up if it had to be rewritten
        log.info("token.authorized", credential=self.name, generation=installed.generation)
        return installed

    async def _save(
        self,
        record: TokenRecord,
        *,
        write: Write = Write.REFRESH,
        events: tuple[Event, ...] = (),
        rebase: bool = True,
    ) -> None:
        """Write `record` (with `events`); if the store refused it, `resolve` decides.

        Until the store has answered both the write and, after a refusal, what it holds
        instead, the record stays unsaved and the poll writes it again: a grant is never
        dropped because the store went away between the two calls, nor because a master
        took it that no replica has yet (WriteNotReplicated is a StoreUnavailable).
        """
        if self.unreadable is not None:
            return  # the record that is there may be the only copy of a grant: never over it
        try:
            written = await self._store.put(self.name, record, events=events)
            stored = None if written else await self._store.load(self.name)
        except RecordUnreadable as exc:
            self._unreadable_record(exc)
            return
        except StoreUnavailable as exc:
            self._metrics.redis_errors.labels("put").inc()
            self._unsaved, self._unsaved_events, self._unsaved_write = record, events, write
            log.warning(
                "token.write.deferred",
                credential=self.name,
                generation=record.generation,
                reason=exc.code,
            )
            return
        if self._unsaved is record:
            self._unsaved = None  # only this record: a newer one may have failed meanwhile
        if stored is None or stored == record:
            return  # written; or an earlier write of this very record had landed
        outcome = resolve(record, stored, write)
        if outcome is Outcome.REBASE and not rebase:
            # Refused twice in a row: keep it for the poll to write again, never drop it.
            self._unsaved, self._unsaved_events, self._unsaved_write = record, events, write
            return
        if outcome is Outcome.REBASE:
            # Written once more, one generation up; `rebase=False` bounds it to once here.
            on_top = rebased(record, stored)
            if stored.state is State.REAUTHORIZATION_REQUIRED and self._proxy.events_url:
                # The refusal landed first and told the receiver; this grant undoes it.
                view = on_top.view(self.name)
                events = (*events, new_event(EventType.RECOVERED, view, self._clock()))
            log.warning(
                "token.write.rebased",
                credential=self.name,
                stored=stored.generation,
                generation=on_top.generation,
            )
            self.adopt(on_top)
            await self._save(on_top, write=write, events=events, rebase=False)
            return
        self._metrics.lock_losses.labels(self._series).inc()
        log.info("token.write.superseded", credential=self.name, stored=stored.generation)
        self.adopt(stored, force=True)

    # -- background refresh -----------------------------------------------------------------

    async def run(self) -> None:
        """Refresh ahead of expiry, forever; cancelled at shutdown."""
        while True:
            self._wake.clear()
            if self.unreadable is not None:
                # No token call and no write while the stored record cannot be read: wait
                # for a change (a reload that reads it), looking again once a minute.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_UNREADABLE_RECHECK):
                        await self._wake.wait()
                continue
            decision = self._decide(self.record, retry_at=self._retry_at)
            self._idle = decision.action is Action.IDLE
            if decision.action is Action.REFRESH:
                if decision.keepalive:
                    log.info("token.keepalive.due", credential=self.name)
                if not await self._paced():
                    continue
                try:
                    await self._single_flight(force_generation=None)
                except Exception as exc:  # a bug must not end refreshing for good
                    log.exception("token.refresh.crashed", credential=self.name)
                    self._transient_failure(TokenEndpointUnavailable(type(exc).__name__))
                continue
            timeout = None
            if decision.action in (Action.WAIT, Action.IDLE) and math.isfinite(decision.at):
                timeout = decision.at - self._clock()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _paced(self) -> bool:
        """Wait for this replica's pacing slot if the token is still valid (`proxy.pacing`);
        False when, meanwhile, the refresh is no longer due (another replica made it)."""
        record, now = self.record, self._clock()
        if self._pacer is None or record is None or not record.usable(now):
            return True
        await self._pacer.wait(pace_limit(record, self._policy, now))
        return self._decide(self.record, retry_at=self._retry_at).action is Action.REFRESH

    def _decide(self, record: TokenRecord | None, *, retry_at: float = 0.0) -> Decision:
        return decide(
            record,
            self._clock(),
            self._policy,
            place=self._place,
            offset=self._jitter,
            retry_at=retry_at,
            last_used=self._last_used,
        )

    async def refresh_now(self) -> TokenRecord | None:
        """Force one refresh through the lock (the `token refresh` command)."""
        record = self.record
        if record is not None:
            await self._single_flight(force_generation=record.generation)
        return self.record

    async def stop(self, timeout: float) -> None:
        """At shutdown: let a refresh in flight finish within `timeout`, then cancel it.

        Finishing keeps what Cloudbeds returned (a rotated refresh token is not lost);
        cancelling runs the refresh's `finally`, which releases the lock at once rather
        than leaving it to expire while other replicas wait.
        """
        # No longer held: its tokens stay redacted only while they could still be used.
        hold_secrets(f"{self.name} access")
        hold_secrets(self.name)
        task = self._inflight
        if task is None or task.done():
            return
        await asyncio.wait({task}, timeout=max(timeout, 0.0))
        if not task.done():
            log.warning("token.refresh.abandoned", credential=self.name, reason="shutdown")
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _single_flight(self, *, force_generation: int | None) -> None:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._refresh(force_generation))
        await asyncio.shield(self._inflight)

    async def _refresh(self, force_generation: int | None) -> None:
        lock = self._store.lock(self.name, self._proxy.lock_ttl)
        # The lock lives lock_ttl from now: the wait for a slot and the call fit inside it.
        self._lock_until = asyncio.get_running_loop().time() + self._proxy.lock_ttl
        try:
            acquired = await lock.acquire()
        except StoreUnavailable as exc:
            self._metrics.redis_errors.labels("lock").inc()
            busy = isinstance(exc, StoreBusy)
            if busy or (force_generation is None and not self._must_refresh_alone()):
                # A store that answers late (StoreBusy) is there: another replica may hold
                # the lock, so never refresh without it; try again after the backoff. One
                # that does not answer may be busy too: while the token has time left, the
                # same. Refreshing unlocked on every replica at once is the duplicate call
                # the lock exists to prevent.
                self._transient_failure(
                    TokenEndpointUnavailable(
                        "the store was busy for the refresh lock"
                        if busy
                        else "the store did not answer for the refresh lock"
                    )
                )
                return
            log.warning("token.refresh.without_lock", credential=self.name)
            await self._refresh_locked(force_generation, reread=False)
            return
        if not acquired:
            self._metrics.lock_waits.labels(self._series).inc()
            await self._await_other_replica()
            return
        try:
            await self._refresh_locked(force_generation, reread=True)
        finally:
            with contextlib.suppress(StoreUnavailable):
                await lock.release()

    def _must_refresh_alone(self) -> bool:
        """True when the token is too close to its expiry to wait for the store any longer:
        within the lock's lifetime, or half the leeway, whichever is longer."""
        record = self.record
        if record is None or record.access_token is None:
            return True
        margin = max(self._proxy.lock_ttl, self._policy.leeway / 2)
        return record.seconds_left(self._clock()) <= margin

    async def _await_other_replica(self) -> None:
        """Another replica holds the lock: watch for its record; retry the lock after a beat."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5 + self._jitter):
                await changed.wait()
        if not changed.is_set():
            with contextlib.suppress(StoreUnavailable):
                await self.reload()

    async def _refresh_locked(self, force_generation: int | None, *, reread: bool) -> None:
        if reread:
            with contextlib.suppress(StoreUnavailable):
                await self.reload()
        if self.unreadable is not None:
            return
        record = self.record
        if record is None or record.refresh_token is None:
            return
        due = self._decide(record).action is Action.REFRESH
        if not due and force_generation != record.generation:
            return  # another replica refreshed while we waited for the lock
        if record.state is not State.OK:
            return
        await self._call_token_endpoint(record, forced=not due)

    async def _call_token_endpoint(self, record: TokenRecord, *, forced: bool) -> None:
        assert record.refresh_token is not None
        settings = self.settings
        assert settings.client_id is not None
        assert settings.client_secret is not None
        form = cloudbeds.refresh_form(
            settings.client_id, settings.client_secret, record.refresh_token
        )
        if self._gate is not None:
            spare = self._lock_until - asyncio.get_running_loop().time()
            try:
                await self._gate(
                    settings.token_budget,
                    self.name,
                    max(0.0, spare - self._proxy.token_timeout - _LOCK_MARGIN),
                )
            except ProxyError as exc:  # rate limited: try again once the budget allows
                self._transient_failure(TokenEndpointUnavailable(exc.message))
                return
        started = self._clock()
        log.info("token.refresh.started", credential=self.name, generation=record.generation)
        try:
            with self._metrics.refresh_duration.labels(self._series).time():
                response = await cloudbeds.send_token_request(
                    self._session, self._proxy.token_url, form, self._proxy.token_timeout
                )
        except TokenRejected as exc:
            await self._rejected_by_cloudbeds(record, exc)
            return
        except TokenEndpointUnavailable as exc:
            self._transient_failure(exc)
            return
        new = refreshed(
            record,
            started,
            access_token=response.access_token,
            expires_in=response.expires_in,
            refresh_token=response.refresh_token,
            properties=response.properties,
            forced=forced,
        )
        self._metrics.refreshes.labels(self._series, "ok").inc()
        self.last_error = None
        self.adopt(new)
        log.info(
            "token.refresh.ok",
            credential=self.name,
            generation=new.generation,
            expires_in=response.expires_in,
        )
        await self._save(new)

    async def _rejected_by_cloudbeds(self, record: TokenRecord, exc: TokenRejected) -> None:
        newer = await self._newer_than(record)
        if newer is not None:
            # Another replica refreshed while this call was in flight (this one's lock had
            # expired), or this process holds a grant the store lost in a failover: the
            # refusal is of a refresh token that is no longer the current one.
            log.info(
                "token.refresh.rejected.superseded",
                credential=self.name,
                reason=exc.reason,
                generation=newer.generation,
            )
            # Forced: a later grant may carry a lower generation than the record refused (a
            # failover lost it); kept unsaved, its write-back rebases it (`resolve`).
            self.adopt(newer, force=True)
            return
        self._metrics.refreshes.labels(self._series, "rejected").inc()
        self.last_error = exc.reason
        log.error(
            "token.refresh.rejected",
            credential=self.name,
            status=exc.status,
            reason=exc.reason,
            action="re-authorise: /_proxy/oauth/start or auth exchange",
        )
        blocked = record.successor(state=State.REAUTHORIZATION_REQUIRED, updated_at=self._clock())
        self.adopt(blocked)
        # The event goes with the write: only the replica whose write lands reports it.
        view = blocked.view(self.name)
        event = new_event(EventType.REAUTHORIZATION_REQUIRED, view, self._clock())
        await self._save(blocked, events=(event,) if self._proxy.events_url else ())

    async def _newer_than(self, record: TokenRecord) -> TokenRecord | None:
        """A record newer than `record`, in memory or in the store, if there is one.

        Newer is a later generation, or a grant of a later refresh token (`granted_after`):
        a grant this process holds unsaved may have a lower generation than a record that a
        failover brought back and that was written on since.
        """
        unsaved = self._unsaved
        if unsaved is not None and (
            unsaved.generation > record.generation or granted_after(unsaved, record)
        ):
            return unsaved
        current = self.record
        if current is not None and current.generation > record.generation:
            return current
        with contextlib.suppress(StoreUnavailable, RecordUnreadable):
            stored = await self._store.load(self.name)
            if stored is not None and (
                stored.generation > record.generation or granted_after(stored, record)
            ):
                return stored
        return None

    def _transient_failure(self, exc: TokenEndpointUnavailable) -> None:
        # A 4xx that is not an OAuth error (a load balancer's page) is not Cloudbeds'
        # verdict, so the credential is not locked; but it is not a blip either: back off
        # long and alert, so a human looks before the token runs out.
        unrecognised = isinstance(exc, TokenEndpointUnrecognised)
        outcome = "unrecognised_4xx" if unrecognised else "transient"
        self._metrics.refreshes.labels(self._series, outcome).inc()
        self.last_error = exc.reason
        policy = _long_backoff(self._policy) if unrecognised else self._policy
        delay = backoff(self._attempt, policy, random.random())  # noqa: S311
        self._attempt += 1
        self._retry_at = self._clock() + delay
        (log.error if unrecognised else log.warning)(
            "token.refresh.unrecognised_answer" if unrecognised else "token.refresh.failed",
            credential=self.name,
            reason=exc.reason,
            status=exc.status,
            retry_in=round(delay, 2),
            attempt=self._attempt,
        )

    # -- status -------------------------------------------------------------------------------

    def _seconds_left(self) -> float:
        return self.record.seconds_left(self._clock()) if self.record else 0.0

    def ready(self) -> tuple[bool, str]:
        record = self.record
        if self.unreadable is not None:
            return False, f"store_unreadable: {self.unreadable}"
        if record is None or record.refresh_token is None:
            return False, "not authorised"
        if record.state is not State.OK:
            return False, record.state.value
        if not record.usable(self._clock()):
            return False, "no valid access token"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        record, now = self.record, self._clock()
        return {
            "kind": Kind.OAUTH.value,
            "state": "store_unreadable"
            if self.unreadable
            else (record.state.value if record else "not_authorized"),
            "generation": record.generation if record else None,
            "expires_at": record.expires_at if record and record.access_token else None,
            "expires_in": round(record.seconds_left(now), 1) if record else None,
            "last_refresh": record.refreshed_at if record else None,
            "has_refresh_token": bool(record and record.refresh_token),
            "properties": list(self.properties),
            "last_error": self.last_error,
            "unsaved": self.unsaved,
        }


def _recovers(stored: TokenRecord, seed: str) -> bool:
    """A seed replaces a stored record only if that record was rejected with another token."""
    return stored.state is State.REAUTHORIZATION_REQUIRED and stored.refresh_token != seed
