"""The token record: one per credential, the unit that the store keeps and replicas share.

A record is one connection: a configured credential (`app` None, id = its name) or one
property's (or group's) installation of an app. Its credential is an OAuth token pair, or a
static API key (`kind` api_key: the key is `access_token`, it never expires or refreshes).

Rules (DESIGN.md, "The token lifecycle" and "Many properties"):

- A record is `ok`, `reauthorization_required` or `disconnected`. Only a new authorisation
  (an install, an import, `auth exchange`, or a seed different from the rejected one) leaves
  the last two; nothing refreshes a record that is not `ok`.
- `expires_at` is absolute epoch seconds, computed from each response's `expires_in`.
- `generation` only grows. A store write whose generation is not greater than the stored
  one is refused, so a slow or stale writer can never replace a newer token.
- A token is usable until `expires_at`; it is never sent once expired.
- Which record wins a write that the store refused is decided in one place, `resolve`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class State(enum.StrEnum):
    OK = "ok"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    DISCONNECTED = "disconnected"


class Kind(enum.StrEnum):
    OAUTH = "oauth"
    API_KEY = "api_key"


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
    app: str | None = None
    """The app a connection belongs to; None for a credential from the configuration."""
    kind: Kind = Kind.OAUTH
    association: str | None = None
    """The group (association) id for a group installation."""
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    created_at: float | None = None
    updated_at: float | None = None

    def usable(self, now: float) -> bool:
        """True when the access token may still be sent upstream."""
        if self.access_token is None or self.state is State.DISCONNECTED:
            return False
        return self.kind is Kind.API_KEY or now < self.expires_at

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.expires_at - now) if self.access_token else 0.0

    def successor(self, **changes: Any) -> TokenRecord:
        """The next generation of this record with `changes` applied."""
        return dataclasses.replace(self, generation=self.generation + 1, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["kind"] = self.kind.value
        data["properties"] = list(self.properties)
        data["metadata"] = dict(self.metadata)
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
            app=data.get("app"),
            kind=Kind(data.get("kind", Kind.OAUTH)),
            association=data.get("association"),
            metadata=dict(data.get("metadata") or {}),
            created_at=data.get("created_at"),
            updated_at=data.get("updated_at"),
        )

    def view(self, connection_id: str, last_used_at: float | None = None) -> dict[str, Any]:
        """The connection as the admin API, events and status show it: never a secret."""
        api_key = self.kind is Kind.API_KEY
        return {
            "id": connection_id,
            "app": self.app,
            "kind": self.kind.value,
            "state": self.state.value,
            "properties": list(self.properties),
            "metadata": dict(self.metadata),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_used_at": last_used_at,
            "expires_at": None if api_key or not self.access_token else self.expires_at,
            "generation": self.generation,
        }

    def __repr__(self) -> str:
        # Never let a token reach a log line or traceback through repr().
        return (
            f"TokenRecord(app={self.app!r}, kind={self.kind.value}, "
            f"generation={self.generation}, state={self.state.value}, "
            f"expires_at={self.expires_at}, has_access_token={self.access_token is not None}, "
            f"has_refresh_token={self.refresh_token is not None})"
        )


def seed_record(refresh_token: str, generation: int = 0) -> TokenRecord:
    """A record holding only a refresh token: the next step is a refresh."""
    return TokenRecord(
        access_token=None, expires_at=0.0, refresh_token=refresh_token, generation=generation
    )


class Write(enum.Enum):
    """What a writer was doing when the store refused its record (a newer one was stored)."""

    REFRESH = "refresh"
    """A token call's result, or a refusal of it, made from an older record."""
    AUTHORIZATION = "authorization"
    """A new grant from a human or Cloudbeds: an install, an import, a code exchange, a seed."""
    CHANGE = "change"
    """An edit of the stored record (metadata, disconnect, migration): made again on top."""


