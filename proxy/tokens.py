"""The token record: one per credential, the unit that the store keeps and replicas share.

Rules (DESIGN.md, "The token lifecycle"):

- A record is `ok` or `reauthorization_required`. Only a new refresh token (OAuth callback,
  `auth exchange`, or a seed different from the rejected one) leaves the second state.
- `expires_at` is absolute epoch seconds, computed from each response's `expires_in`.
- `generation` only grows. A store write whose generation is not greater than the stored
  one is refused, so a slow or stale writer can never replace a newer token.
- A token is usable until `expires_at`; it is never sent once expired.
- A grant and a refusal made from the same record: the grant wins (`grant_outranks`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class State(enum.StrEnum):
    OK = "ok"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRecord:
    access_token: str | None
    expires_at: float
    refresh_token: str | None
    generation: int
    state: State = State.OK
    refreshed_at: float | None = None
    properties: tuple[str, ...] = ()
    """Property ids the token covers, learned from the token response's `resources`."""
    forced: bool = False
    """The token came from a refresh forced by a 401 rather than by its age."""

    def usable(self, now: float) -> bool:
        """True when the access token may still be sent upstream."""
        return self.access_token is not None and now < self.expires_at

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.expires_at - now) if self.access_token else 0.0

    def successor(self, **changes: Any) -> TokenRecord:
        """The next generation of this record with `changes` applied."""
        return dataclasses.replace(self, generation=self.generation + 1, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["properties"] = list(self.properties)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenRecord:
        return cls(
            access_token=data.get("access_token"),
            expires_at=float(data["expires_at"]),
            refresh_token=data.get("refresh_token"),
            generation=int(data["generation"]),
            state=State(data.get("state", State.OK)),
            refreshed_at=data.get("refreshed_at"),
            properties=tuple(str(p) for p in data.get("properties", ())),
            forced=bool(data.get("forced", False)),
        )

    def __repr__(self) -> str:
        # Never let a token reach a log line or traceback through repr().
        return (
            f"TokenRecord(generation={self.generation}, state={self.state.value}, "
            f"expires_at={self.expires_at}, has_access_token={self.access_token is not None}, "
            f"has_refresh_token={self.refresh_token is not None})"
        )


def seed_record(refresh_token: str, generation: int = 0) -> TokenRecord:
    """A record holding only a refresh token: the next step is a refresh."""
    return TokenRecord(
        access_token=None, expires_at=0.0, refresh_token=refresh_token, generation=generation
    )


def grant_outranks(mine: TokenRecord, stored: TokenRecord) -> bool:
    """True when `mine` (a token Cloudbeds issued) must replace `stored`, a refusal.

    Two replicas can refresh from the same record: one whose lock expired mid call, or
    each one while Redis is down. With rotating refresh tokens Cloudbeds then refuses
    the second call (`invalid_grant`: the first rotated the token away). Both write
    generation n+1, and whichever lands first wins the compare-and-set; a refusal that
    wins would block the fleet and lose the refresh token Cloudbeds just returned.
    """
    return (
        mine.generation == stored.generation
        and mine.state is State.OK
        and mine.access_token is not None
        and stored.state is State.REAUTHORIZATION_REQUIRED
        and stored.refresh_token != mine.refresh_token
    )
