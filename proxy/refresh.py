"""When to refresh: a pure function of (record, now, policy). It awaits nothing.

Rules (DESIGN.md, "The token lifecycle"; README, "Refresh scheduling"):
- No record, or no refresh token: nothing to do until someone authorises (`NEEDS_AUTH`).
- `reauthorization_required` or `disconnected`: nothing is retried until a new
  authorisation arrives. An API key never refreshes.
- The leeway is capped at half the token's lifetime (`expires_at - refreshed_at`), so a
  short-lived token (tests, or a leeway set larger than Cloudbeds' lifetime) is still
  refreshed once per lifetime, not continuously.
- A connection of an app (`grid`) is refreshed on a fleet-wide grid: each has a stable phase
  `phase(name)` in [0, 1) (a SHA-256 of its name: the same on every replica and every
  run), and the grid has the period C = lifetime - leeway. The refresh is at the latest
  grid point t = phase * C (mod C) with t <= expires_at - leeway, that is the one grid
  point in (refreshed_at, refreshed_at + C]. In steady state that is one token call per C
  per connection, always at the same phase; tokens issued at one instant (an import, a
  cold start) have their first refreshes spread uniformly over one cycle instead of
  landing together. A grid point within `margin` (min(1 s, C / 10, leeway / 10)) after the
  token was issued is skipped for `expires_at - leeway`: a token is never refreshed right
  after it was issued, and the connection joins the grid at a later cycle.
- Each replica adds its own `offset` in [0, 1) times that margin, so that replicas do not
  ask for the lock at the same instant: the first refreshes, the others see the new
  record. The offset makes a refresh at most `margin` later than the grid point (so never
  later than `expires_at - 0.9 * leeway`): a refresh that starts at or after its grid
  point is what keeps the next one on the grid (one that started before it would find
  that same point again in its new token's cycle).
- A configured credential (a handful, not a fleet: no grid), and a token whose lifetime is
  unknown (no `refreshed_at`), keep the older rule: `expires_at - leeway - jitter`, where
  the jitter (this replica's `offset` times min(max_jitter, leeway / 5)) only ever makes
  it earlier.
- Pacing (`paced`): however the phases of the connections in use happen to cluster, a
  replica starts the ahead-of-time refreshes of one budget (an app) at most
  `PACE_FACTOR` times as fast as they arrived lately (at least one a second), delaying one
  by at most min(30 s, half the time its token has left, 1 % of its cycle: `pace_limit`):
  the delay moves it off its grid point but not its next one, so that token serves that
  much less and pacing costs at most 1 % more calls. On one replica the busiest second
  stays within twice the mean; replicas pace independently (the first to start a refresh
  makes it), so a fleet comes close to that without a bound.
- Refresh what is used (`on_use`, a connection of an app): ahead of expiry only while the
  connection was used on this replica within `idle_after` seconds (default: one lifetime of
  the record). An idle one is `IDLE` until its keep-alive; its next request refreshes it
  (a record with no access token, such as an import of a refresh token alone, makes no
  token call until then). One exception: a record with neither an access token nor known
  properties is refreshed at once, since its properties come with its first token and no
  request could find it by property before. A configured credential is always refreshed
  ahead.
- Keep-alive (`keepalive_after`): an idle connection is refreshed between half an interval
  and an interval after its `refreshed_at` (never refreshed: its `created_at`), at the
  grid point of period `keepalive / 2` and the same phase in that span: one replica does
  it, like any refresh, and an idle fleet's keep-alives are spread like its refreshes.
  An API key is kept alive the same way after its last use (`proxy.credentials`).
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
import hashlib
import math

from proxy.tokens import Kind, State, TokenRecord

DEFAULT_LIFETIME = 3600.0
"""Cloudbeds' access-token lifetime, for a record that does not say its own."""
KEEPALIVE = 7 * 24 * 3600.0


class Action(enum.Enum):
    NEEDS_AUTH = "needs_auth"
    BLOCKED = "reauthorization_required"
    WAIT = "wait"
    IDLE = "idle"
    """Not used lately: nothing until `at` (its keep-alive; inf for none) or a request."""
    REFRESH = "refresh"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    at: float = 0.0
    """For WAIT and IDLE: the moment to look again (inf: only when woken)."""
    keepalive: bool = False
    """For REFRESH: an idle connection's keep-alive, not a refresh of a used one."""


@dataclasses.dataclass(frozen=True)
class RefreshPolicy:
    leeway: float = 300.0
    max_jitter: float = 30.0
    max_offset: float = 1.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    min_forced_interval: float = 5.0
    forced_again_after: float = 900.0
    grid: bool = True
    """Refresh on the fleet-wide grid (connections of an app); else leeway and jitter."""
    on_use: bool = False
    """Refresh ahead only while used (a connection of an app); else always."""
    idle_after: float | None = None
    """Seconds without a use after which a connection is idle; None: one token lifetime."""
    keepalive: float = KEEPALIVE


def phase(name: str) -> float:
    """A connection's stable place on the grid, in [0, 1): the same on every replica."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def lifetime(record: TokenRecord) -> float | None:
    """Seconds the record's token lives (`expires_at - refreshed_at`), if known."""
    if record.refreshed_at is None:
        return None
    span = record.expires_at - record.refreshed_at
    return span if span > 0 else None


