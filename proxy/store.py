"""Where connections live: the interface, the record codec, and the in-process store.

Three stores implement `TokenStore`: this in-process one (tests, and nothing persisted),
`proxy.sqlite_store` (one replica, a file: the default without Redis) and
`proxy.redis_store` (a fleet). Every store obeys the same rules:

- `put` succeeds only when the record's generation is greater than the stored one (or
  nothing is stored), atomically with the events it carries (the outbox) and the indexes
  (by app, by property). Which record wins after a refusal is `proxy.tokens.resolve`.
- Every successful `put` appends the connection id to the change feed; `changes()` follows
  it from a position, so a follower that lost its link resumes where it was. An id of
  `None` means "the feed lost entries you had not read: reread everything".
  `change_batches()` is the same feed as lists of entries, one store read each, so a
  follower reads the records of a whole batch with one `load_many`.
- An install state is single use and lives 10 minutes (`save_state`, `take_state`).
- Outbox events are delivered by the one replica that holds the outbox lease.
- Records are encoded by `RecordCodec`: with a cipher, tokens are ciphertext at rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

import structlog

from proxy.clock import Clock, system_clock
from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable
from proxy.events import Event
from proxy.tokens import TokenRecord

log = structlog.get_logger("proxy.store")

STATE_TTL = 600.0
"""Seconds an install state lives: as long as the authorization code it protects."""
_SECRET_FIELDS = ("access_token", "refresh_token")
_FEED_BATCH = 500

Batch = list[tuple[str, str | None]]
"""(position, id) entries of the change feed that one read returned, in feed order."""

Page = tuple[list[tuple[str, TokenRecord | RecordUnreadable]], str | None]
"""(id and record pairs in id order, the cursor of the next page or None). A record that
cannot be read is its error, so one bad record never hides the others."""


class RefreshLock(Protocol):
    """A lock for one connection's refresh, held by one owner at a time."""

    async def acquire(self) -> bool:
        """Try once, without blocking; True when this owner now holds the lock."""

    async def release(self) -> None:
        """Release if still held by this owner; never releases someone else's lock."""


