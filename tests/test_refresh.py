"""The refresh policy: a pure function of (record, now, policy)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from proxy.refresh import (
    Action,
    Decision,
    RefreshPolicy,
    backoff,
    decide,
    may_force,
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


def test_fresh_token_waits_until_expiry_minus_leeway() -> None:
    record = token()
    assert decide(record, NOW, POLICY) == Decision(Action.WAIT, at=record.expires_at - 300)


def test_due_and_expired_tokens_refresh() -> None:
    record = token()
    assert decide(record, record.expires_at - 300, POLICY).action is Action.REFRESH
    assert decide(record, record.expires_at - 1, POLICY).action is Action.REFRESH
    assert decide(record, record.expires_at + 1000, POLICY).action is Action.REFRESH


def test_backoff_delays_a_due_refresh() -> None:
    record = token(age=3500)  # 100 s left: inside the leeway
    assert decide(record, NOW, POLICY, retry_at=NOW + 8) == Decision(Action.WAIT, at=NOW + 8)
    assert decide(record, NOW + 8, POLICY, retry_at=NOW + 8).action is Action.REFRESH


def test_eight_hour_token_refreshes_leeway_before_its_own_expiry() -> None:
    record = token(lifetime=8 * 3600)
    assert refresh_time(record, POLICY, 0.0) == NOW + 8 * 3600 - 300


@pytest.mark.parametrize("lifetime", [60, 10, 1])
def test_leeway_is_capped_at_half_the_lifetime(lifetime: float) -> None:
    record = token(lifetime=lifetime)
    assert refresh_time(record, POLICY, 0.0) == NOW + lifetime / 2
    # The fresh token is not refreshed at once, whatever the configured leeway.
    assert decide(record, NOW, POLICY).action is Action.WAIT


def test_leeway_without_known_lifetime_is_the_configured_one() -> None:
    record = TokenRecord("a", NOW + 3600, "r", 1, refreshed_at=None)
    assert refresh_time(record, POLICY, 0.0) == NOW + 3600 - 300


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999])
def test_jitter_only_makes_it_earlier_and_is_bounded(jitter: float) -> None:
    record = token()
    at = refresh_time(record, POLICY, jitter)
    latest = record.expires_at - POLICY.leeway
    assert latest - POLICY.max_jitter <= at <= latest


def test_jitter_is_bounded_by_a_fifth_of_a_small_leeway() -> None:
    record = token(lifetime=60)  # leeway capped to 30 s, jitter to 6 s
    assert refresh_time(record, POLICY, 0.999) >= NOW + 30 - 6
    assert refresh_time(record, POLICY, 0.999) < NOW + 30


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
