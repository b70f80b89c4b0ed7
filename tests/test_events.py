"""proxy.events: the body, the signature, the retry schedule and what is deliverable now."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json

import pytest

from proxy.events import (
    BACKOFF_CAP,
    RETRY_FOR,
    Event,
    EventType,
    deliverable,
    new_event,
    retry,
    sign,
    verify,
)

NOW = 1_700_000_000.0
SECRET = "whsec-test"


def event(connection: str, *, next_at: float = 0.0, n: int = 0) -> Event:
    return Event(
        id=f"{connection}-{n}",
        type=EventType.CREATED,
        occurred_at=NOW,
        connection={"id": connection, "state": "ok"},
        next_at=next_at,
    )


def test_body_is_the_documented_shape_and_stable() -> None:
    e = new_event(EventType.DISCONNECTED, {"id": "a.property.1", "state": "disconnected"}, NOW)
    assert json.loads(e.body()) == {
        "id": e.id,
        "type": "connection.disconnected",
        "occurred_at": NOW,
        "connection": {"id": "a.property.1", "state": "disconnected"},
    }
    later = dataclasses.replace(e, attempts=3, next_at=NOW + 60)
    assert later.body() == e.body(), "a retry must send the same bytes (the same event)"
    assert Event.from_json(later.to_json()) == later
    assert Event.from_json(later.to_json()).body() == e.body()


def test_new_events_have_distinct_ids() -> None:
    ids = {new_event(EventType.CREATED, {"id": "x"}, NOW).id for _ in range(50)}
    assert len(ids) == 50


def test_from_json_ignores_fields_it_does_not_know() -> None:
    data = json.loads(event("c").to_json())
    data["added_by_a_newer_version"] = 1
    assert Event.from_json(json.dumps(data)) == event("c")


def test_sign_is_hmac_sha256_of_t_dot_body() -> None:
    body = b'{"id":"1"}'
    mac = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body, 1_700_000_000) == f"t=1700000000,v1={mac}"


BODY = b'{"id":"e1"}'
GOOD = sign(SECRET, BODY, int(NOW))
MAC = GOOD.split("v1=")[1]


@pytest.mark.parametrize(
    ("header", "body", "secret", "now", "valid"),
    [
        (GOOD, BODY, SECRET, NOW, True),
        (GOOD, BODY, SECRET, NOW + 300, True),
        (GOOD, BODY, SECRET, NOW - 300, True),
        (GOOD, BODY, SECRET, NOW + 301, False),  # too old: a replay
        (GOOD, BODY, SECRET, NOW - 301, False),  # from the future
        (GOOD, b'{"id":"e2"}', SECRET, NOW, False),  # another body
        (GOOD, BODY, "other-secret", NOW, False),
        (f"v1={MAC},t={int(NOW)}", BODY, SECRET, NOW, True),  # order of parts
        (f"t={int(NOW)}, v1={MAC}", BODY, SECRET, NOW, True),  # spaces
        (f"t={int(NOW)},v1=00,v1={MAC}", BODY, SECRET, NOW, True),  # one of several v1
        (f"t={int(NOW)},v0={MAC}", BODY, SECRET, NOW, False),  # another scheme
        (f"t={int(NOW) + 1},v1={MAC}", BODY, SECRET, NOW, False),  # t is signed
        (f"t={int(NOW)},t={int(NOW)},v1={MAC}", BODY, SECRET, NOW, False),
        (f"t=-{int(NOW)},v1={MAC}", BODY, SECRET, NOW, False),
        (f"t=abc,v1={MAC}", BODY, SECRET, NOW, False),
        (f"v1={MAC}", BODY, SECRET, NOW, False),  # no timestamp
        (f"t={int(NOW)}", BODY, SECRET, NOW, False),  # no signature
        ("", BODY, SECRET, NOW, False),
        ("garbage", BODY, SECRET, NOW, False),
    ],
)
def test_verify(header: str, body: bytes, secret: str, now: float, valid: bool) -> None:
    assert verify(secret, body, header, now) is valid


@pytest.mark.parametrize(
    ("attempts", "jitter", "delay"),
    [
        (0, 0.0, 0.5),  # the first retry after half a second to a second
        (0, 1.0, 1.0),
        (1, 0.0, 1.0),
        (3, 0.5, 6.0),  # 8 s ceiling, jitter in its upper half
        (9, 1.0, 512.0),
        (10, 1.0, BACKOFF_CAP),  # 1024 s capped at ten minutes
        (10, 0.0, BACKOFF_CAP / 2),
        (5000, 1.0, BACKOFF_CAP),  # no overflow, however many attempts a record says
    ],
)
def test_retry_backoff(attempts: int, jitter: float, delay: float) -> None:
    failed = dataclasses.replace(event("c"), attempts=attempts)
    later = retry(failed, NOW + 10, jitter)
    assert later is not None
    assert later.attempts == attempts + 1
    assert later.next_at == pytest.approx(NOW + 10 + delay)
    assert (later.id, later.body()) == (failed.id, failed.body())


@pytest.mark.parametrize(
    ("age", "kept"),
    [(0.0, True), (RETRY_FOR - 1, True), (RETRY_FOR, False), (RETRY_FOR + 3600, False)],
)
def test_retry_gives_up_24_hours_after_the_event(age: float, kept: bool) -> None:
    assert (retry(event("c"), NOW + age, 0.5) is not None) is kept


def ids(events: list[Event]) -> list[str]:
    return [e.id for e in events]


@pytest.mark.parametrize(
    ("pending", "due"),
    [
        ([], []),
        ([event("a")], ["a-0"]),
        # one per connection per round, the oldest first
        ([event("a", n=0), event("a", n=1), event("b", n=0)], ["a-0", "b-0"]),
        # a connection whose oldest event is waiting delivers nothing after it
        ([event("a", next_at=NOW + 5), event("a", n=1), event("b")], ["b-0"]),
        # due once its time has come (next_at == now is due)
        ([event("a", next_at=NOW), event("a", n=1)], ["a-0"]),
        # another connection's wait blocks nobody else
        ([event("b"), event("a", next_at=NOW + 5), event("c")], ["b-0", "c-0"]),
    ],
)
def test_deliverable(pending: list[Event], due: list[str]) -> None:
    assert ids(deliverable(pending, NOW)) == due


def test_deliverable_keeps_the_order_of_a_connection_across_rounds() -> None:
    pending = [event("a", n=i) for i in range(3)] + [event("b", n=i) for i in range(2)]
    sent: list[str] = []
    while pending:
        due = deliverable(pending, NOW)
        sent += ids(due)
        pending = [e for e in pending if e not in due]
    assert [s for s in sent if s.startswith("a")] == ["a-0", "a-1", "a-2"]
    assert [s for s in sent if s.startswith("b")] == ["b-0", "b-1"]