def grid_point(place: float, period: float, latest: float) -> float:
    """The latest moment t <= `latest` with t = place * period (mod period)."""
    anchor = place * period
    return anchor + math.floor((latest - anchor) / period) * period


def _on_grid(
    place: float, period: float, issued: float, latest: float, *, offset: float, margin: float
) -> float:
    """The grid point in (issued + margin, latest], else `latest`; plus offset * margin."""
    at = grid_point(place, period, latest)
    if at <= issued + margin or at > latest:  # too soon after issue, or float rounding
        at = latest
    return at + offset * margin


def refresh_time(
    record: TokenRecord, policy: RefreshPolicy, place: float, offset: float = 0.0
) -> float:
    """When a used token should be refreshed (see the rules at the top)."""
    span = lifetime(record)
    leeway = min(policy.leeway, span / 2) if span is not None else policy.leeway
    if span is None or not policy.grid:
        return record.expires_at - leeway - offset * min(policy.max_jitter, leeway / 5)
    period, latest = span - leeway, record.expires_at - leeway
    margin = min(policy.max_offset, period / 10, leeway / 10)
    assert record.refreshed_at is not None
    return _on_grid(place, period, record.refreshed_at, latest, offset=offset, margin=margin)


def keepalive_after(last: float, place: float, period: float, offset: float = 0.0) -> float:
    """The keep-alive after a refresh or use at `last`: the grid point of period
    `period / 2` (same phase) in (last + period / 2, last + period], plus the offset."""
    half = period / 2
    margin = min(1.0, half / 10)
    return _on_grid(place, half, last + half, last + period, offset=offset, margin=margin)


def keepalive_time(
    record: TokenRecord, policy: RefreshPolicy, place: float, offset: float = 0.0
) -> float:
    """When an idle connection is refreshed to keep it alive; inf when its age is unknown."""
    issued = record.refreshed_at if record.refreshed_at is not None else record.created_at
    if issued is None:
        return math.inf
    return keepalive_after(issued, place, policy.keepalive, offset)


PACE_FACTOR = 1.5
"""A replica starts ahead-of-time refreshes of one budget at most this many times as fast
as they have been arriving: with room for the estimate's error, a second then holds at
most twice the mean."""
PACE_MIN_RATE = 1.0
PACE_MIN_ELAPSED = 10.0
"""Seconds the rate is estimated over at least: a few first arrivals do not make it high."""
PACE_MAX_DELAY = 30.0
PACE_MAX_SHARE = 0.01
"""A paced refresh is delayed by at most this share of its cycle: the delay shortens the
token's use before the next grid point by as much, so pacing costs at most 1 % more token
calls (with Cloudbeds' hour-long tokens the 30 s bound is the one that applies)."""


def pace_limit(record: TokenRecord, policy: RefreshPolicy, now: float) -> float:
    """The longest a refresh of `record` that comes due now may be paced: 30 s, half the
    time its token has left, and `PACE_MAX_SHARE` of its cycle (lifetime - leeway)."""
    bound = min(PACE_MAX_DELAY, record.seconds_left(now) / 2)
    span = lifetime(record)
    if span is not None:
        bound = min(bound, PACE_MAX_SHARE * (span - min(policy.leeway, span / 2)))
    return max(bound, 0.0)


def pace_spacing(arrivals: int, elapsed: float) -> float:
    """Seconds between two paced refreshes, from `arrivals` over the last `elapsed` s."""
    rate = PACE_FACTOR * arrivals / max(elapsed, PACE_MIN_ELAPSED)
    return 1.0 / max(PACE_MIN_RATE, rate)


def paced(arrived: float, free_at: float, max_delay: float) -> float:
    """When a refresh that came due at `arrived` may start, the next free slot being
    `free_at`: that slot, unless it is more than `max_delay` away (then at once: pacing
    never puts a token at risk)."""
    start = max(arrived, free_at)
    return start if start - arrived <= max_delay else arrived


def used(record: TokenRecord, now: float, policy: RefreshPolicy, last_used: float | None) -> bool:
    """True when the record is refreshed ahead: always, or (`on_use`) when used lately."""
    if not policy.on_use:
        return True
    if last_used is None:
        return False
    idle_after = policy.idle_after
    if idle_after is None:
        idle_after = lifetime(record) or DEFAULT_LIFETIME
    return now - last_used < idle_after


def decide(
    record: TokenRecord | None,
    now: float,
    policy: RefreshPolicy,
    *,
    place: float = 0.0,
    offset: float = 0.0,
    retry_at: float = 0.0,
    last_used: float | None = None,
) -> Decision:
    """What the background refresher should do now.

    `place` is the connection's `phase`, `offset` this replica's in [0, 1), `last_used`
    when a request last used it here (None: never).
    """
    if record is None or record.refresh_token is None:
        return Decision(Action.NEEDS_AUTH)
    if record.state is not State.OK or record.kind is Kind.API_KEY:
        return Decision(Action.BLOCKED)
    if not used(record, now, policy, last_used) and (record.access_token or record.properties):
        due = max(keepalive_time(record, policy, place, offset), retry_at)
        if now >= due:
            return Decision(Action.REFRESH, keepalive=True)
        return Decision(Action.IDLE, at=due)
    due = 0.0 if record.access_token is None else refresh_time(record, policy, place, offset)
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