class Outcome(enum.Enum):
    ADOPT = "adopt"
    """Keep the stored record; drop mine."""
    REBASE = "rebase"
    """Write mine once more, one generation above the stored one."""
    REAPPLY = "reapply"
    """Apply the same edit to the stored record and write that."""


def granted_after(mine: TokenRecord, other: TokenRecord) -> bool:
    """`mine` holds a refresh token Cloudbeds granted after the one `other` holds.

    Both grant times must be known (`refreshed_at`): a seed carries none, and is never taken
    for an older token; an install or an import carries the time it was made. With rotating
    refresh tokens the older token is dead, whatever generation its record has reached since
    (a failover can bring back a record from before the grant, and later writes build on it).
    The times come from the replicas' clocks, which must agree to well within the time
    between two grants of one connection (a token's lifetime; at least the 5 s between
    forced refreshes).
    """
    return (
        mine.state is State.OK
        and mine.kind is Kind.OAUTH
        and other.kind is Kind.OAUTH
        and mine.access_token is not None
        and mine.refresh_token is not None
        and mine.refresh_token != other.refresh_token
        and mine.refreshed_at is not None
        and other.refreshed_at is not None
        and mine.refreshed_at > other.refreshed_at
    )


def resolve(mine: TokenRecord, stored: TokenRecord, write: Write) -> Outcome:
    """Which record wins when the store refused `mine` because `stored` is as new or newer.

    - An edit is made again on the stored record: it was meant for whatever is current.
    - An authorisation wins over anything written meanwhile: a human or Cloudbeds just
      granted it, and the grant exists nowhere else.
    - A disconnected record is never replaced by a refresh: the property left.
    - A grant wins over a refusal made from the same record: two replicas can refresh from
      one record (one whose lock expired mid call, or each while Redis is down); with
      rotating refresh tokens Cloudbeds refuses the second call (the first rotated the
      token away). Both write generation n+1; a refusal that lands first would block the
      fleet and lose the refresh token Cloudbeds just returned.
    - A grant wins over an edit (metadata) of the record it was refreshed from: the edit
      holds the older credential (it was refreshed earlier), and adopting it would drop the
      new access token and, with rotation, the only valid refresh token.
    - A grant wins over a stored record that holds an older grant's refresh token, at any
      generation: a master that fails over before its replica has a write brings back the
      record from before the grant, and what is written on top of it (a refusal of its dead
      refresh token, an edit) reaches the generation of the grant or passes it.
    - Otherwise the stored record is newer: adopt it.

    REBASE writes `rebased(mine, stored)`: my credential on the stored record's own data.
    """
    if write is Write.CHANGE:
        return Outcome.REAPPLY
    if write is Write.AUTHORIZATION:
        return Outcome.REBASE
    if stored.state is State.DISCONNECTED:
        return Outcome.ADOPT
    grant = mine.generation == stored.generation and mine.state is State.OK
    grant = grant and mine.access_token is not None
    over_refusal = (
        stored.state is State.REAUTHORIZATION_REQUIRED
        and stored.refresh_token != mine.refresh_token
    )
    # An edit stamps `updated_at` and keeps the credential (and `refreshed_at`) it found; a
    # refresh by another replica stamps `refreshed_at` and is newer news than mine or not.
    edited = (stored.updated_at or 0.0) > (stored.refreshed_at or 0.0)
    over_edit = (
        stored.state is State.OK
        and edited
        and (stored.refreshed_at or 0.0) < (mine.refreshed_at or 0.0)
    )
    if grant and (over_refusal or over_edit):
        return Outcome.REBASE
    return Outcome.REBASE if granted_after(mine, stored) else Outcome.ADOPT


def rebased(mine: TokenRecord, stored: TokenRecord) -> TokenRecord:
    """`mine`'s credential written over `stored`: one generation up, the stored record's
    own data (metadata, creation time) kept, since an edit may have landed meanwhile."""
    return dataclasses.replace(
        mine,
        generation=stored.generation + 1,
        metadata=stored.metadata,
        created_at=stored.created_at or mine.created_at,
    )
