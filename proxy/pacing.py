"""Spreads one replica's ahead-of-time refreshes of one budget over time (`refresh.paced`).

Hashing spreads connections over the grid evenly on average, but a second can still hold
three times the mean. A `Pacer` per budget (an app) hands out start times at most
`refresh.PACE_FACTOR` times as fast as refreshes have been coming due on this replica
over the last ten minutes: a refresh due in a crowded second waits a few seconds (never
more than `refresh.pace_limit`: 30 s, half the time its token has left, 1 % of its
cycle). Only refreshes of tokens that are still valid are paced; a request waiting for a
token never is.
"""

from __future__ import annotations

import asyncio
import collections

from proxy.clock import Clock
from proxy.refresh import pace_spacing, paced

_WINDOW = 600.0
"""Seconds of arrivals the rate is estimated from."""


class Pacer:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._arrivals: collections.deque[float] = collections.deque()
        self._free_at = 0.0

    def slot(self, max_delay: float) -> float:
        """Seconds to wait before a refresh that comes due now; reserves the slot."""
        now = self._clock()
        self._arrivals.append(now)
        while self._arrivals and self._arrivals[0] < now - _WINDOW:
            self._arrivals.popleft()
        # Since the oldest arrival kept: after an idle spell the estimate starts afresh.
        elapsed = now - self._arrivals[0]
        start = paced(now, self._free_at, max_delay)
        self._free_at = start + pace_spacing(len(self._arrivals), elapsed)
        return start - now

    async def wait(self, max_delay: float) -> None:
        """Wait for this refresh's slot (at most `max_delay` seconds)."""
        delay = self.slot(max_delay)
        if delay > 0:
            await asyncio.sleep(delay)
