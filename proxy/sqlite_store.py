"""The store without Redis: one SQLite file (CBPROXY_STATE_FILE), so a restart loses nothing.

Refresh tokens that Cloudbeds rotated, codes exchanged at install and API keys exist
nowhere else, so every write is a transaction that is on disk when it returns
(`synchronous=FULL`). The same rules as every store (`proxy.store`): the generation
compare-and-set, the indexes and the events in one transaction, the change feed as a
table that followers poll by sequence number (a CLI command on the same file is seen by
the running proxy within a poll). Locks are rows with an expiry, so a CLI command and a
running proxy never refresh one connection twice.

sqlite3 is blocking: every call runs on one worker thread of this store's own, in order.
Every sqlite3 error is translated here, once, into `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import secrets
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from proxy.clock import Clock, system_clock
from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable, StoreUnavailable
from proxy.events import Event
from proxy.store import STATE_TTL, Batch, Page, RecordCodec, flatten, readable
from proxy.tokens import TokenRecord

T = TypeVar("T")
FEED_KEPT = 100_000
POLL_INTERVAL = 0.5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, generation INTEGER NOT NULL, data TEXT NOT NULL, app TEXT);
CREATE INDEX IF NOT EXISTS records_app ON records (app, id);
CREATE TABLE IF NOT EXISTS covers (prop TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (prop, id));
CREATE TABLE IF NOT EXISTS feed (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS states (state TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS used (id TEXT PRIMARY KEY, at REAL NOT NULL);
"""


@contextlib.contextmanager
def _sqlite_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreUnavailable(
            f"the state file cannot be used ({type(exc).__name__}); check CBPROXY_STATE_FILE's "
            "disk and permissions"
        ) from exc


class SqliteLock:
    """A row in `locks` with an owner and an expiry; released only by its owner."""

    def __init__(self, store: SqliteStore, name: str, ttl: float) -> None:
        self._store, self._name, self._ttl = store, name, ttl
        self._owner = secrets.token_hex(8)

    async def acquire(self) -> bool:
        return await self._store._run(self._acquire)

    def _acquire(self, db: sqlite3.Connection) -> bool:
        now = self._store.clock()
        with db:
            db.execute("DELETE FROM locks WHERE name = ? AND expires_at <= ?", (self._name, now))
            db.execute(
                "INSERT OR IGNORE INTO locks VALUES (?, ?, ?)",
                (self._name, self._owner, now + self._ttl),
            )
            row = db.execute("SELECT owner FROM locks WHERE name = ?", (self._name,)).fetchone()
        return bool(row and row[0] == self._owner)

    async def release(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._store._run(self._release)

    def _release(self, db: sqlite3.Connection) -> None:
        with db:
            db.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (self._name, self._owner))


