"""The refresh policy: a pure function of (record, now, policy)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import math

import pytest

from proxy.refresh import (
    PACE_FACTOR,
    PACE_MAX_DELAY,
    Action,
    Decision,
    RefreshPolicy,
    backoff,
    decide,
    grid_point,
    keepalive_after,
    keepalive_time,
    may_force,
    pace_limit,
    pace_spacing,
    paced,
    phase,
    refresh_time,
    refreshed,
)
from proxy.tokens import State, TokenRecord, seed_record

NOW = 1_700_000_000.0
POLICY = RefreshPolicy(leeway=300, max_jitter=30, backoff_base=1, backoff_cap=60)


def token(
    *, lifetime: float = 3600, age: float = 0, state: State = State.OK, refresh: str | None = "r"
) -> TokenRecord:
    """A record refreshed `age` seconds before NOW, living `lifetime` seconds."""
    issued = NOW - age
    return TokenRecord(
        access_token="a",
        expires_at=issued + lifetime,
        refresh_token=refresh,
        generation=3,
        state=state,
        refreshed_at=issued,
    )


def test_no_record_or_no_refresh_token_needs_auth() -> None:
    assert decide(None, NOW, POLICY) == Decision(Action.NEEDS_AUTH)
    assert decide(token(refresh=None), NOW, POLICY).action is Action.NEEDS_AUTH


def test_reauthorization_required_is_blocked_even_when_expired() -> None:
    record = token(state=State.REAUTHORIZATION_REQUIRED, age=10_000)
    assert decide(record, NOW, POLICY, retry_at=0).action is Action.BLOCKED


def test_seed_without_access_token_refreshes_at_once() -> None:
    assert decide(seed_record("r"), NOW, POLICY) == Decision(Action.REFRESH)


def test_seed_waits_for_a_pending_backoff() -> None:
    assert decide(seed_record("r"), NOW, POLICY, retry_at=NOW + 4) == Decision(
        Action.WAIT, at=NOW + 4
    )


def test_due_and_expired_tokens_refresh() -> None:
    record = token()
    assert decide(record, record.expires_at - 300, POLICY).action is Action.REFRESH
    assert decide(record, record.expires_at - 1, POLICY).action is Action.REFRESH
    assert decide(record, record.expires_at + 1000, POLICY).action is Action.REFRESH


def test_backoff_delays_a_due_refresh() -> None:
    record = token(age=3500)  # 100 s left: inside the leeway
    assert decide(record, NOW, POLICY, retry_at=NOW + 8) == Decision(Action.WAIT, at=NOW + 8)
    assert decide(record, NOW + 8, POLICY, retry_at=NOW + 8).action is Action.REFRESH


C = 3600 - 300
"""The grid's period for a one-hour token and the 300 s leeway."""


def place_for(offset_after_now: float, period: float = C) -> float:
    """The phase whose grid point lies `offset_after_now` seconds after NOW."""
    return ((NOW + offset_after_now) % period) / period


def test_phase_is_stable_spread_and_not_pythons_salted_hash() -> None:
    assert phase("alpha.property.1") == phase("alpha.property.1")
    expected = int(hashlib.sha256(b"default").hexdigest()[:16], 16) / 2**64
    assert phase("default") == expected
    places = {phase(f"alpha.property.{i}") for i in range(1000)}
    assert len(places) == 1000
    assert all(0 <= p < 1 for p in places)


@pytest.mark.parametrize(
    ("place", "period", "latest", "expected"),
    [
        (0.0, 100, 1000, 1000),  # on the grid: the latest itself
        (0.0, 100, 1050, 1000),
        (0.5, 100, 1049, 950),
        (0.5, 100, 1050, 1050),
        (0.25, 3300, NOW, NOW - ((NOW - 825) % 3300)),
    ],
)
def test_grid_point_is_the_latest_point_of_the_phase(
    place: float, period: float, latest: float, expected: float
) -> None:
    assert grid_point(place, period, latest) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (1000, NOW + 1000),  # the grid point inside the first cycle
        (3300, NOW + 3300),  # issued on the grid: a whole cycle, expires_at - leeway
        (2.0, NOW + 2.0),  # early in the cycle, but past the 1 s margin
        (0.5, NOW + 3300),  # within the margin after issue: expires_at - leeway instead
    ],
)
def test_a_used_token_is_refreshed_at_its_grid_point(after: float, expected: float) -> None:
    record = token()
    place = place_for(after)
    assert refresh_time(record, POLICY, place) == pytest.approx(expected)
    assert decide(record, NOW, POLICY, place=place) == Decision(
        Action.WAIT, at=pytest.approx(expected)
    )
    assert decide(record, expected, POLICY, place=place).action is Action.REFRESH


