"""Fair shares of one budget among the connections that wait for it: round robin.

Rules (pure: no clock, no I/O; the limiter hands out the slots):

- Each connection with waiters has a FIFO queue. Connections take turns in the order they
  started waiting: the next slot goes to the head of the first connection's queue, and that
  connection moves to the back of the turn order if it still has waiters.
- A connection without waiters holds no state: its queue is dropped when it empties, so the
  structure never grows with the number of connections ever seen, only with the waiters.
- A request that joins connection c's queue behind q_c of c's own waiters is served within
  q_c + sum over the other connections j of min(q_j, q_c + 1) slots: c needs q_c + 1
  rounds, and in each round every other connection takes at most one slot.
- When the process holds as many waiters as it may, a connection with none may still join
  by evicting the newest waiter of the longest queue: a flood cannot lock the others out.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-connection FIFO queues of waiters, served round robin."""

    __slots__ = ("_queues", "_size")

    def __init__(self) -> None:
        # A dict keeps insertion order: its first key is the connection whose turn it is.
        self._queues: dict[str, collections.deque[T]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        return key in self._queues

    def connections(self) -> int:
        """Connections that have waiters now."""
        return len(self._queues)

    def waiters(self) -> list[T]:
        """Every waiter, in no particular order."""
        return [item for queue in self._queues.values() for item in queue]

    def join(self, key: str, item: T) -> None:
        """Queue `item` behind the waiters of connection `key`."""
        self._queues.setdefault(key, collections.deque()).append(item)
        self._size += 1

    def slots_ahead(self, key: str) -> int:
        """Slots handed out, at most, before a request joining `key` now is served."""
        own = len(self._queues.get(key, ()))
        others = sum(min(len(q), own + 1) for k, q in self._queues.items() if k != key)
        return own + others

    def pop(self) -> T | None:
        """The waiter whose turn it is, removed; None when nobody waits."""
        if not self._queues:
            return None
        key = next(iter(self._queues))
        queue = self._queues.pop(key)
        item = queue.popleft()
        if queue:
            self._queues[key] = queue  # to the back of the turn order
        self._size -= 1
        return item

    def remove(self, key: str, item: T) -> bool:
        """Take `item` out of `key`'s queue (it left, or its time ran out); False if absent."""
        queue = self._queues.get(key)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        if not queue:
            del self._queues[key]
        self._size -= 1
        return True

    def evict(self) -> T | None:
        """The newest waiter of the longest queue, removed; None when nobody waits."""
        if not self._queues:
            return None
        key = max(self._queues, key=lambda k: len(self._queues[k]))
        queue = self._queues[key]
        item = queue.pop()
        if not queue:
            del self._queues[key]
        self._size -= 1
        return item
