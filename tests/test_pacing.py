"""The pacer: one replica's ahead-of-time refreshes of one app, spread over time."""

from __future__ import annotations

import pytest

from proxy.clock import FakeClock
from proxy.pacing import Pacer
from proxy.refresh import PACE_FACTOR, PACE_MIN_ELAPSED


def test_a_lone_refresh_is_not_delayed() -> None:
    pacer = Pacer(FakeClock())
    assert pacer.slot(30.0) == 0.0


def test_a_crowd_at_one_instant_is_spread_and_bounded() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    delays = [pacer.slot(5.0) for _ in range(40)]
    assert delays[0] == 0.0
    assert max(delays) <= 5.0  # never beyond the bound: past it, at once
    assert 0.0 in delays[1:]
    # With no history the rate is estimated over 10 s: a crowd is let through slowly.
    assert delays[1] == pytest.approx(1 / max(1.0, PACE_FACTOR * 1 / PACE_MIN_ELAPSED))


def test_a_steady_rate_is_paced_at_a_multiple_of_it() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    arrived, starts = [], []
    for _ in range(3000):  # five a second, evenly
        clock.advance(0.2)
        arrived.append(clock())
        starts.append(clock() + pacer.slot(30.0))
    delays = [s - a for s, a in zip(starts, arrived, strict=True)]
    assert max(delays) < 30.0  # the start, while the estimate catches up
    assert max(delays[300:]) < 1.0  # then hardly any
    per_second: dict[int, int] = {}
    for start in starts:
        per_second[int(start)] = per_second.get(int(start), 0) + 1
    assert max(per_second.values()) <= 2 * 5


def test_after_an_idle_spell_the_rate_is_estimated_afresh() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    for _ in range(600):
        clock.advance(0.1)
        pacer.slot(30.0)
    clock.advance(3600)  # an hour without refreshes
    assert pacer.slot(30.0) == 0.0
    assert 0.5 < pacer.slot(30.0) <= 1.0  # one known arrival: about one a second