class SqliteStore:
    """`TokenStore` in one SQLite file, for one replica (and the CLI beside it)."""

    shared = False

    def __init__(
        self, path: str | Path, *, cipher: TokenCipher | None = None, clock: Clock = system_clock
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self._codec = RecordCodec(cipher)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.isolation_level = "DEFERRED"  # `with db:` makes each write a transaction
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with _sqlite_errors():
                return fn(self._open())

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def load(self, name: str) -> TokenRecord | None:
        row = await self._run(
            lambda db: db.execute("SELECT data FROM records WHERE id = ?", (name,)).fetchone()
        )
        return None if row is None else self._codec.decode(name, row[0])

    async def load_many(self, names: Sequence[str]) -> dict[str, TokenRecord | RecordUnreadable]:
        """One query (per `_IN_CHUNK` ids: SQLite bounds the parameters of a statement)."""
        unique = list(dict.fromkeys(names))
        rows = await self._run(functools.partial(_records_of, unique))
        return {n: self._codec.decode_or_error(n, raw) for n, raw in rows}

    async def put(self, name: str, record: TokenRecord, *, events: Sequence[Event] = ()) -> bool:
        data = self._codec.encode(record)
        return await self._run(lambda db: self._put(db, name, record, data, events))

    @staticmethod
    def _put(
        db: sqlite3.Connection, name: str, record: TokenRecord, data: str, events: Sequence[Event]
    ) -> bool:
        with db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT generation FROM records WHERE id = ?", (name,)).fetchone()
            if row is not None and row[0] >= record.generation:
                return False
            db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                (name, record.generation, data, record.app),
            )
            db.execute("DELETE FROM covers WHERE id = ?", (name,))
            db.executemany(
                "INSERT INTO covers VALUES (?, ?)", [(p, name) for p in record.properties]
            )
            db.executemany(
                "INSERT INTO outbox (event_id, data) VALUES (?, ?)",
                [(e.id, e.to_json()) for e in events],
            )
            seq = db.execute("INSERT INTO feed (id) VALUES (?)", (name,)).lastrowid or 0
            db.execute("DELETE FROM feed WHERE seq <= ?", (seq - FEED_KEPT,))
        return True

    async def page(
        self, *, app: str | None = None, cursor: str | None = None, limit: int = 100
    ) -> Page:
        query = "SELECT id, data FROM records WHERE id > ?"
        args: list[Any] = [cursor or ""]
        if app is not None:
            query += " AND app = ?"
            args.append(app)
        query += " ORDER BY id LIMIT ?"
        args.append(limit + 1)
        rows = await self._run(lambda db: db.execute(query, args).fetchall())
        records = [(n, self._codec.decode_or_error(n, raw)) for n, raw in rows[:limit]]
        return records, (rows[limit - 1][0] if len(rows) > limit else None)

    async def covering(self, prop: str) -> list[str]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id FROM covers WHERE prop = ? ORDER BY id", (prop,)
            ).fetchall()
        )
        return [row[0] for row in rows]

    def lock(self, name: str, ttl: float) -> SqliteLock:
        return SqliteLock(self, name, ttl)

    async def position(self) -> str:
        row = await self._run(lambda db: db.execute("SELECT MAX(seq) FROM feed").fetchone())
        return str(row[0] or 0)

    def changes(self, since: str) -> AsyncIterator[tuple[str, str | None]]:
        return flatten(self.change_batches(since))

    async def change_batches(self, since: str) -> AsyncGenerator[Batch, None]:
        seen = int(since)
        oldest = await self._run(lambda db: db.execute("SELECT MIN(seq) FROM feed").fetchone())
        if seen and oldest[0] is not None and oldest[0] > seen + 1:
            yield [(since, None)]  # entries after our position were trimmed away
        while True:
            rows = await self._run(functools.partial(_feed_after, seen))
            if rows:
                seen = rows[-1][0]
                yield [(str(seq), name) for seq, name in rows]
            else:
                await asyncio.sleep(POLL_INTERVAL)

    async def save_state(self, state: str, data: Mapping[str, str]) -> None:
        expires_at, raw = self.clock() + STATE_TTL, json.dumps(dict(data))

        def save(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM states WHERE expires_at <= ?", (self.clock(),))
                db.execute(
                    "INSERT OR REPLACE INTO states VALUES (?, ?, ?)", (state, raw, expires_at)
                )

        await self._run(save)

    async def take_state(self, state: str) -> dict[str, str] | None:
        def take(db: sqlite3.Connection) -> Any:
            with db:
                row = db.execute(
                    "SELECT data, expires_at FROM states WHERE state = ?", (state,)
                ).fetchone()
                db.execute("DELETE FROM states WHERE state = ?", (state,))
            return row

        row = await self._run(take)
        if row is None or row[1] <= self.clock():
            return None
        return dict(json.loads(row[0]))

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        def take(db: sqlite3.Connection) -> bool:
            now = self.clock()
            with db:
                db.execute(
                    "DELETE FROM locks WHERE name = '' AND (expires_at <= ? OR owner = ?)",
                    (now, owner),
                )
                db.execute("INSERT OR IGNORE INTO locks VALUES ('', ?, ?)", (owner, now + ttl))
                row = db.execute("SELECT owner FROM locks WHERE name = ''").fetchone()
            return bool(row and row[0] == owner)

        return await self._run(take)

    async def outbox_pending(self, limit: int) -> list[Event]:
        if limit <= 0:  # a negative LIMIT would be the whole outbox
            return []
        rows = await self._run(
            lambda db: db.execute(
                "SELECT event_id, data FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        )
        return readable((row[0], row[1]) for row in rows)

    async def outbox_done(self, event_id: str) -> None:
        def done(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM outbox WHERE event_id = ?", (event_id,))

        await self._run(done)

    async def outbox_retry(self, event: Event) -> None:
        def retry(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "UPDATE outbox SET data = ? WHERE event_id = ?", (event.to_json(), event.id)
                )

        await self._run(retry)

    async def touch(self, used: Mapping[str, float]) -> None:
        def touch(db: sqlite3.Connection) -> None:
            with db:
                db.executemany(
                    "INSERT INTO used VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET at = "
                    "MAX(at, excluded.at)",
                    list(used.items()),
                )

        if used:
            await self._run(touch)

    async def last_used(self, names: Sequence[str]) -> dict[str, float]:
        query = f"SELECT id, at FROM used WHERE id IN ({','.join('?' * len(names))})"  # noqa: S608
        rows = await self._run(lambda db: db.execute(query, names).fetchall())
        return {row[0]: row[1] for row in rows}

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(close)
        self._executor.shutdown(wait=True)


_IN_CHUNK = 500
"""Ids per `IN (...)` query: below SQLite's oldest bound on a statement's parameters."""


def _records_of(names: Sequence[str], db: sqlite3.Connection) -> list[Any]:
    rows: list[Any] = []
    for start in range(0, len(names), _IN_CHUNK):
        chunk = names[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT id, data FROM records WHERE id IN ({marks})"  # noqa: S608
        rows += db.execute(query, chunk).fetchall()
    return rows


def _feed_after(seen: int, db: sqlite3.Connection) -> list[Any]:
    query = "SELECT seq, id FROM feed WHERE seq > ? ORDER BY seq LIMIT 500"
    return db.execute(query, (seen,)).fetchall()
