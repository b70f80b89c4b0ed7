"""Every connection this replica serves, found by id or by property, kept current from the store.

- At start: only the configured credentials (`[credentials.NAME]`, `CBPROXY_*`): they are
  few, and nothing per stored connection runs before the listener opens. The stored
  connections of configured apps then load in the background (`follow`), one store read
  per page; each page's record is handed to its credential (`start(record)`), never read
  again. `progress` says how far it is (the status page shows it).
- While the load runs (and while a reread after lost feed entries runs), a request whose
  connection is not in memory yet is looked up in the store (`find`: by id with `load`, by
  property with `covering`), single-flight per id or property, and its connection made
  then: routing is right before the load ends, and a miss after it is answered from memory.
- Then the store's change feed: a connection written anywhere in the fleet (an install, an
  import, a refresh, a delete) is created or reloaded here within a feed read. The feed is
  read in batches; the records of a batch are read with one `load_many`, and its entries
  applied in feed order. A follower that lost entries (its position was trimmed away)
  rereads every record once.
- Counts by (app, state) are kept as credentials change (`counts`): a scrape or a
  readiness check reads a small dictionary, never every connection.
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
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from proxy.clock import Clock
from proxy.config import CONNECTION_ID, DEFAULT_CREDENTIAL, CredentialSettings, Settings
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
from proxy.store import Batch, TokenStore
from proxy.tokens import TokenRecord

log = structlog.get_logger("proxy.registry")
MakeCredential = Callable[[CredentialSettings], Credential]
_PAGE = 500
_YIELD_EVERY = 100
"""Connections made between two turns of the loop while loading: requests go on meanwhile."""
Counted = tuple[str, str]
"""(app, state) of a connection of an app, as `cbproxy_connections` counts it."""


@dataclasses.dataclass
class LoadStatus:
    """How far the background load of the stored connections is (the status page's)."""

    state: str = "pending"
    """pending (not begun: the store did not answer yet), loading, or done."""
    loaded: int = 0
    """Stored records read so far by this load."""
    started: float | None = None
    finished: float | None = None
    """Loop times; the view shows the seconds between them."""

    def view(self, now: float) -> dict[str, Any]:
        end = self.finished if self.finished is not None else now
        seconds = None if self.started is None else round(end - self.started, 3)
        return {"state": self.state, "loaded": self.loaded, "seconds": seconds}


def state_of(credential: Credential) -> str:
    """The state `status()` reports, without building the status: O(1) for the counts."""
    if getattr(credential, "unreadable", None) is not None:
        return "store_unreadable"
    record = credential.record
    return record.state.value if record is not None else "not_authorized"


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
        self._pending: set[str] = set()
        """Connections holding a write the store has not taken (each credential notes it)."""
        self.connections: dict[str, Credential] = {}
        self._covered: dict[str, tuple[str, ...]] = {}
        self._by_property: dict[str, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._position = "0"
        self._unknown_apps: set[str] = set()
        self._resumed = asyncio.Event()
        self._reread_first = False
        self._rereading = False
        self.progress = LoadStatus()
        self.loaded = asyncio.Event()
        """Set once the stored connections have loaded at start."""
        self._lookups: dict[str, asyncio.Task[None]] = {}
        self._checked: set[str] = set()
        """Properties looked up in the store during this load (cleared once it is done)."""
        self._counts: dict[Counted, int] = {}
        self._counted: dict[str, Counted] = {}
        metrics.count_connections(self.counts)

    def counts(self) -> dict[Counted, int]:
        """Connections of apps by (app, state), for the metrics and the status page.

        Kept as credentials adopt records and change state (`_note`): the cost of a scrape
        does not grow with the number of connections.
        """
        return dict(self._counts)

    @property
    def loading(self) -> bool:
        """Stored connections may be missing from memory: the load (or a reread) is due or
        running, so a route miss asks the store before it answers 404."""
        return self._reread_first or self._rereading

    def _note(self, name: str) -> None:
        """Count connection `name` under its current (app, state), and no longer under the old.

        Called when a credential adopts a record (its listener) and when this registry makes,
        reloads or drops one. A record that turns unreadable in a credential's own re-read
        (its refresh) without a new record is counted so at the next feed entry for it.
        """
        credential = self.connections.get(name)
        now: Counted | None = None
        if credential is not None and credential.settings.app is not None:
            now = (credential.settings.app, state_of(credential))
        before = self._counted.pop(name, None)
        if now is not None:
            self._counted[name] = now
        if before == now:
            return
        if before is not None:
            left = self._counts[before] - 1
            if left:
                self._counts[before] = left
            else:
                del self._counts[before]
        if now is not None:
            self._counts[now] = self._counts.get(now, 0) + 1

    def _adopted(self, name: str, properties: tuple[str, ...]) -> None:
        """A credential adopted a record: the property index and the counts follow."""
        self._index(name, properties)
        self._note(name)

    @property
    def default(self) -> Credential | None:
        """`default`, else the first configured credential, as the configuration reads."""
        found = self.connections.get(DEFAULT_CREDENTIAL)
        if found is None and self._settings.credentials:
            found = self.connections.get(self._settings.credentials[0].name)
        return found

    async def start(self) -> None:
        """The configured credentials; the stored connections load in `follow`, after.

        Nothing here reads per stored connection: a replica listens (and is ready) as soon
        as its configured credentials are, whatever the number of connections.
        """
        for cred in self._settings.credentials:
            await self._add(cred, None)
        self._reread_first = True  # the feed starts with the load: its position, then pages

    async def reread(self) -> None:
        """Every stored record once: the load at start, and when the feed lost entries."""
        loop = asyncio.get_running_loop()
        self._rereading = True
        first = self.progress.state != "done"
        if first:
            self.progress = LoadStatus("loading", 0, loop.time())
        try:
            cursor: str | None = None
            while True:
                records, cursor = await self._store.page(cursor=cursor, limit=_PAGE)
                for i, (name, record) in enumerate(records, 1):
                    if isinstance(record, RecordUnreadable):
                        log.error("connection.unreadable", connection=name, reason=record.message)
                    else:
                        await self.apply(name, record)
                    if first:
                        self.progress.loaded += 1
                    if i % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                if cursor is None:
                    break
        finally:
            self._rereading = False
        if first:
            self.progress.state, self.progress.finished = "done", loop.time()
            self.loaded.set()
            log.info(
                "registry.loaded",
                connections=self.progress.loaded,
                seconds=round(self.progress.finished - (self.progress.started or 0.0), 3),
            )

    async def changed(self, name: str) -> None:
        """The store reports a write of `name`: reload or create it here."""
        found = await self._store.load_many([name])
        await self._changed(name, found.get(name))

    async def changed_batch(self, batch: Batch) -> bool:
        """Apply a batch of feed entries in order, their records read in one round trip.

        True when an entry says the feed lost entries (those after it are left: a reread
        follows). A store that fails the read raises, and the position stays before the
        batch, so the batch is read again.
        """
        cut = next((i for i, (_, name) in enumerate(batch) if name is None), len(batch))
        entries = batch[:cut]
        if entries:
            found = await self._store.load_many([name for _, name in entries if name])
            done: set[str] = set()
            for position, name in entries:
                assert name is not None
                if name not in done:  # one record per id: the one stored now, the newest
                    done.add(name)
                    try:
                        await self._changed(name, found.get(name))
                    except StoreUnavailable:
                        pass  # its own re-read failed: the next write of it, or a reread
                    except Exception:  # one bad record must not end the feed for good
                        log.exception("registry.change.crashed", connection=name)
                self._position = position
        return cut < len(batch)

    async def _changed(self, name: str, found: TokenRecord | RecordUnreadable | None) -> None:
        credential = self.connections.get(name)
        if credential is not None and (
            isinstance(found, RecordUnreadable)
            or credential.unsaved
            or getattr(credential, "unreadable", None) is not None
        ):
            # Its own reload: a write-back first, or the unreadable state set or cleared.
            await credential.reload()
            self._note(name)
            return
        if isinstance(found, RecordUnreadable):
            # The reason says which record and why; a traceback would add nothing.
            log.error("store.record_unreadable", credential=name, reason=found.message)
            return
        if found is not None:
            await self.apply(name, found)

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
        # The property index and the counts follow every adopted record.
        credential.listener = self._adopted
        credential.pending = self._pending
        # Known before the first await: a feed entry or an admin call for the same id that
        # arrives while it starts finds it, rather than making a second one.
        self.connections[settings.name] = credential
        if record is not None:
            credential.adopt(record)
        # The record just read is handed over: a start reads the store only without one.
        await credential.start(record)
        if not self._one_shot:
            self._tasks[settings.name] = asyncio.create_task(
                credential.run(), name=f"refresh:{settings.name}"
            )
        self._index(settings.name, credential.properties)
        self._note(settings.name)
        return credential

    async def _remove(self, name: str) -> None:
        self._index(name, ())  # routing never meets an id that is no longer there
        credential = self.connections.pop(name)
        self._pending.discard(name)
        self._note(name)
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
                async for batch in self._store.change_batches(self._position):
                    delay = 0.5
                    if await self.changed_batch(batch):
                        self._reread_first = True
                        break
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

    async def find(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Credential:
        """`route`, and while stored connections are still loading, the store for a miss.

        A miss by id is looked up in the store; so is a property the first time it is
        asked for during the load, hit or miss (a connection not loaded yet may cover it
        too: a live one in place of a disconnected one, or a second one that makes it
        ambiguous). Lookups are single-flight per id or property; then routed again.
        After the load, `route` alone: dictionary lookups.
        """
        if not self.loading:
            if self._checked:
                self._checked.clear()
            return self.route(headers, query)
        name = next((headers[s] for s in CONNECTION_SELECTORS if s in headers), None)
        prop = _property(headers, query) if name is None else None
        try:
            found = self.route(headers, query)
        except (UnknownConnection, UnknownProperty):
            found = None
        if found is not None and (name is not None or prop is None or prop in self._checked):
            return found
        if name is not None:
            await self._once("id:" + name, lambda: self._fetch(name))
        elif prop is not None:
            await self._once("property:" + prop, lambda: self._fetch_covering(prop))
            self._checked.add(prop)
        return self.route(headers, query)

    async def _once(self, key: str, lookup: Callable[[], Awaitable[None]]) -> None:
        """One store lookup per key at a time; every request that misses on it awaits it."""
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.ensure_future(lookup())
            self._lookups[key] = task
            task.add_done_callback(functools.partial(self._looked_up, key))
        await asyncio.shield(task)

    def _looked_up(self, key: str, task: asyncio.Task[None]) -> None:
        if self._lookups.get(key) is task:
            del self._lookups[key]
        if not task.cancelled():
            task.exception()  # retrieved: its awaiters got it, or have gone

    async def _fetch(self, name: str) -> None:
        if name in self.connections or not CONNECTION_ID.fullmatch(name):
            return
        record = await self._store.load(name)
        if record is not None and name not in self.connections:
            await self._create(name, record)

    async def _fetch_covering(self, prop: str) -> None:
        names = [n for n in await self._store.covering(prop) if n not in self.connections]
        if not names:
            return
        for name, record in (await self._store.load_many(names)).items():
            if isinstance(record, RecordUnreadable):
                log.error("connection.unreadable", connection=name, reason=record.message)
            elif name not in self.connections:
                await self._create(name, record)

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

    def unsaved(self) -> list[Credential]:
        """The connections holding a write the store has not taken: what a write-back visits."""
        return [self.connections[n] for n in list(self._pending) if n in self.connections]

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
        # Lookups first, and awaited: one that made a connection after the refresh tasks
        # were cancelled would leave its task running on a closed store.
        lookups = list(self._lookups.values())
        for lookup in lookups:
            lookup.cancel()
        await asyncio.gather(*lookups, return_exceptions=True)
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
