"""When to refresh: a pure function of (record, now, policy). It awaits nothing.

Rules (DESIGN.md, "The token lifecycle"):
- No record, or no refresh token: nothing to do until someone authorises (`NEEDS_AUTH`).
- `reauthorization_required` or `disconnected`: nothing is retried until a new
  authorisation arrives. An API key never refreshes.
- Otherwise refresh at `expires_at - leeway - jitter`: jitter only ever makes it earlier.
  The leeway is capped at half the token's lifetime, so a short-lived token (tests, or a
  leeway set larger than Cloudbeds' lifetime) is still refreshed once per lifetime, not
  continuously.
- After a transient failure, the next try waits a capped exponential backoff with jitter.
- A forced refresh (after a 401) is allowed only while the rejected token is the current
  one and the last refresh is older than `min_forced_interval`: a storm of 401s makes one
  refresh, never one per request. A 401 that meets this guard waits (bounded) for the
  moment it lifts, then the refresh it allows, then is replayed. A token that a forced
  refresh produced is not forced again before `forced_again_after`: a 401 that a new token
  did not cure is not about the token's age (a property the token does not cover, a
  revoked app), and refreshing every few seconds for it would be the refresh storm
  Cloudbeds suspends credentials for.
"""

from __future__ import annotations

import dataclasses
import enum

from proxy.tokens import Kind, State, TokenRecord


class Action(enum.Enum):
    NEEDS_AUTH = "needs_auth"
    BLOCKED = "reauthorization_required"
    WAIT = "wait"
    REFRESH = "refresh"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    at: float = 0.0
    """For WAIT: the moment to look again."""


@dataclasses.dataclass(frozen=True)
class RefreshPolicy:
    leeway: float = 300.0
    max_jitter: float = 30.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    min_forced_interval: float = 5.0
    forced_again_after: float = 900.0


def refresh_time(record: TokenRecord, policy: RefreshPolicy, jitter: float) -> float:
    """When this replica should start refreshing; `jitter` is uniform in [0, 1)."""
    lifetime = record.expires_at - (record.refreshed_at or record.expires_at)
    leeway = min(policy.leeway, lifetime / 2) if lifetime > 0 else policy.leeway
    return record.expires_at - leeway - jitter * min(policy.max_jitter, leeway / 5)


def decide(
    record: TokenRecord | None,
    now: float,
    policy: RefreshPolicy,
    *,
    jitter: float = 0.0,
    retry_at: float = 0.0,
) -> Decision:
    """What the background refresher should do now."""
    if record is None or record.refresh_token is None:
        return Decision(Action.NEEDS_AUTH)
    if record.state is not State.OK or record.kind is Kind.API_KEY:
        return Decision(Action.BLOCKED)
    due = 0.0 if record.access_token is None else refresh_time(record, policy, jitter)
    due = max(due, retry_at)
    if now >= due:
        return Decision(Action.REFRESH)
    return Decision(Action.WAIT, at=due)


def force_at(record: TokenRecord | None, policy: RefreshPolicy) -> float | None:
    """After a 401 to `record`'s token: when a forced refresh is allowed, or None if never.

    Never for a record that cannot refresh, or for a token a forced refresh produced
    within `forced_again_after` (its 401 is not about its age). Otherwise once the last
    refresh is `min_forced_interval` old: a 401 storm makes one refresh, and a request
    that meets the guard waits for that moment rather than getting the 401.
    """
    if record is None or record.refresh_token is None:
        return None
    if record.state is not State.OK or record.kind is Kind.API_KEY:
        return None
    refreshed_at = record.refreshed_at or 0.0
    if record.forced:
        return refreshed_at + policy.forced_again_after
    return refreshed_at + policy.min_forced_interval


def may_force(record: TokenRecord | None, now: float, policy: RefreshPolicy) -> bool:
    """After a 401 to `record`'s token: refresh now unless it is blocked or too new."""
    at = force_at(record, policy)
    return at is not None and now >= at


def backoff(attempt: int, policy: RefreshPolicy, jitter: float) -> float:
    """Seconds to wait before retry `attempt` (0-based): capped exponential, jittered down."""
    ceiling = min(policy.backoff_cap, policy.backoff_base * 2.0**attempt)
    return ceiling * (0.5 + jitter / 2)


def refreshed(
    record: TokenRecord,
    now: float,
    *,
    access_token: str,
    expires_in: float,
    refresh_token: str | None,
    properties: tuple[str, ...],
    forced: bool = False,
) -> TokenRecord:
    """The successor after a successful token call; a returned refresh token is kept."""
    return record.successor(
        access_token=access_token,
        expires_at=now + expires_in,
        refresh_token=refresh_token or record.refresh_token,
        state=State.OK,
        refreshed_at=now,
        properties=properties or record.properties,
        forced=forced,
    )