def test_the_grid_point_never_lies_after_expiry_minus_leeway() -> None:
    for i in range(2000):
        record = token(age=i * 7 % 3600)
        at = refresh_time(record, POLICY, phase(f"c{i}"))
        assert record.refreshed_at is not None
        assert record.refreshed_at < at <= record.expires_at - POLICY.leeway


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.999])
def test_the_replicas_offset_is_at_most_a_second_after_the_grid_point(offset: float) -> None:
    record, place = token(), place_for(1000)
    at = refresh_time(record, POLICY, place, offset)
    assert NOW + 1000 <= at < NOW + 1000 + POLICY.max_offset


@pytest.mark.parametrize("leeway", [0.0, 5.0, 300.0])
def test_the_offset_never_eats_more_than_a_tenth_of_the_leeway(leeway: float) -> None:
    policy = dataclasses.replace(POLICY, leeway=leeway)
    for i in range(200):
        record = token(age=i * 13 % 3600)
        at = refresh_time(record, policy, phase(f"c{i}"), offset=0.999)
        assert at <= record.expires_at - 0.9 * leeway


def test_eight_hour_token_is_on_its_own_grid() -> None:
    period = 8 * 3600 - 300
    record = token(lifetime=8 * 3600)
    assert refresh_time(record, POLICY, place_for(period, period)) == pytest.approx(NOW + period)
    assert refresh_time(record, POLICY, place_for(7000, period)) == pytest.approx(NOW + 7000)


@pytest.mark.parametrize("lifetime", [60, 10, 2])
def test_leeway_is_capped_at_half_the_lifetime(lifetime: float) -> None:
    record = token(lifetime=lifetime)
    for i in range(50):
        at = refresh_time(record, POLICY, phase(f"c{i}"))
        assert NOW < at <= NOW + lifetime / 2
    # The fresh token is not refreshed at once, whatever the configured leeway.
    assert decide(record, NOW, POLICY, place=0.3).action is Action.WAIT


def test_leeway_without_known_lifetime_is_the_configured_one() -> None:
    record = TokenRecord("a", NOW + 3600, "r", 1, refreshed_at=None)
    assert refresh_time(record, POLICY, 0.0) == NOW + 3600 - 300
    assert NOW + 3600 - 330 < refresh_time(record, POLICY, 0.5, 0.999) < NOW + 3600 - 300


# A configured credential (no grid) keeps expires_at - leeway - jitter.
CONFIGURED = dataclasses.replace(POLICY, grid=False)


def test_a_configured_credential_waits_until_expiry_minus_leeway() -> None:
    record = token()
    assert decide(record, NOW, CONFIGURED, place=0.3) == Decision(
        Action.WAIT, at=record.expires_at - 300
    )


def test_a_configured_eight_hour_token_refreshes_leeway_before_its_own_expiry() -> None:
    record = token(lifetime=8 * 3600)
    assert refresh_time(record, CONFIGURED, 0.3) == NOW + 8 * 3600 - 300


@pytest.mark.parametrize("lifetime", [60, 10, 1])
def test_a_configured_credentials_leeway_is_capped_at_half_the_lifetime(lifetime: float) -> None:
    record = token(lifetime=lifetime)
    assert refresh_time(record, CONFIGURED, 0.3) == NOW + lifetime / 2
    assert decide(record, NOW, CONFIGURED).action is Action.WAIT


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999])
def test_a_configured_credentials_jitter_only_makes_it_earlier(jitter: float) -> None:
    record = token()
    at = refresh_time(record, CONFIGURED, 0.3, jitter)
    latest = record.expires_at - POLICY.leeway
    assert latest - POLICY.max_jitter <= at <= latest


def test_a_configured_credentials_jitter_is_bounded_by_a_fifth_of_a_small_leeway() -> None:
    record = token(lifetime=60)  # leeway capped to 30 s, jitter to 6 s
    assert refresh_time(record, CONFIGURED, 0.3, 0.999) >= NOW + 30 - 6
    assert refresh_time(record, CONFIGURED, 0.3, 0.999) < NOW + 30


