"""What the request path needs from a connection's credential, and the static API-key kind.

OAuth credentials, which refresh and share their token, live in `proxy.coordinator`.

An API key never refreshes, but Cloudbeds expires one unused for 30 days, so an idle key
is kept alive (with a `KeepAlive`): between half a `CBPROXY_KEEPALIVE_INTERVAL` and one
after its last use in the fleet (`store.last_used`, read once when the local timer fires),
at the connection's phase (`proxy.refresh.keepalive_after`; the first look is within an
hour of start, after its first minute, so restarts never postpone it), one replica makes a
cheap authenticated call (`GET {upstream}/api/v1.3/getHotels` with `x-api-key`) under the
store's lock for the connection, through the same rate gate as token calls, and records
it as a use (`store.touch`). A failure is retried with backoff and logged without the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import structlog

from proxy import cloudbeds
from proxy.clock import Clock
from proxy.config import CredentialSettings
from proxy.errors import (
    ConnectionDisconnected,
    NoUsableToken,
    ProxyError,
    RecordUnreadable,
    StoreUnavailable,
    TokenEndpointError,
    TokenEndpointUnavailable,
)
from proxy.events import Event
from proxy.logs import hold_secrets, register_secret
from proxy.refresh import RefreshPolicy, backoff, grid_point, keepalive_after, phase
from proxy.store import TokenStore, held
from proxy.tokens import Kind, Outcome, State, TokenRecord, Write, rebased, resolve

log = structlog.get_logger("proxy.credentials")
Listener = Callable[[str, tuple[str, ...]], None]
"""Told (connection id, properties) whenever a credential adopts a record."""
TokenGate = Callable[[str, str, float], Awaitable[object]]
"""Awaited before each token call (and keep-alive) with (budget, connection, longest wait):
the rate limiter, since Cloudbeds counts the proxy's own calls against the app's rate; the
budget is the app's token share, so requests always get the rest."""
_KEEPALIVE_BACKOFF = RefreshPolicy(backoff_base=30.0, backoff_cap=3600.0)
"""A failed keep-alive is tried again from 30 s on, up to hourly: it has weeks to succeed."""
_LOCK_MARGIN = 1.0
_FIRST_LOOK = 3600.0
_FIRST_LOOK_AFTER = 60.0


@dataclasses.dataclass(frozen=True)
class KeepAlive:
    """What an API key's keep-alive needs: where to call, how often, and the shared gate."""

    session: aiohttp.ClientSession
    url: str
    """An authenticated call that costs Cloudbeds little: `{upstream}/api/v1.3/getHotels`."""
    interval: float
    timeout: float
    lock_ttl: float
    clock: Clock
    gate: TokenGate | None = None


class Credential(Protocol):
    name: str
    settings: CredentialSettings
    record: TokenRecord | None
    listener: Listener | None
    pending: set[str]
    """Where the credential notes its name while it holds a write the store has not taken
    (the registry's set, so the write-back visits only those, not every connection)."""

    @property
    def properties(self) -> tuple[str, ...]: ...

    async def header(self) -> tuple[str, str]:
        """The header that carries the credential; raises NoUsableToken when there is none."""

    async def rejected(self, header: tuple[str, str]) -> bool:
        """Cloudbeds answered 401 to `header`: True when a different, usable one is ready."""

    def ready(self) -> tuple[bool, str]: ...

    def status(self) -> dict[str, Any]: ...

    def adopt(self, record: TokenRecord, *, force: bool = False) -> bool:
        """Make `record` the one in memory if it is newer (or `force`)."""

    def keep(self, record: TokenRecord, write: Write, events: tuple[Event, ...]) -> None:
        """Serve `record`, which the store could not take, and write it when it returns."""

    @property
    def unsaved(self) -> bool:
        """A record waits to be written back (the store was down when it was made)."""

    async def start(self, record: TokenRecord | None = None) -> None:
        """Load (or seed) the credential's record before the first request; `record` is
        the stored one when the caller has just read it (not read again then)."""

    async def run(self) -> None:
        """Background work until cancelled."""

    async def reload(self) -> None:
        """Re-read the store (a change was published, or the poll came round)."""

    async def stop(self, timeout: float) -> None:
        """At shutdown: finish or abandon work in flight within `timeout` seconds."""


