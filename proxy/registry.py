"""Every connection this replica serves, found by id or by property, kept current from the store.

- At start: the configured credentials (`[credentials.NAME]`, `CBPROXY_*`), then every
  stored connection of a configured app, page by page.
- Then the store's change feed: a connection written anywhere in the fleet (an install, an
  import, a refresh, a delete) is created or reloaded here within a feed read. A follower
  that lost entries (its position was trimmed away) rereads every record once.
- Routing (DESIGN.md, "Routing a request"): `X-Cloudbeds-Connection` (or
  `X-Cloudbeds-Credential`), else `X-PROPERTY-ID` (its first id), else the `propertyID` or
  first `propertyIDs` query parameter, else `default` (or the first configured credential
  when none is named so). Lookups are dictionary reads: the
  same cost at 10 connections as at 10,000. Bodies are never parsed for routing.
- A property no connection covers is 404 `unknown_property`, except in the
  single-credential setup (a `default` credential and no apps), where it goes to `default`
  as it always has; one covered by several connections is 409 `ambiguous_property`
  unless `X-Cloudbeds-App` narrows it to one.
- One-shot (a CLI command): nothing is loaded at start and nothing runs in the background;
  a credential is made only when the command asks for it (`load`), so a command on a store
  of 10,000 connections makes one credential, and its refresh still goes through the
  store's lock and compare-and-set like a replica's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping

import structlog

from proxy.clock import Clock
from proxy.config import DEFAULT_CREDENTIAL, CredentialSettings, Settings
from proxy.credentials import Credential
from proxy.errors import (
    AmbiguousProperty,
    ConnectionRequired,
    RecordUnreadable,
    StoreUnavailable,
    UnknownConnection,
    UnknownProperty,
)
from proxy.headers import APP_SELECTOR, CONNECTION_SELECTORS
from proxy.metrics import Metrics
from proxy.store import TokenStore
from proxy.tokens import TokenRecord

log = structlog.get_logger("proxy.registry")
MakeCredential = Callable[[CredentialSettings], Credential]
_PAGE = 500


class Registry:
    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        make: MakeCredential,
        metrics: Metrics,
        clock: Clock,
        *,
        one_shot: bool = False,
    ) -> None:
        self._settings, self._store, self._make, self._metrics = settings, store, make, metrics
        self._clock, self._one_shot = clock, one_shot
        self._used: dict[str, float] = {}
        self.connections: dict[str, Credential] = {}
        self._covered: dict[str, tuple[str, ...]] = {}
        self._by_property: dict[str, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._position = "0"
        self._unknown_apps: set[str] = set()
        self._resumed = asyncio.Event()
        self._reread_first = False
        metrics.count_connections(self.counts)

    def counts(self) -> dict[tuple[str, str], int]:
        """Connections of apps by (app, state), for the metrics and the status page."""
        counts: dict[tuple[str, str], int] = {}
        for credential in self.connections.values():
            app = credential.settings.app
            if app is not None:
                state = credential.status()["state"]
                counts[app, state] = counts.get((app, state), 0) + 1
        return counts

    @property
    def default(self) -> Credential | None:
        """`default`, else the first configured credential, as the configuration reads."""
        found = self.connections.get(DEFAULT_CREDENTIAL)
        if found is None and self._settings.credentials:
            found = self.connections.get(self._settings.credentials[0].name)
        return found

    async def start(self) -> None:
        """Configured credentials first, then every stored connection of a configured app."""
        try:
            self._position = await self._store.position()
        except StoreUnavailable as exc:
            log.warning("store.unavailable.at_start", error=exc.message)
        for cred in self._settings.credentials:
            await self._add(cred, None)
        try:
            await self.reread()
        except StoreUnavailable:
            self._reread_first = True  # the feed starts with a reread once the store is back

    async def reread(self) -> None:
        """Every stored record once: at start, and when the change feed lost entries."""
        cursor: str | None = None
        while True:
            records, cursor = await self._store.page(cursor=cursor, limit=_PAGE)
            for name, record in records:
                if isinstance(record, RecordUnreadable):
                    log.error("connection.unreadable", connection=name, reason=record.message)
                else:
                    await self.apply(name, record)
            if cursor is None:
                return

    async def changed(self, name: str) -> None:
        """The store reports a write of `name`: reload or create it here."""
        credential = self.connections.get(name)
        if credential is not None:
            await credential.reload()
            return
        try:
            record = await self._store.load(name)
        except RecordUnreadable as exc:
            # The reason says which record and why; a traceback would add nothing.
            log.error("store.record_unreadable", credential=name, reason=exc.message)  # noqa: TRY400
            return
        if record is not None:
            await self.apply(name, record)

    async def apply(self, name: str, record: TokenRecord) -> Credential | None:
        """Make `record` current for connection `name`, creating the connection if new."""
        credential = self.connections.get(name)
        settings = credential.settings if credential is not None else None
        if (
            settings is not None
            and record.app
            and (record.kind, record.app)
            != (
                settings.kind,
                settings.app,
            )
        ):
            # Migrated to an API key, or imported under another app: a credential made anew.
            await self._remove(name)
            credential = None
        if credential is None:
            # One-shot: a write that lands makes no credential the command did not ask for.
            return None if self._one_shot else await self._create(name, record)
        credential.adopt(record)
        return credential

    async def load(self, name: str) -> Credential | None:
        """Connection `name`'s credential, made from its stored record if not served yet."""
        credential = self.connections.get(name)
        if credential is None and (record := await self._store.load(name)) is not None:
            credential = await self._create(name, record)
        return credential

    async def _create(self, name: str, record: TokenRecord) -> Credential | None:
        configured = self._settings.credential(name) if record.app is None else None
        if configured is not None:
            return await self._add(configured, None)  # a one-shot command's configured one
        app = self._settings.app(record.app) if record.app else None
        if app is None:
            self._skip(name, record)
            return None
        settings = dataclasses.replace(app.connection(name), kind=record.kind)
        return await self._add(settings, record)

    def _skip(self, name: str, record: TokenRecord) -> None:
        if record.app and record.app not in self._unknown_apps:
            self._unknown_apps.add(record.app)
            log.warning(
                "connection.app_unknown",
                connection=name,
                app=record.app,
                action=f"add [apps.{record.app}] to the configuration to serve its connections",
            )

    async def _add(self, settings: CredentialSettings, record: TokenRecord | None) -> Credential:
        credential = self._make(settings)
        credential.listener = self._index  # the property index follows every adopted record
        if record is not None:
            credential.adopt(record)
        # Known before the first await: a feed entry or an admin call for the same id that
        # arrives while it starts finds it, rather than making a second one.
        self.connections[settings.name] = credential
        await credential.start()
        if not self._one_shot:
            self._tasks[settings.name] = asyncio.create_task(
                credential.run(), name=f"refresh:{settings.name}"
            )
        self._index(settings.name, credential.properties)
        return credential

    async def _remove(self, name: str) -> None:
        self._index(name, ())  # routing never meets an id that is no longer there
        credential = self.connections.pop(name)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await credential.stop(0.0)

    def _index(self, name: str, properties: tuple[str, ...]) -> None:
        old = self._covered.get(name, ())
        if old == properties:
            return
        for prop in old:
            ids = self._by_property.get(prop)
            if ids is not None:
                ids.discard(name)
                if not ids:
                    del self._by_property[prop]
        for prop in properties:
            self._by_property.setdefault(prop, set()).add(name)
        self._covered[name] = properties

    async def follow(self) -> None:
        """Apply the change feed until cancelled; resume where it was after a broken link."""
        delay = 0.5
        while True:
            try:
                if self._reread_first:
                    # Where the feed stands first, then every record: nothing written after
                    # the position is missed, nothing before it is replayed.
                    self._position = await self._store.position()
                    await self.reread()
                    self._reread_first = False
                async for position, name in self._store.changes(self._position):
                    delay = 0.5
                    if name is None:
                        self._reread_first = True
                        break
                    try:
                        await self.changed(name)
                    except StoreUnavailable:
                        pass  # the next write of it, or a reread, brings it
                    except Exception:  # one bad record must not end the feed for good
                        log.exception("registry.change.crashed", connection=name)
                    self._position = position
            except StoreUnavailable:
                self._metrics.redis_errors.labels("feed").inc()
            else:
                if self._reread_first:
                    continue  # the feed lost entries: reread at once, no backoff
            # The feed is how changes arrive: retry soon, and at once when the poll sees
            # the store back (`resume`).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._resumed.wait()
            self._resumed.clear()
            delay = min(delay * 2, 2.0)

    def resume(self) -> None:
        """The store answers again: follow the feed now rather than after the backoff."""
        self._resumed.set()

    def route(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Credential:
        """The connection a request is for (see the rules at the top of this module)."""
        for selector in CONNECTION_SELECTORS:
            name = headers.get(selector)
            if name is not None:
                credential = self.connections.get(name)
                if credential is None:
                    raise UnknownConnection(
                        f"{selector}: no connection {name[:128]!r}; list them at "
                        "/_proxy/admin/connections"
                    )
                return credential
        prop = _property(headers, query)
        if prop is None:
            if self.default is None:
                raise ConnectionRequired(
                    "no connection selected: send X-Cloudbeds-Connection, X-PROPERTY-ID or a "
                    "propertyID parameter (no default credential is configured)"
                )
            return self.default
        return self._by_prop(prop, headers.get(APP_SELECTOR))

    def _by_prop(self, prop: str, app: str | None) -> Credential:
        ids = self._by_property.get(prop, set())
        if app is not None:
            ids = {i for i in ids if self.connections[i].settings.app == app}
        if len(ids) > 1:  # a property that left one app and joined another: the live one
            live = {i for i in ids if self.connections[i].status()["state"] != "disconnected"}
            ids = live or ids
        if not ids:
            if self.default is not None and not self._settings.apps:
                return self.default
            where = f" of app {app[:64]!r}" if app is not None else ""
            raise UnknownProperty(
                f"no connection{where} covers property {prop[:64]!r}; the property must "
                "install the app first"
            )
        if len(ids) > 1:
            raise AmbiguousProperty(
                f"property {prop[:64]!r} is covered by connections {', '.join(sorted(ids))}; "
                "send X-Cloudbeds-App or X-Cloudbeds-Connection to pick one"
            )
        return self.connections[next(iter(ids))]

    def used(self, name: str) -> None:
        """Note that a request used connection `name` (written in batches by `flush_used`)."""
        self._used[name] = self._clock()

    async def flush_used(self) -> None:
        """Write the batch of last-used times; kept for the next try if the store is down."""
        batch, self._used = self._used, {}
        try:
            await self._store.touch(batch)
        except StoreUnavailable:
            self._used = {**batch, **self._used}

    async def stop(self, timeout: float) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(c.stop(timeout) for c in self.connections.values()))


def _property(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The property a request names: header first, then the query (the v1.3 SDK's GETs)."""
    for value in (headers.get("X-PROPERTY-ID"), query.get("propertyID"), query.get("propertyIDs")):
        if value:
            first = value.split(",", 1)[0].strip()
            if first:
                return first
    return None