def test_steady_state_is_one_refresh_per_cycle_at_the_same_phase() -> None:
    place, issued, times = phase("alpha.property.1001"), NOW, []
    for cycle in range(30):
        record = token(age=NOW - issued)
        at = refresh_time(record, POLICY, place, offset=(cycle * 0.37) % 1)
        times.append(at)
        issued = at + 0.4  # the call starts at `at` and records when it started, a bit late
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # The first refresh joins the grid; every later one is exactly one cycle on.
    grid = [t - (t - place * C) % C for t in times[1:]]
    assert all(t - g < POLICY.max_offset for t, g in zip(times[1:], grid, strict=True))
    assert all(C - 1 < gap < C + 1 for gap in gaps[1:])


def test_ten_thousand_tokens_issued_at_once_spread_over_one_cycle() -> None:
    """An import or cold start of 10,000: first refreshes land uniformly over a cycle.

    Phases come from a hash, so per second the counts are balls in bins (a mean of 3 per
    second peaks near 3.5x); over windows of 10 s they stay within twice the mean.
    """
    names = [f"alpha.property.{100_000 + i}" for i in range(10_000)]
    record = token()
    firsts = [refresh_time(record, POLICY, phase(n), offset=0.5) for n in names]
    assert all(NOW < t <= NOW + C + POLICY.max_offset for t in firsts)
    for window, bound in ((10, 2.0), (60, 1.5), (1, 4.5)):
        counts = collections.Counter(int((t - NOW) // window) for t in firsts)
        mean = len(names) / (C / window)
        assert max(counts.values()) <= bound * mean, (window, max(counts.values()), mean)
    # The old rule (expires_at - leeway - up to 30 s) put all of them into 30 seconds.
    assert max(firsts) - min(firsts) > C - 10


def test_backoff_grows_and_is_capped() -> None:
    ceilings = [backoff(attempt, POLICY, 0.999999) for attempt in range(12)]
    assert ceilings[:6] == pytest.approx([1, 2, 4, 8, 16, 32], rel=1e-5)
    assert all(a <= b for a, b in itertools.pairwise(ceilings))
    assert max(ceilings) <= POLICY.backoff_cap
    assert ceilings[-1] == pytest.approx(60, rel=1e-5)


@pytest.mark.parametrize("attempt", [0, 3, 20])
def test_backoff_jitter_stays_within_half_to_full_ceiling(attempt: int) -> None:
    ceiling = min(POLICY.backoff_cap, POLICY.backoff_base * 2**attempt)
    assert backoff(attempt, POLICY, 0.0) == ceiling / 2
    assert ceiling / 2 <= backoff(attempt, POLICY, 0.7) < ceiling


def test_may_force_only_for_a_refreshable_token_not_brand_new() -> None:
    assert not may_force(None, NOW, POLICY)
    assert not may_force(token(refresh=None, age=100), NOW, POLICY)
    assert not may_force(token(state=State.REAUTHORIZATION_REQUIRED, age=100), NOW, POLICY)
    assert not may_force(token(age=1), NOW, POLICY)  # just refreshed: a 401 storm is one refresh
    assert may_force(token(age=POLICY.min_forced_interval), NOW, POLICY)
    assert may_force(seed_record("r"), NOW, POLICY)


def test_refreshed_keeps_the_old_refresh_token_when_none_is_returned() -> None:
    old = token(age=3400)
    new = refreshed(old, NOW, access_token="a2", expires_in=3600, refresh_token=None, properties=())
    assert new.refresh_token == "r"
    assert new.access_token == "a2"
    assert new.expires_at == NOW + 3600
    assert new.refreshed_at == NOW
    assert new.generation == old.generation + 1
    assert new.state is State.OK


def test_refreshed_takes_a_returned_refresh_token_and_properties() -> None:
    old = TokenRecord("a", NOW, "r-old", 7, properties=("1",))
    new = refreshed(
        old, NOW, access_token="a2", expires_in=28_800, refresh_token="r-new", properties=("2",)
    )
    assert new.refresh_token == "r-new"
    assert new.expires_at == NOW + 28_800
    assert new.properties == ("2",)
    assert new.generation == 8
    same = refreshed(old, NOW, access_token="a3", expires_in=1, refresh_token="", properties=())
    assert same.refresh_token == "r-old"
    assert same.properties == ("1",)


def test_a_forced_token_is_not_forced_again_before_forced_again_after() -> None:
    forced = dataclasses.replace(token(age=60), forced=True)
    assert not may_force(forced, NOW, POLICY)
    older = dataclasses.replace(token(age=POLICY.forced_again_after), forced=True)
    assert may_force(older, NOW, POLICY)
    assert may_force(token(age=60), NOW, POLICY)


# -- refresh what is used; keep-alives ------------------------------------------------------

APP = dataclasses.replace(POLICY, on_use=True)
WEEK = 7 * 24 * 3600.0


def imported(*, created: float = NOW, properties: tuple[str, ...] = ("1001",)) -> TokenRecord:
    """A connection imported with a refresh token alone (and the properties it covers)."""
    return TokenRecord(None, 0.0, "r", 1, app="alpha", created_at=created, properties=properties)


@pytest.mark.parametrize(
    ("policy", "last_used", "action"),
    [
        (POLICY, None, Action.WAIT),  # a configured credential: always ahead
        (APP, None, Action.IDLE),  # never used here
        (APP, NOW - 10, Action.WAIT),
        (APP, NOW - 3599, Action.WAIT),  # within one lifetime (the default idle_after)
        (APP, NOW - 3600, Action.IDLE),
        (dataclasses.replace(APP, idle_after=60), NOW - 59, Action.WAIT),
        (dataclasses.replace(APP, idle_after=60), NOW - 60, Action.IDLE),
    ],
)
def test_a_connection_of_an_app_is_refreshed_ahead_only_while_used(
    policy: RefreshPolicy, last_used: float | None, action: Action
) -> None:
    record = token(age=100)
    assert decide(record, NOW, policy, place=0.4, last_used=last_used).action is action


def test_an_idle_connection_sleeps_until_its_keepalive() -> None:
    record = token(age=3000)
    decision = decide(record, NOW, APP, place=0.4)
    assert decision.action is Action.IDLE
    assert decision.at == keepalive_time(record, APP, 0.4)
    assert record.refreshed_at is not None
    assert record.refreshed_at + WEEK / 2 < decision.at <= record.refreshed_at + WEEK
    assert decide(record, decision.at, APP, place=0.4) == Decision(Action.REFRESH, keepalive=True)
    # A failed keep-alive waits for its backoff.
    later = decision.at + 30
    assert decide(record, decision.at, APP, place=0.4, retry_at=later) == Decision(
        Action.IDLE, at=later
    )


def test_an_idle_token_past_its_refresh_time_is_left_to_expire() -> None:
    record = token(age=3400)  # due an hour ago's way: inside the leeway
    assert decide(record, NOW, APP, place=0.4).action is Action.IDLE
    assert decide(record, NOW, APP, place=0.4, last_used=NOW).action is Action.REFRESH


def test_an_import_without_an_access_token_waits_for_its_first_request() -> None:
    record = imported()
    decision = decide(record, NOW + 60, APP, place=0.7)
    assert decision.action is Action.IDLE
    assert NOW + WEEK / 2 < decision.at <= NOW + WEEK
    assert decide(record, NOW + 60, APP, place=0.7, last_used=NOW + 60) == Decision(Action.REFRESH)
    # Configured credentials keep refreshing a seed at once.
    assert decide(record, NOW, POLICY).action is Action.REFRESH


def test_an_import_that_names_no_property_is_refreshed_to_learn_them() -> None:
    # Its properties come with its first token; until then no request finds it by property.
    record = imported(properties=())
    assert decide(record, NOW, APP, place=0.7) == Decision(Action.REFRESH)
    assert decide(record, NOW, APP, place=0.7, retry_at=NOW + 5) == Decision(
        Action.WAIT, at=NOW + 5
    )


def test_a_record_of_unknown_age_has_no_keepalive() -> None:
    record = TokenRecord(None, 0.0, "r", 1, app="alpha", properties=("1001",))
    assert decide(record, NOW, APP, place=0.7) == Decision(Action.IDLE, at=math.inf)


@pytest.mark.parametrize("place", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_keepalive_after_lies_between_half_and_one_interval(place: float) -> None:
    at = keepalive_after(NOW, place, WEEK)
    assert NOW + WEEK / 2 < at <= NOW + WEEK


def test_keepalives_of_an_idle_connection_are_one_interval_apart() -> None:
    last, times = NOW, []
    for _ in range(10):
        last = keepalive_after(last, 0.3, WEEK, offset=0.5) + 2.0  # a call takes a while
        times.append(last)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(gap - WEEK) < 1.0 for gap in gaps)


def test_keepalives_of_connections_imported_together_are_spread() -> None:
    firsts = [keepalive_after(NOW, phase(f"alpha.property.{i}"), WEEK) for i in range(10_000)]
    counts = collections.Counter(int((t - NOW) // 60) for t in firsts)
    mean = 10_000 / (WEEK / 2 / 60)
    assert max(counts.values()) <= 6 * mean + 3  # a few per minute, never all at once
    assert max(firsts) - min(firsts) > WEEK / 2 - 3600


# -- pacing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrived", "free_at", "max_delay", "expected"),
    [
        (100.0, 0.0, 30.0, 100.0),  # the slot is free: at once
        (100.0, 102.5, 30.0, 102.5),  # a crowded moment: the next free slot
        (100.0, 131.0, 30.0, 100.0),  # too far: at once, never a token at risk
        (100.0, 130.0, 30.0, 130.0),
    ],
)
def test_paced_takes_the_next_free_slot_within_the_bound(
    arrived: float, free_at: float, max_delay: float, expected: float
) -> None:
    assert paced(arrived, free_at, max_delay) == expected


@pytest.mark.parametrize(
    ("arrivals", "elapsed", "spacing"),
    [
        (0, 0.0, 1.0),  # nothing known: one a second
        (10, 100.0, 1.0),  # slower than one a second: still one a second at most apart
        (30, 2.0, 1 / (PACE_FACTOR * 3)),  # estimated over 10 s at least
        (1800, 600.0, 1 / (PACE_FACTOR * 3)),
        (60_000, 600.0, 1 / (PACE_FACTOR * 100)),
    ],
)
def test_pace_spacing_follows_the_recent_rate(
    arrivals: int, elapsed: float, spacing: float
) -> None:
    assert pace_spacing(arrivals, elapsed) == pytest.approx(spacing)


def paced_starts(dues: list[float], window: float = 600.0) -> list[float]:
    """What one replica's pacer makes of refreshes coming due at `dues` (as `Pacer` does)."""
    free_at, arrivals, starts = 0.0, collections.deque[float](), []
    for due in sorted(dues):
        arrivals.append(due)
        while arrivals[0] < due - window:
            arrivals.popleft()
        start = paced(due, free_at, PACE_MAX_DELAY)
        free_at = start + pace_spacing(len(arrivals), due - arrivals[0])
        starts.append(start)
    return starts


@pytest.mark.parametrize("count", [10_000, 30_000, 100_000])
def test_paced_refreshes_of_connections_issued_at_once_stay_within_twice_the_mean(
    count: int,
) -> None:
    """The target: for N connections issued at one instant (an import, a cold start) the
    busiest second of token calls is at most twice the mean, and each is still refreshed
    long before its token expires."""
    record = token()
    dues = [
        refresh_time(record, POLICY, phase(f"alpha.property.{100_000 + i}"), offset=(i % 7) / 7)
        for i in range(count)
    ]
    starts = paced_starts(dues)
    counts = collections.Counter(int(t - NOW) for t in starts)
    mean = count / C
    assert max(counts.values()) <= 2 * mean, (max(counts.values()), mean)
    delays = [s - d for s, d in zip(starts, sorted(dues), strict=True)]
    assert max(delays) < PACE_MAX_DELAY
    assert max(starts) < record.expires_at - POLICY.leeway / 2


def test_paced_steady_state_keeps_one_refresh_per_cycle() -> None:
    """A refresh the pacer delayed still finds its next grid point one cycle on."""
    place, issued = phase("alpha.property.1001"), NOW
    starts = []
    for cycle in range(10):
        at = refresh_time(token(age=NOW - issued), POLICY, place, offset=0.5)
        issued = at + (cycle % 3) * 2.5  # paced: up to 5 s late
        starts.append(issued)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(C - 6 < gap < C + 6 for gap in gaps)


def test_pacing_never_costs_more_than_a_hundredth_of_a_cycle() -> None:
    """A paced refresh serves its token that much less before the next grid point: the
    delay is bounded by 1 % of the cycle, 30 s and half the time the token has left."""
    policy = RefreshPolicy(leeway=300.0, grid=True)
    hour = TokenRecord("a", 3600.0, "r", 1, refreshed_at=0.0)
    assert pace_limit(hour, policy, now=3000.0) == 30.0  # min(30, 300, 33)
    short = TokenRecord("a", 200.0, "r", 1, refreshed_at=0.0)
    assert pace_limit(short, RefreshPolicy(leeway=40.0, grid=True), now=150.0) == 1.6
    assert pace_limit(hour, policy, now=3590.0) == 5.0  # half the 10 s left
    assert pace_limit(hour, policy, now=3700.0) == 0.0  # expired: never paced
