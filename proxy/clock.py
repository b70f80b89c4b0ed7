"""Time, passed in: real wall clock for the shell, a fake one for tests and demos."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns seconds since the epoch. Token expiries are absolute epoch seconds."""

system_clock: Clock = time.time


class FakeClock:
    """A clock that only moves when told to; `now()` is the Clock callable."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds
