"""Connection events, sans-I/O: what an event is, how it is signed, when it is retried.

Rules (DESIGN.md, "Events"; the signature scheme follows Stripe's webhook signatures):

- An event is `{"id": uuid, "type": ..., "occurred_at": unix, "connection": {...}}`; the
  connection is its public view (never a secret). Receivers deduplicate by `id`.
- An event is written to the store's outbox in the same operation as the change it
  reports (so a crash between the two loses nothing), then delivered from there.
- The signature header is `X-Cloudbeds-Proxy-Signature: t=UNIX,v1=HEX`, HEX being
  HMAC-SHA256 of `"{t}.{body}"` under the events secret.
- A failed delivery is retried with capped exponential backoff and jitter for 24 hours
  after the event occurred, then dropped (logged).
- Per connection, events are delivered in order: an event waits while an earlier event of
  the same connection is still undelivered.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable
from typing import Any

SIGNATURE_HEADER = "X-Cloudbeds-Proxy-Signature"
RETRY_FOR = 24 * 3600.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 600.0


class EventType(enum.StrEnum):
    CREATED = "connection.created"
    REINSTALLED = "connection.reinstalled"
    REAUTHORIZATION_REQUIRED = "connection.reauthorization_required"
    RECOVERED = "connection.recovered"
    DISCONNECTED = "connection.disconnected"


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: EventType
    occurred_at: float
    connection: dict[str, Any]
    attempts: int = 0
    next_at: float = 0.0
    """When the next delivery may be tried (0: at once)."""

    @property
    def connection_id(self) -> str:
        return str(self.connection.get("id", ""))

    def body(self) -> bytes:
        """The bytes POSTed to the receiver (and signed)."""
        payload = {
            "id": self.id,
            "type": self.type.value,
            "occurred_at": self.occurred_at,
            "connection": self.connection,
        }
        return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["type"] = self.type.value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        """The stored event, or ValueError. Fields it does not know are ignored (a newer
        replica's, in a rolling upgrade, must not stop an older lease holder's deliveries)."""
        try:
            data = json.loads(raw)
            known = {field.name for field in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            data["type"] = EventType(data["type"])
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not an event this version can read ({type(exc).__name__})") from None


def new_event(type_: EventType, connection: dict[str, Any], now: float) -> Event:
    return Event(id=str(uuid.uuid4()), type=type_, occurred_at=round(now, 3), connection=connection)


def sign(secret: str, body: bytes, t: int) -> str:
    """The signature header's value for `body` sent at unix time `t`."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver checks: a v1 signature of this body, made within `tolerance` seconds.

    As with Stripe's scheme the header may carry several `v1=` values (a sender in the
    middle of rotating its secret); one matching is enough. Spaces around parts are ignored.
    """
    parts = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for key, sep, value in parts if sep and key == "t"]
    macs = [value for key, sep, value in parts if sep and key == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    t = int(stamps[0])
    if abs(now - t) > tolerance:
        return False
    expected = sign(secret, body, t).rpartition("v1=")[2]
    # Every candidate is compared (no early exit), each in constant time.
    return sum(hmac.compare_digest(expected, mac) for mac in macs) > 0


def retry(event: Event, now: float, jitter: float) -> Event | None:
    """The event rescheduled after a failed delivery, or None once 24 hours have passed."""
    if now - event.occurred_at >= RETRY_FOR:
        return None
    # The exponent is capped too: 2.0**1024 overflows, and the cap is reached long before.
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(event.attempts, 32))
    delay = ceiling * (0.5 + jitter / 2)
    return dataclasses.replace(event, attempts=event.attempts + 1, next_at=now + delay)


def deliverable(pending: Iterable[Event], now: float) -> list[Event]:
    """Events to deliver now, oldest first: due, and no earlier event of theirs waiting."""
    blocked: set[str] = set()
    due = []
    for event in pending:
        if event.connection_id in blocked:
            continue
        if event.next_at > now:
            blocked.add(event.connection_id)
            continue
        due.append(event)
        blocked.add(event.connection_id)  # one per connection per round keeps the order
    return due
