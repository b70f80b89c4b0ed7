"""What the request path needs from a connection's credential, and the static API-key kind.

OAuth credentials, which refresh and share their token, live in `proxy.coordinator`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from proxy.config import CredentialSettings
from proxy.errors import ConnectionDisconnected, NoUsableToken, RecordUnreadable, StoreUnavailable
from proxy.events import Event
from proxy.logs import hold_secrets, register_secret
from proxy.store import TokenStore
from proxy.tokens import Kind, Outcome, State, TokenRecord, Write, rebased, resolve

log = structlog.get_logger("proxy.credentials")
Listener = Callable[[str, tuple[str, ...]], None]
"""Told (connection id, properties) whenever a credential adopts a record."""


class Credential(Protocol):
    name: str
    settings: CredentialSettings
    record: TokenRecord | None
    listener: Listener | None

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

    def __init__(self, settings: CredentialSettings, store: TokenStore) -> None:
        self.name, self.settings, self._store = settings.name, settings, store
        self.record: TokenRecord | None = None
        self.listener: Listener | None = None
        self._unsaved: tuple[TokenRecord, tuple[Event, ...]] | None = None
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
        await asyncio.Event().wait()

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
        return None
