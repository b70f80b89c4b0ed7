"""The token record: usability, generations, JSON round trip, and a repr without secrets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from proxy.tokens import (
    Kind,
    Outcome,
    State,
    TokenRecord,
    Write,
    granted_after,
    rebased,
    resolve,
    seed_record,
)

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


# --- which record wins a refused write -----------------------------------------------------

OK_GRANT = TokenRecord("new-access", 200.0, "rotated", 5)
REFUSAL = TokenRecord(None, 0.0, "old", 5, state=State.REAUTHORIZATION_REQUIRED)
NEWER_OK = TokenRecord("other", 300.0, "other-refresh", 6)
GONE = TokenRecord(None, 0.0, None, 6, state=State.DISCONNECTED)


@pytest.mark.parametrize(
    ("mine", "stored", "write", "outcome"),
    [
        # A grant beats a refusal made from the same record (two refreshes of one record).
        (OK_GRANT, REFUSAL, Write.REFRESH, Outcome.REBASE),
        # ... but not a refusal of the very refresh token it carries.
        (
            OK_GRANT,
            dataclasses.replace(REFUSAL, refresh_token="rotated"),
            Write.REFRESH,
            Outcome.ADOPT,
        ),
        # ... nor one from another generation.
        (OK_GRANT, dataclasses.replace(REFUSAL, generation=6), Write.REFRESH, Outcome.ADOPT),
        # A refresh loses to a newer record and to a disconnect.
        (OK_GRANT, NEWER_OK, Write.REFRESH, Outcome.ADOPT),
        (OK_GRANT, GONE, Write.REFRESH, Outcome.ADOPT),
        # A refresh beats an edit (metadata) of the record it was refreshed from, even with
        # a refresh token that does not rotate...
        (
            dataclasses.replace(OK_GRANT, refreshed_at=100.0),
            dataclasses.replace(OK_GRANT, access_token="old", refreshed_at=50.0, updated_at=90.0),
            Write.REFRESH,
            Outcome.REBASE,
        ),
        # ... but not another replica's refresh of that record, made just before it.
        (
            dataclasses.replace(OK_GRANT, refreshed_at=100.0),
            dataclasses.replace(OK_GRANT, access_token="theirs", refreshed_at=99.0),
            Write.REFRESH,
            Outcome.ADOPT,
        ),
        # ... but not a record another replica refreshed later than it.
        (
            dataclasses.replace(OK_GRANT, refreshed_at=100.0),
            dataclasses.replace(NEWER_OK, generation=5, refreshed_at=150.0),
            Write.REFRESH,
            Outcome.ADOPT,
        ),
        # A refusal never rebases.
        (REFUSAL, NEWER_OK, Write.REFRESH, Outcome.ADOPT),
        # An authorisation wins over anything, a disconnect included.
        (OK_GRANT, NEWER_OK, Write.AUTHORIZATION, Outcome.REBASE),
        (OK_GRANT, GONE, Write.AUTHORIZATION, Outcome.REBASE),
        # An edit is made again on whatever is stored.
        (OK_GRANT, NEWER_OK, Write.CHANGE, Outcome.REAPPLY),
        (GONE, REFUSAL, Write.CHANGE, Outcome.REAPPLY),
    ],
)
def test_resolve(mine: TokenRecord, stored: TokenRecord, write: Write, outcome: Outcome) -> None:
    assert resolve(mine, stored, write) is outcome


# After a failover: the store went back to a record from before my grant (refresh token
# "old", granted at t=100), and writes built on it since. My grant (t=200) holds "rotated".
LOST_GRANT = TokenRecord("new-access", 3800.0, "rotated", 5, refreshed_at=200.0)
BEFORE = TokenRecord("old-access", 3700.0, "old", 4, refreshed_at=100.0)


@pytest.mark.parametrize(
    ("stored", "outcome"),
    [
        # A refusal of the old token, at my generation or past it: my grant wins.
        (dataclasses.replace(BEFORE, generation=5, state=State.REAUTHORIZATION_REQUIRED), "rebase"),
        (dataclasses.replace(BEFORE, generation=7, state=State.REAUTHORIZATION_REQUIRED), "rebase"),
        # An edit made on the old record (still "ok", still the dead token): my grant wins.
        (dataclasses.replace(BEFORE, generation=6, metadata={"k": 1}), "rebase"),
        # A grant made after mine: it wins, whatever it holds.
        (
            dataclasses.replace(BEFORE, generation=6, refresh_token="later", refreshed_at=300.0),
            "adopt",
        ),
        # My own record, already stored (an earlier write of it landed): nothing to do.
        (LOST_GRANT, "adopt"),
        # The same refresh token (Cloudbeds did not rotate it): the stored record is as good.
        (dataclasses.replace(BEFORE, generation=6, refresh_token="rotated"), "adopt"),
        # A record without a grant time (a seed, an import made by hand): never overridden.
        (dataclasses.replace(BEFORE, generation=6, refreshed_at=None), "adopt"),
        # Disconnected, or migrated to an API key: the connection moved on.
        (dataclasses.replace(BEFORE, generation=6, state=State.DISCONNECTED), "adopt"),
        (dataclasses.replace(BEFORE, generation=6, kind=Kind.API_KEY), "adopt"),
    ],
)
def test_resolve_a_grant_the_store_lost(stored: TokenRecord, outcome: str) -> None:
    assert resolve(LOST_GRANT, stored, Write.REFRESH) is Outcome(outcome)


@pytest.mark.parametrize(
    ("mine", "newer"),
    [
        (LOST_GRANT, True),
        (dataclasses.replace(LOST_GRANT, refreshed_at=50.0), False),  # granted before
        (dataclasses.replace(LOST_GRANT, refreshed_at=None), False),  # unknown
        (dataclasses.replace(LOST_GRANT, refresh_token="old"), False),  # the same token
        (dataclasses.replace(LOST_GRANT, access_token=None), False),  # no grant (a seed)
        (dataclasses.replace(LOST_GRANT, state=State.REAUTHORIZATION_REQUIRED), False),
    ],
)
def test_granted_after(mine: TokenRecord, newer: bool) -> None:
    assert granted_after(mine, BEFORE) is newer
    assert not granted_after(BEFORE, LOST_GRANT)


def test_an_api_key_is_usable_until_disconnected() -> None:
    key = TokenRecord("cbat_k", 0.0, None, 1, kind=Kind.API_KEY)
    assert key.usable(1e12)
    assert not dataclasses.replace(key, state=State.DISCONNECTED).usable(0.0)
    assert key.view("c")["expires_at"] is None


def test_view_never_shows_a_secret() -> None:
    view = TokenRecord("access-secret", 9.0, "refresh-secret", 1, app="a", metadata={"k": 1}).view(
        "a.property.1", 5.0
    )
    assert "secret" not in json.dumps(view)
    assert view == {
        "id": "a.property.1",
        "app": "a",
        "kind": "oauth",
        "state": "ok",
        "properties": [],
        "metadata": {"k": 1},
        "created_at": None,
        "updated_at": None,
        "last_used_at": 5.0,
        "expires_at": 9.0,
        "generation": 1,
    }


def test_a_record_written_before_connections_still_reads() -> None:
    old = {"access_token": "a", "expires_at": 1.0, "refresh_token": "r", "generation": 3}
    record = TokenRecord.from_json(old)
    assert (record.app, record.kind, record.metadata) == (None, Kind.OAUTH, {})


def test_rebased_keeps_the_stored_records_own_data() -> None:
    mine = TokenRecord("new", 9.0, "r2", 5, metadata={"old": 1}, created_at=2.0)
    edited = TokenRecord("old", 1.0, "r1", 5, metadata={"crm": "h-1"}, created_at=1.0)
    out = rebased(mine, edited)
    assert (out.access_token, out.refresh_token, out.generation) == ("new", "r2", 6)
    assert out.metadata == {"crm": "h-1"}
    assert out.created_at == 1.0