class TokenStore(Protocol):
    shared: bool
    """True when other processes see the same records at once (Redis)."""

    async def load(self, name: str) -> TokenRecord | None:
        """The stored record of connection `name`, or None."""

    async def load_many(self, names: Sequence[str]) -> dict[str, TokenRecord | RecordUnreadable]:
        """The stored records of `names` in one round trip: id -> record, or the reason it
        cannot be read; an id with nothing stored is absent."""

    async def put(self, name: str, record: TokenRecord, *, events: Sequence[Event] = ()) -> bool:
        """Store `record` iff its generation exceeds the stored one, with `events`."""

    async def page(
        self, *, app: str | None = None, cursor: str | None = None, limit: int = 100
    ) -> Page:
        """Connections in id order after `cursor`, optionally of one app."""

    async def covering(self, prop: str) -> list[str]:
        """Ids of the connections whose record lists property `prop`."""

    def lock(self, name: str, ttl: float) -> RefreshLock:
        """A new lock object for one acquisition of `name`'s refresh lock."""

    async def position(self) -> str:
        """The change feed's current end, to follow it from there."""

    def changes(self, since: str) -> AsyncIterator[tuple[str, str | None]]:
        """(position, id) for each write after `since`; id None: entries were lost."""

    def change_batches(self, since: str) -> AsyncGenerator[Batch, None]:
        """The entries of `changes(since)`, as many at a time as one read of the feed gives."""

    async def save_state(self, state: str, data: Mapping[str, str]) -> None:
        """Keep an install state for `STATE_TTL` seconds."""

    async def take_state(self, state: str) -> dict[str, str] | None:
        """The state's data, removing it (single use); None if unknown or expired."""

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        """Take or renew the right to deliver events; True while `owner` holds it."""

    async def outbox_pending(self, limit: int) -> list[Event]:
        """Undelivered events, oldest first."""

    async def outbox_done(self, event_id: str) -> None: ...

    async def outbox_retry(self, event: Event) -> None:
        """Store the event's new attempt count and next attempt time."""

    async def touch(self, used: Mapping[str, float]) -> None:
        """Record when connections were last used (batched by the caller)."""

    async def last_used(self, names: Sequence[str]) -> dict[str, float]: ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` when the store cannot be reached."""

    async def close(self) -> None: ...


class SharedBudgets(Protocol):
    """The rate limiter's state shared by a fleet (Redis), on the store's own clock.

    Every call raises `StoreUnavailable` when the store cannot answer; the limiter then
    falls back to a local share. `proxy.ratelimit` holds the rules these apply.
    """

    async def budget_admit(
        self, budget: str, interval: float, burst: int, max_wait: float
    ) -> tuple[float, float, float, float]:
        """(allowed 1 or 0, delay, paused for, tat - now) for the next request of `budget`."""

    async def budget_pause(self, budget: str, seconds: float) -> None:
        """No slot of `budget` starts for `seconds` (Cloudbeds asked for a pause)."""

    async def heartbeat(self, replica_id: str, dead_after: float) -> int:
        """Register this replica as alive; the number of replicas alive."""


class RecordCodec:
    """A record as stored text: JSON, its tokens encrypted when a cipher is set.

    An encrypted record carries `"enc": 1`. A plaintext record still reads with a cipher
    (migration: the next write encrypts it); an encrypted one never reads without.
    """

    def __init__(self, cipher: TokenCipher | None) -> None:
        self._cipher = cipher

    def encode(self, record: TokenRecord) -> str:
        data = record.to_json()
        if self._cipher is not None:
            for field in _SECRET_FIELDS:
                if data[field] is not None:
                    data[field] = self._cipher.encrypt(data[field])
            data["enc"] = 1
        return json.dumps(data, separators=(",", ":"))

    def decode_or_error(self, name: str, raw: bytes | str) -> TokenRecord | RecordUnreadable:
        """The record, or the reason it cannot be read (for listings)."""
        try:
            return self.decode(name, raw)
        except RecordUnreadable as exc:
            return exc

    def decode(self, name: str, raw: bytes | str) -> TokenRecord:
        try:
            data = json.loads(raw)
            encrypted = bool(data.pop("enc", 0))
        except (ValueError, TypeError, AttributeError):
            raise RecordUnreadable(
                f"stored record for connection {name!r} is not valid JSON; "
                "restore it from a backup or authorise the connection again"
            ) from None
        if encrypted:
            if self._cipher is None:
                raise RecordUnreadable(
                    f"stored record for connection {name!r} is encrypted but "
                    "CBPROXY_ENCRYPTION_KEY is not set; set the key that wrote it"
                )
            for field in _SECRET_FIELDS:
                value = data.get(field)
                if value is not None and not isinstance(value, str):
                    raise RecordUnreadable(
                        f"stored record for connection {name!r} holds a {field} that is not "
                        "ciphertext; restore it from a backup or authorise the connection again"
                    )
                if value is not None:
                    data[field] = self._cipher.decrypt(value)
        try:
            return TokenRecord.from_json(data)
        except (KeyError, ValueError, TypeError):
            raise RecordUnreadable(
                f"stored record for connection {name!r} is missing fields or malformed; "
                "restore it from a backup or authorise the connection again"
            ) from None


def readable(stored: Iterable[tuple[str, str | bytes | None]]) -> list[Event]:
    """The outbox entries (id, JSON) this version can read, in order.

    One it cannot (a type added by a newer replica during a rolling upgrade, or damage)
    is skipped with a warning and left in place for a replica that can: one unreadable
    entry must not stop every delivery behind it.
    """
    events = []
    for event_id, raw in stored:
        if raw is None:
            continue
        try:
            events.append(Event.from_json(raw))
        except ValueError as exc:
            log.warning("events.unreadable", event_id=str(event_id)[:64], reason=str(exc))
    return events


async def flatten(batches: AsyncGenerator[Batch, None]) -> AsyncIterator[tuple[str, str | None]]:
    """`changes()` from `change_batches()`: one entry at a time. Closing it closes the
    batches' generator too, at once (its blocking read holds a pooled connection)."""
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for entry in batch:
                yield entry


def after(names: Iterable[str], cursor: str | None, limit: int) -> tuple[list[str], str | None]:
    """One page of sorted `names` after `cursor`, and the next page's cursor."""
    chosen = sorted(n for n in names if cursor is None or n > cursor)
    page = chosen[:limit]
    return page, (page[-1] if len(chosen) > limit else None)


class _MemoryLock:
    def __init__(self, held: set[str], name: str) -> None:
        self._held, self._name, self._mine = held, name, False

    async def acquire(self) -> bool:
        if self._name in self._held:
            return False
        self._held.add(self._name)
        self._mine = True
        return True

    async def release(self) -> None:
        if self._mine:
            self._held.discard(self._name)
            self._mine = False


class MemoryStore:
    """One process, nothing persisted: for tests and throwaway runs."""

    shared = False

    def __init__(self, clock: Clock = system_clock) -> None:
        self._clock = clock
        self._records: dict[str, TokenRecord] = {}
        self._held: set[str] = set()
        self._feed: list[str] = []
        self._grew = asyncio.Condition()
        self._states: dict[str, tuple[float, dict[str, str]]] = {}
        self._outbox: dict[str, Event] = {}
        self._lease: tuple[str, float] = ("", 0.0)
        self._used: dict[str, float] = {}

    async def load(self, name: str) -> TokenRecord | None:
        return self._records.get(name)

    async def load_many(self, names: Sequence[str]) -> dict[str, TokenRecord | RecordUnreadable]:
        return {n: self._records[n] for n in names if n in self._records}

    async def put(self, name: str, record: TokenRecord, *, events: Sequence[Event] = ()) -> bool:
        current = self._records.get(name)
        if current is not None and record.generation <= current.generation:
            return False
        self._records[name] = record
        self._outbox.update((event.id, event) for event in events)
        self._feed.append(name)
        async with self._grew:
            self._grew.notify_all()
        return True

    async def page(
        self, *, app: str | None = None, cursor: str | None = None, limit: int = 100
    ) -> Page:
        names = (n for n, r in self._records.items() if app is None or r.app == app)
        chosen, following = after(names, cursor, limit)
        return [(n, self._records[n]) for n in chosen], following

    async def covering(self, prop: str) -> list[str]:
        return sorted(n for n, r in self._records.items() if prop in r.properties)

    def lock(self, name: str, ttl: float) -> RefreshLock:
        return _MemoryLock(self._held, name)

    async def position(self) -> str:
        return str(len(self._feed))

    def changes(self, since: str) -> AsyncIterator[tuple[str, str | None]]:
        return flatten(self.change_batches(since))

    async def change_batches(self, since: str) -> AsyncGenerator[Batch, None]:
        seen = int(since)
        while True:
            async with self._grew:
                await self._grew.wait_for(functools.partial(self._newer, seen))
            end = min(len(self._feed), seen + _FEED_BATCH)
            batch: Batch = [(str(i + 1), self._feed[i]) for i in range(seen, end)]
            seen = end
            yield batch

    def _newer(self, seen: int) -> bool:
        return len(self._feed) > seen

    async def save_state(self, state: str, data: Mapping[str, str]) -> None:
        self._states[state] = (self._clock() + STATE_TTL, dict(data))

    async def take_state(self, state: str) -> dict[str, str] | None:
        expires_at, data = self._states.pop(state, (0.0, {}))
        return data if self._clock() < expires_at else None

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        holder, until = self._lease
        if holder not in ("", owner) and self._clock() < until:
            return False
        self._lease = (owner, self._clock() + ttl)
        return True

    async def outbox_pending(self, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        return list(self._outbox.values())[:limit]

    async def outbox_done(self, event_id: str) -> None:
        self._outbox.pop(event_id, None)

    async def outbox_retry(self, event: Event) -> None:
        if event.id in self._outbox:
            self._outbox[event.id] = event

    async def touch(self, used: Mapping[str, float]) -> None:
        for name, at in used.items():
            self._used[name] = max(at, self._used.get(name, 0.0))

    async def last_used(self, names: Sequence[str]) -> dict[str, float]:
        return {n: self._used[n] for n in names if n in self._used}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def held(lock: RefreshLock) -> AsyncIterator[bool]:
    """Try `lock` once; yield whether it is held, and release it on the way out."""
    acquired = await lock.acquire()
    try:
        yield acquired
    finally:
        if acquired:
            await lock.release()
