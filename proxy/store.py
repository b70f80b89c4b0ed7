"""Where token records live: the interface, and the in-process store for one replica.

The Redis store (`proxy.redis_store`) implements the same interface for a fleet.
Every store obeys one write rule: `put` succeeds only when the record's generation is
greater than the stored one (or nothing is stored), atomically. Readers and writers
otherwise never coordinate through the store; the lock does that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from proxy.tokens import TokenRecord


class RefreshLock(Protocol):
    """A lock for one credential's refresh, held by one owner at a time."""

    async def acquire(self) -> bool:
        """Try once, without blocking; True when this owner now holds the lock."""

    async def release(self) -> None:
        """Release if still held by this owner; never releases someone else's lock."""


class TokenStore(Protocol):
    shared: bool
    """True when other processes see the same records (Redis)."""

    async def load(self, name: str) -> TokenRecord | None:
        """The stored record for credential `name`, or None."""

    async def put(self, name: str, record: TokenRecord) -> bool:
        """Store `record` iff its generation exceeds the stored one; publish the change."""

    def lock(self, name: str, ttl: float) -> RefreshLock:
        """A new lock object for one acquisition of `name`'s refresh lock."""

    def changes(self) -> AsyncIterator[str]:
        """Names of credentials whose record changed, as other writers publish them."""

    async def ping(self) -> None:
        """Raise `StoreUnavailable` when the store cannot be reached."""

    async def close(self) -> None: ...


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
    """The default store: one process, nothing persisted."""

    shared = False

    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}
        self._held: set[str] = set()
        self._queues: set[asyncio.Queue[str]] = set()

    async def load(self, name: str) -> TokenRecord | None:
        return self._records.get(name)

    async def put(self, name: str, record: TokenRecord) -> bool:
        current = self._records.get(name)
        if current is not None and record.generation <= current.generation:
            return False
        self._records[name] = record
        for queue in self._queues:
            queue.put_nowait(name)
        return True

    def lock(self, name: str, ttl: float) -> RefreshLock:
        return _MemoryLock(self._held, name)

    async def changes(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)

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
