"""Making and changing connections: install, import, edit, refresh, migrate, disconnect.

The callback, the admin API and the CLI all go through here. Rules (DESIGN.md, "Many
properties"):

- An install exchanges the code with the app's grant (`authorization_code`, or the
  API-key grant for `delivery = "api_key"`), finds the properties the credential covers
  (the answer's `resources` of type property; for an association, or when none are
  listed, `getHotels` made with the new credential), and writes the connection
  `{app}.property.{id}` or `{app}.association.{id}` (several properties and no
  association: the smallest property id). A re-install keeps the id, the metadata and
  `created_at`, and replaces the credential.
- Every write is a compare-and-set carrying its event; a write refused because another
  landed meanwhile is made again on top of it (an authorisation or an edit: see
  `proxy.tokens.resolve`), at most `_ATTEMPTS` times.
- Token calls and the calls made for an install count against the app's rate budget.
- Migration to an API key holds the connection's refresh lock, so no refresh of the old
  token (which would invalidate the new key) runs meanwhile; afterwards the connection
  has no refresh token and never refreshes.
- A delete tells Cloudbeds (`postAppState` disabled, for each property) when the app says
  so and the credential still works, erases the credential, and keeps a `disconnected`
  record, so callers get 410 rather than someone else's token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import structlog

from proxy import cloudbeds
from proxy.clock import Clock
from proxy.config import CONNECTION_ID, AppSettings, Settings
from proxy.errors import (
    AuthorizationFailed,
    ConnectionDisconnected,
    InvalidConnection,
    NoUsableToken,
    ReauthorizationRequired,
    StoreUnavailable,
    TokenEndpointError,
    UnknownApp,
    UnknownConnection,
    UpstreamUnreachable,
)
from proxy.events import Event, EventType, new_event
from proxy.logs import register_secret
from proxy.ratelimit import Limiter
from proxy.registry import Registry
from proxy.store import TokenStore, held
from proxy.tokens import Kind, Outcome, State, TokenRecord, Write, resolve

log = structlog.get_logger("proxy.connections")
Build = Callable[[TokenRecord | None], tuple[TokenRecord, EventType | None]]
_ATTEMPTS = 3
_HOTELS_ATTEMPTS = 3
_PROPERTY_ID = CONNECTION_ID
_SECRET = re.compile(r"[\x21-\x7e]{1,4096}")
"""A credential as it may go into a header: visible ASCII (no space, no line break)."""


@dataclasses.dataclass(frozen=True)
class Grant:
    """What Cloudbeds granted: a token pair, or an API key (`expires_in` unused)."""

    kind: Kind
    access_token: str
    expires_in: float
    refresh_token: str | None
    properties: tuple[str, ...]
    association: str | None = None


def connection_id(app: str, grant: Grant) -> str:
    if grant.association is not None:
        return f"{app}.association.{grant.association}"
    smallest = min(grant.properties, key=lambda p: (len(p), p) if p.isdigit() else (1 << 30, p))
    return f"{app}.property.{smallest}"


def granted(stored: TokenRecord | None, app: str | None, grant: Grant, now: float) -> TokenRecord:
    """The record after an authorisation: a new credential, the connection's own data kept."""
    base = stored or TokenRecord(None, 0.0, None, 0, created_at=now)
    return base.successor(
        access_token=grant.access_token,
        expires_at=0.0 if grant.kind is Kind.API_KEY else now + grant.expires_in,
        refresh_token=grant.refresh_token,
        state=State.OK,
        refreshed_at=now,
        properties=grant.properties,
        forced=False,
        app=app,
        kind=grant.kind,
        association=grant.association,
        created_at=base.created_at or now,
        updated_at=now,
    )


def install_event(stored: TokenRecord | None) -> EventType:
    if stored is None:
        return EventType.CREATED
    if stored.state is State.OK:
        return EventType.REINSTALLED
    return EventType.RECOVERED