class ApiKeyCredential:
    """A static `x-api-key`: never refreshed. From the configuration, or a stored connection's."""

    def __init__(
        self, settings: CredentialSettings, store: TokenStore, *, keepalive: KeepAlive | None = None
    ) -> None:
        self.name, self.settings, self._store = settings.name, settings, store
        self._keepalive = keepalive
        self._last_used = 0.0
        self._wake = asyncio.Event()
        self.record: TokenRecord | None = None
        self.listener: Listener | None = None
        self.pending: set[str] = set()
        self._kept: tuple[TokenRecord, tuple[Event, ...]] | None = None
        self.unreadable: str | None = None
        if settings.api_key is not None:
            self.record = TokenRecord(
                settings.api_key, 0.0, None, 0, kind=Kind.API_KEY, properties=settings.properties
            )

    @property
    def properties(self) -> tuple[str, ...]:
        return self.record.properties if self.record else self.settings.properties

    async def header(self) -> tuple[str, str]:
        record = self.record
        if self.unreadable is not None:
            raise RecordUnreadable(self.unreadable)
        if record is not None and record.state is State.DISCONNECTED:
            raise ConnectionDisconnected(
                f"connection {self.name!r} was disconnected; the property must install the "
                "app again before requests can use it"
            )
        if record is None or record.access_token is None or record.state is not State.OK:
            raise NoUsableToken(f"connection {self.name!r} has no API key", retry_after=60)
        if self._keepalive is not None:
            self._last_used = self._keepalive.clock()
        return ("x-api-key", record.access_token)

    async def rejected(self, header: tuple[str, str]) -> bool:
        return False

    def adopt(self, record: TokenRecord, *, force: bool = False) -> bool:
        current = self.record
        if self.settings.api_key is not None:
            return False  # the configuration's key is the key
        if not force and current is not None and record.generation <= current.generation:
            return False
        register_secret(record.access_token)
        hold_secrets(self.name, record.access_token)
        self.record = record
        if self.listener is not None:
            self.listener(self.name, self.properties)
        return True

    def keep(self, record: TokenRecord, write: Write, events: tuple[Event, ...]) -> None:
        self.adopt(record, force=True)
        self._unsaved = (record, events)

    @property
    def unsaved(self) -> bool:
        return self._unsaved is not None

    @property
    def _unsaved(self) -> tuple[TokenRecord, tuple[Event, ...]] | None:
        return self._kept

    @_unsaved.setter
    def _unsaved(self, kept: tuple[TokenRecord, tuple[Event, ...]] | None) -> None:
        self._kept = kept
        (self.pending.discard if kept is None else self.pending.add)(self.name)

    def ready(self) -> tuple[bool, str]:
        record = self.record
        if self.unreadable is not None:
            return False, f"store_unreadable: {self.unreadable}"
        if record is None or record.state is not State.OK:
            return False, record.state.value if record else "no API key stored"
        return True, "api key"

    def status(self) -> dict[str, Any]:
        state = self.record.state.value if self.record else "not_authorized"
        if self.unreadable is not None:
            state = "store_unreadable"
        return {"kind": Kind.API_KEY.value, "state": state}

    async def start(self, record: TokenRecord | None = None) -> None:
        if record is not None:
            self.adopt(record)  # read by the caller just now: no second read
            return
        with contextlib.suppress(StoreUnavailable):
            await self.reload()

    def _load_failed(self, exc: RecordUnreadable) -> None:
        if self.unreadable is None:
            log.error("store.record_unreadable", credential=self.name, reason=exc.message)
        self.unreadable = exc.message

    async def run(self) -> None:
        """Keep the key alive while it is idle (see the top of this module); else nothing."""
        keep = self._keepalive
        if keep is None:
            await asyncio.Event().wait()
            return
        place, attempt = phase(self.name), 0
        # The first look soon after start (a minute on, spread over up to an hour by the
        # phase): a fleet restarted more often than the interval must still see the key
        # come due, and a start is no burst of reads.
        first = min(keep.interval / 2, _FIRST_LOOK)
        settle = min(first / 2, _FIRST_LOOK_AFTER)
        at = grid_point(place, first, keep.clock() + settle + first)
        while True:
            self._wake.clear()
            delay = at - keep.clock()
            if delay > 0:  # woken early (a test's clock moved): look at the clock again
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            try:
                at = await self._keep_alive(keep, place)
                attempt = 0
            except Exception as exc:  # the store, Cloudbeds, or a bug: try again later
                if isinstance(exc, ProxyError):
                    reason = exc.message
                elif isinstance(exc, TokenEndpointError):
                    reason = exc.reason
                else:  # a bug must not end the keep-alives of this key for good
                    log.exception("api_key.keepalive.crashed", credential=self.name)
                    reason = type(exc).__name__
                delay = backoff(attempt, _KEEPALIVE_BACKOFF, random.random())  # noqa: S311
                attempt += 1
                at = keep.clock() + delay
                log.warning(
                    "api_key.keepalive.failed",
                    credential=self.name,
                    reason=reason,
                    retry_in=round(delay, 2),
                    attempt=attempt,
                )

    async def _last_use(self) -> float:
        """The latest use of the key anywhere in the fleet (or its creation)."""
        fleet = (await self._store.last_used([self.name])).get(self.name, 0.0)
        created = self.record.created_at if self.record else None
        return max(fleet, self._last_used, created or 0.0)

    async def _keep_alive(self, keep: KeepAlive, place: float) -> float:
        """Call Cloudbeds with the key if it is due (once in the fleet); the next moment."""
        record = self.record
        if self.unreadable is not None or record is None or record.state is not State.OK:
            # Nothing to keep alive (disconnected, no key, unreadable): look again later.
            return keepalive_after(keep.clock(), place, keep.interval)
        due = keepalive_after(await self._last_use(), place, keep.interval)
        if keep.clock() < due:
            return due
        async with held(self._store.lock(self.name, keep.lock_ttl)) as mine:
            if not mine:  # another replica is at it: its use shows up in last_used
                return keep.clock() + keep.lock_ttl
            due = keepalive_after(await self._last_use(), place, keep.interval)
            if keep.clock() < due:
                return due
            await self._call(keep)
            now = keep.clock()
            self._last_used = now
            # Under the lock: a replica that takes it next reads this use, not the older.
            await self._store.touch({self.name: now})
        log.info("api_key.keepalive.ok", credential=self.name)
        return keepalive_after(now, place, keep.interval)

    async def _call(self, keep: KeepAlive) -> None:
        record = self.record
        if record is None or record.access_token is None or record.state is not State.OK:
            raise NoUsableToken(f"connection {self.name!r} has no API key to keep alive")
        if keep.gate is not None:
            await keep.gate(
                self.settings.token_budget,
                self.name,
                max(0.0, keep.lock_ttl - keep.timeout - _LOCK_MARGIN),
            )
        header = ("x-api-key", record.access_token)
        status, _ = await cloudbeds.call(
            keep.session, "GET", keep.url, timeout=keep.timeout, header=header
        )
        if not 200 <= status < 300:
            raise TokenEndpointUnavailable(
                f"the keep-alive call answered HTTP {status}", status=status
            )

    async def reload(self) -> None:
        if self.settings.api_key is not None:
            return
        if self.unreadable is None and self._unsaved is not None:
            # A key Cloudbeds issued while the store was down: it exists nowhere else, and
            # an authorisation wins over whatever was written meanwhile.
            record, events = self._unsaved
            written = await self._store.put(self.name, record, events=events)
            if not written:
                stored = await self._store.load(self.name)
                if stored is None or resolve(record, stored, Write.AUTHORIZATION) is not (
                    Outcome.REBASE
                ):
                    written = True  # nothing to write over: the stored record stands
                else:
                    written = await self._store.put(
                        self.name, rebased(record, stored), events=events
                    )
            if written:
                self._unsaved = None  # else the next poll writes it again: never dropped
        try:
            stored = await self._store.load(self.name)
        except RecordUnreadable as exc:
            self._load_failed(exc)
            return
        self.unreadable = None
        if stored is not None:
            self.adopt(stored)

    async def stop(self, timeout: float) -> None:
        hold_secrets(self.name)  # no longer held: redacted while it could still be used
