"""The token record: usability, generations, JSON round trip, and a repr without secrets."""

from __future__ import annotations

import json

import pytest

from proxy.tokens import State, TokenRecord, seed_record

NOW = 1_700_000_000.0


def record() -> TokenRecord:
    return TokenRecord(
        access_token="access-token-secret-1",
        expires_at=NOW + 3600,
        refresh_token="refresh-token-secret-1",
        generation=4,
        state=State.OK,
        refreshed_at=NOW,
        properties=("1001", "1002"),
    )


def test_usable_until_expiry_never_at_or_after() -> None:
    rec = record()
    assert rec.usable(NOW)
    assert rec.usable(rec.expires_at - 0.001)
    assert not rec.usable(rec.expires_at)
    assert not rec.usable(rec.expires_at + 1)
    assert not seed_record("r").usable(NOW)


def test_seconds_left() -> None:
    rec = record()
    assert rec.seconds_left(NOW) == 3600
    assert rec.seconds_left(NOW + 4000) == 0
    assert seed_record("r").seconds_left(NOW) == 0


def test_successor_bumps_the_generation_and_applies_changes() -> None:
    rec = record()
    nxt = rec.successor(state=State.REAUTHORIZATION_REQUIRED)
    assert nxt.generation == 5
    assert nxt.state is State.REAUTHORIZATION_REQUIRED
    assert nxt.access_token == rec.access_token
    assert rec.generation == 4  # frozen: the original is unchanged


def test_seed_record_holds_only_a_refresh_token() -> None:
    seed = seed_record("r-seed", generation=2)
    assert seed.access_token is None
    assert seed.refresh_token == "r-seed"
    assert seed.generation == 2
    assert seed.state is State.OK


@pytest.mark.parametrize(
    "rec",
    [
        record(),
        seed_record("r"),
        TokenRecord(None, 0.0, None, 0, State.REAUTHORIZATION_REQUIRED),
    ],
)
def test_json_round_trip(rec: TokenRecord) -> None:
    data = json.loads(json.dumps(rec.to_json()))
    assert TokenRecord.from_json(data) == rec


def test_to_json_is_plain_data() -> None:
    data = record().to_json()
    assert data["state"] == "ok"
    assert data["properties"] == ["1001", "1002"]
    assert data["generation"] == 4


def test_from_json_defaults_for_older_records() -> None:
    rec = TokenRecord.from_json(
        {"access_token": "a", "expires_at": "10", "refresh_token": "r", "generation": "1"}
    )
    assert rec == TokenRecord("a", 10.0, "r", 1)


def test_repr_and_str_never_show_tokens() -> None:
    rec = record()
    for text in (repr(rec), str(rec), f"{rec}", repr([rec]), repr({"r": rec})):
        assert "access-token-secret-1" not in text
        assert "refresh-token-secret-1" not in text
    assert "generation=4" in repr(rec)