def merged(metadata: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata merged key by key; a null value removes the key."""
    out = {**metadata, **patch}
    return {k: v for k, v in out.items() if v is not None}


class Connections:
    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        session: aiohttp.ClientSession,
        registry: Registry,
        limiter: Limiter,
        *,
        clock: Clock,
        on_events: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings, self._store, self._session = settings, store, session
        self._registry, self._limiter, self._clock = registry, limiter, clock
        self._on_events = on_events
        """Called after a write that carried events (wakes this replica's delivery)."""

    def app(self, name: str) -> AppSettings:
        app = self._settings.app(name)
        if app is None:
            known = ", ".join(a.name for a in self._settings.apps) or "none"
            raise UnknownApp(f"no app {name[:64]!r} is configured ([apps.NAME]); apps: {known}")
        return app

    async def get(self, name: str) -> TokenRecord:
        record = await self._store.load(name) if CONNECTION_ID.fullmatch(name) else None
        if record is None:
            raise UnknownConnection(f"no connection {name[:128]!r}")
        return record

    # -- install ------------------------------------------------------------------------

    async def install(self, app: AppSettings, code: str) -> tuple[str, TokenRecord, EventType]:
        """Exchange a code from Cloudbeds and create or replace its connection."""
        grant = await self._exchange(app, code)
        if grant.association is not None or not grant.properties:
            # A group's properties come from getHotels; should it fail, the answer's own.
            found = await self._hotels(app, grant)
            grant = dataclasses.replace(grant, properties=found or grant.properties)
        if not grant.properties and grant.association is None:
            log.error("connection.install.unnamed", app=app.name, action="install again")
            raise AuthorizationFailed(
                "Cloudbeds granted access but named no property, and getHotels could not say "
                "which: install the app again from the property's Cloudbeds account"
            )
        name = connection_id(app.name, grant)
        if self._settings.credential(name) is not None:
            raise InvalidConnection(
                f"{name!r} is a credential of the configuration: rename it there; an install "
                "cannot replace it"
            )
        happened: list[EventType] = []

        def build(stored: TokenRecord | None) -> tuple[TokenRecord, EventType]:
            happened[:] = [install_event(stored)]
            return granted(stored, app.name, grant, self._clock()), happened[0]

        record = await self.write(name, build, Write.AUTHORIZATION)
        log.info("connection.installed", connection=name, change=happened[0].value)
        return name, record, happened[0]

    async def _exchange(self, app: AppSettings, code: str) -> Grant:
        await self._limiter.admit(app.token_budget, max_wait=self._settings.token_timeout)
        url, timeout = self._settings.token_url, self._settings.token_timeout
        try:
            if app.delivery is Kind.API_KEY:
                secret, uri = app.client_secret, app.redirect_uri
                form = cloudbeds.api_key_form(app.client_id, secret, uri, code)
                key = await cloudbeds.send_api_key_request(self._session, url, form, timeout)
                register_secret(key)
                return Grant(Kind.API_KEY, key, 0.0, None, ())
            form = cloudbeds.code_form(app.client_id, app.client_secret, app.redirect_uri, code)
            answer = await cloudbeds.send_token_request(self._session, url, form, timeout)
        except TokenEndpointError as exc:
            raise AuthorizationFailed(
                f"Cloudbeds refused the authorization code ({exc.reason}). A code is valid for "
                "10 minutes and only once: install the app again"
            ) from None
        register_secret(answer.access_token)
        register_secret(answer.refresh_token)
        association = answer.associations[0] if answer.associations else None
        return Grant(
            Kind.OAUTH,
            answer.access_token,
            answer.expires_in,
            answer.refresh_token,
            answer.properties,
            association,
        )

    async def _hotels(self, app: AppSettings, grant: Grant) -> tuple[str, ...]:
        """The properties a new credential covers, from `getHotels` made with it.

        The code is spent by now, so a slow or failing answer is tried again (bounded),
        and the call may wait for its slot as long as a token call would.
        """
        header = (
            ("x-api-key", grant.access_token)
            if grant.kind is Kind.API_KEY
            else ("Authorization", f"Bearer {grant.access_token}")
        )
        url = f"{self._settings.upstream_url}/api/v1.3/getHotels"
        for attempt in range(_HOTELS_ATTEMPTS):
            await self._limiter.admit(f"app:{app.name}", max_wait=self._settings.lock_ttl)
            try:
                status, body = await cloudbeds.call(
                    self._session, "GET", url, timeout=self._settings.token_timeout, header=header
                )
            except TokenEndpointError as exc:
                log.warning("connection.hotels.failed", app=app.name, reason=exc.reason)
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            ids = tuple(p for p in cloudbeds.hotel_ids(status, body) if _PROPERTY_ID.fullmatch(p))
            if ids or status < 500:
                return ids
            log.warning("connection.hotels.failed", app=app.name, reason=f"HTTP {status}")
        return ()

    # -- writes -------------------------------------------------------------------------

    async def write(self, name: str, build: Build, write: Write) -> TokenRecord:
        """Build the record from the stored one and write it with its event; on a refusal
        build again on top of what landed (never more than `_ATTEMPTS` times). An
        authorisation the store cannot take now is kept in memory and written later."""
        for _ in range(_ATTEMPTS):
            try:
                stored = await self._store.load(name)
            except StoreUnavailable:
                if write is not Write.AUTHORIZATION:
                    raise
                held = self._registry.connections.get(name)
                in_memory = held.record if held is not None else None
                return await self._keep(name, *self._built(name, build, in_memory))
            record, events = self._built(name, build, stored)
            try:
                written = await self._store.put(name, record, events=events)
            except StoreUnavailable:
                if write is not Write.AUTHORIZATION:
                    raise
                return await self._keep(name, record, events)
            if written:
                if events:
                    self._on_events()
                await self._registry.apply(name, record)
                return record
            try:
                now_stored = await self._store.load(name)
            except StoreUnavailable:
                if write is not Write.AUTHORIZATION:
                    raise
                return await self._keep(name, record, events)
            if now_stored is not None and resolve(record, now_stored, write) is Outcome.ADOPT:
                return now_stored
        raise StoreUnavailable(
            f"connection {name!r} changed {_ATTEMPTS} times while this write was made; retry"
        )

    def _built(
        self, name: str, build: Build, stored: TokenRecord | None
    ) -> tuple[TokenRecord, tuple[Event, ...]]:
        record, event_type = build(stored)
        if event_type is None or not self._settings.events_url:
            return record, ()
        return record, (new_event(event_type, record.view(name), self._clock()),)

    async def _keep(self, name: str, record: TokenRecord, events: tuple[Event, ...]) -> TokenRecord:
        """A grant the store cannot take now exists nowhere else: serve it from memory and
        write it when the store returns (the connection's own write-back)."""
        credential = await self._registry.apply(name, record)
        if credential is None:
            raise StoreUnavailable(f"the store is down and connection {name!r} cannot be kept")
        credential.keep(record, Write.AUTHORIZATION, events)
        log.warning("connection.write.deferred", connection=name)
        return record

    async def put(self, name: str, body: Any) -> tuple[TokenRecord, bool]:
        """Import or replace a connection (admin `PUT`); True when it was created."""
        app, grant, metadata = self._parse_import(name, body)
        created: list[bool] = []

        def build(stored: TokenRecord | None) -> tuple[TokenRecord, EventType]:
            created[:] = [stored is None]
            record = granted(stored, app.name, grant, self._clock())
            if grant.kind is Kind.OAUTH:  # a refresh token alone: the refresh loop starts it
                record = dataclasses.replace(record, access_token=None, expires_at=0.0)
            if metadata is not None:
                record = dataclasses.replace(record, metadata=metadata)
            if stored is not None and "properties" not in body:
                # Not given, like metadata, they are kept (until a refresh's `resources`).
                record = dataclasses.replace(record, properties=stored.properties)
            return record, install_event(stored)

        record = await self.write(name, build, Write.AUTHORIZATION)
        return record, created[0]

    def _parse_import(
        self, name: str, body: Any
    ) -> tuple[AppSettings, Grant, dict[str, Any] | None]:
        if not CONNECTION_ID.fullmatch(name):
            raise InvalidConnection("a connection id uses 1 to 128 of A-Z a-z 0-9 . _ -")
        if self._settings.credential(name) is not None:
            raise InvalidConnection(
                f"{name!r} is a credential of the configuration; change it there, or import "
                "the connection under another id"
            )
        if not isinstance(body, dict):
            raise InvalidConnection('send a JSON object: {"app": NAME, "refresh_token": ...}')
        if not isinstance(body.get("app"), str):
            raise InvalidConnection('"app": required, the name of an [apps.NAME] table')
        app = self.app(body["app"])
        refresh, key = body.get("refresh_token"), body.get("api_key")
        if (refresh is None) == (key is None):
            raise InvalidConnection('give exactly one of "refresh_token" and "api_key"')
        secret = refresh if refresh is not None else key
        if not isinstance(secret, str) or not _SECRET.fullmatch(secret):
            raise InvalidConnection(
                "the refresh token or API key must be 1 to 4096 visible ASCII characters"
            )
        if key is not None and not key.startswith("cbat_"):
            raise InvalidConnection('"api_key": a Cloudbeds API key starts with cbat_')
        props = body.get("properties", [])
        if not isinstance(props, list) or not all(
            isinstance(p, str | int) and _PROPERTY_ID.fullmatch(str(p)) for p in props
        ):
            raise InvalidConnection('"properties": a list of property ids, like ["1001"]')
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidConnection('"metadata": must be a JSON object')
        register_secret(secret)
        kind = Kind.API_KEY if key is not None else Kind.OAUTH
        grant = Grant(
            kind,
            secret if kind is Kind.API_KEY else "",
            0.0,
            secret if kind is Kind.OAUTH else None,
            tuple(str(p) for p in props),
        )
        return app, grant, metadata

    async def patch(self, name: str, body: Any) -> TokenRecord:
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise InvalidConnection('send {"metadata": {...}}; a null value removes a key')
        patch = body["metadata"]
        await self.get(name)

        def build(stored: TokenRecord | None) -> tuple[TokenRecord, None]:
            if stored is None:
                raise UnknownConnection(f"no connection {name[:128]!r}")
            metadata = merged(stored.metadata, patch)
            return stored.successor(metadata=metadata, updated_at=self._clock()), None

        return await self.write(name, build, Write.CHANGE)

    async def delete(self, name: str) -> TokenRecord:
        if self._settings.credential(name) is not None:
            raise InvalidConnection(
                f"{name!r} is a credential of the configuration; remove it there (a delete here "
                "would outlive a new CBPROXY_REFRESH_TOKEN)"
            )
        record = await self.get(name)
        app = self._settings.app(record.app) if record.app else None
        if app is not None and app.post_app_state_on_delete and record.usable(self._clock()):
            await self._disable_app(app, name, record)

        def build(stored: TokenRecord | None) -> tuple[TokenRecord, EventType | None]:
            if stored is None:
                raise UnknownConnection(f"no connection {name[:128]!r}")
            if stored.state is State.DISCONNECTED:
                return stored.successor(), None
            gone = stored.successor(
                access_token=None,
                refresh_token=None,
                expires_at=0.0,
                state=State.DISCONNECTED,
                updated_at=self._clock(),
            )
            return gone, EventType.DISCONNECTED

        return await self.write(name, build, Write.CHANGE)

    async def _disable_app(self, app: AppSettings, name: str, record: TokenRecord) -> None:
        """Tell Cloudbeds the app is disabled for each property; a failure is logged."""
        assert record.access_token is not None
        header = (
            ("x-api-key", record.access_token)
            if record.kind is Kind.API_KEY
            else ("Authorization", f"Bearer {record.access_token}")
        )
        url = f"{self._settings.upstream_url}/api/v1.3/postAppState"
        for prop in record.properties:
            await self._limiter.admit(f"app:{app.name}", max_wait=self._settings.token_timeout)
            try:
                status, _ = await cloudbeds.call(
                    self._session,
                    "POST",
                    url,
                    timeout=self._settings.token_timeout,
                    form=cloudbeds.app_state_form(prop, "disabled"),
                    header=header,
                )
            except TokenEndpointError as exc:
                status = 0
                log.warning("connection.app_state.failed", connection=name, reason=exc.reason)
            log.info("connection.app_state.disabled", connection=name, property=prop, status=status)

    async def refresh(self, name: str) -> TokenRecord:
        """Refresh an OAuth connection now, through its lock and compare-and-set.

        Answers only a refresh that landed (a newer generation, here or by another replica
        meanwhile); a refusal, a failed call or a lock held elsewhere is an error.
        """
        before = await self.get(name)
        _refreshable(name, before)
        credential = await self._registry.load(name)
        refresh_now = getattr(credential, "refresh_now", None)
        if credential is None or refresh_now is None:
            raise InvalidConnection(
                f"connection {name!r} is not an OAuth connection this proxy serves: an API key "
                "never refreshes, and a connection of an unconfigured app is not served"
            )
        await refresh_now()
        after = await self.get(name)
        _refreshable(name, after)
        if after.generation > before.generation:
            return after
        reason = credential.status().get("last_error")
        if reason:
            raise UpstreamUnreachable(
                f"the refresh of {name!r} failed ({reason}); the connection keeps its current "
                "token, and the proxy retries on its own"
            )
        raise NoUsableToken(f"connection {name!r} is refreshing elsewhere right now; retry shortly")

    async def migrate(self, name: str) -> TokenRecord:
        """Move an OAuth connection to an API key (`refresh_token_exchange`), once."""
        record = await self.get(name)
        app = self._settings.app(record.app) if record.app else None
        if app is None or record.kind is not Kind.OAUTH or record.refresh_token is None:
            raise InvalidConnection(
                f"connection {name!r} cannot migrate: only an OAuth connection of a configured "
                "app with a refresh token can"
            )
        # The slot first: under the lock only the call runs, which fits in its lifetime.
        await self._limiter.admit(app.token_budget, max_wait=self._settings.token_timeout)
        async with held(self._store.lock(name, self._settings.lock_ttl)) as mine:
            if not mine:
                raise NoUsableToken(
                    f"connection {name!r} is refreshing right now; retry the migration shortly"
                )
            record = await self.get(name)
            assert record.refresh_token is not None
            form = cloudbeds.exchange_form(app.client_id, app.client_secret, record.refresh_token)
            try:
                key = await cloudbeds.send_api_key_request(
                    self._session, self._settings.token_url, form, self._settings.token_timeout
                )
            except TokenEndpointError as exc:
                raise AuthorizationFailed(
                    f"Cloudbeds refused the migration of {name!r} ({exc.reason}); the "
                    "connection keeps its OAuth token"
                ) from None
            register_secret(key)
            grant = Grant(Kind.API_KEY, key, 0.0, None, record.properties, record.association)

            def build(stored: TokenRecord | None) -> tuple[TokenRecord, None]:
                return granted(stored, app.name, grant, self._clock()), None

            migrated = await self.write(name, build, Write.AUTHORIZATION)
        log.info("connection.migrated", connection=name, kind=Kind.API_KEY.value)
        return migrated


def _refreshable(name: str, record: TokenRecord) -> None:
    """Only an `ok` OAuth connection refreshes; say what the others need instead."""
    if record.state is State.DISCONNECTED:
        raise ConnectionDisconnected(
            f"connection {name!r} was disconnected; the property must install the app again"
        )
    if record.state is State.REAUTHORIZATION_REQUIRED:
        raise ReauthorizationRequired(
            f"Cloudbeds rejected the refresh token of connection {name!r}; the property must "
            "install the app again, or import a new refresh token"
        )
