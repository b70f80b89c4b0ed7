"""The fake Cloudbeds speaks the real wire formats and its switches do what they say."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import cloudbeds_pms_v1_3 as sdk
import pytest
from aiohttp.test_utils import TestClient

from proxy.clock import FakeClock
from proxy.fake_cloudbeds import FAKE_STATE, FakeCloudbeds, create_fake_app, large_body

Client = TestClient[aiohttp.web.Request, aiohttp.web.Application]
TOKEN_URL = "/api/v1.3/access_token"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> FakeCloudbeds:
    return FakeCloudbeds(clock=clock)


@pytest.fixture
async def client(
    aiohttp_client: Callable[[aiohttp.web.Application], Awaitable[Client]],
    state: FakeCloudbeds,
) -> Client:
    return await aiohttp_client(create_fake_app(state))


def creds(**extra: str) -> dict[str, str]:
    return {"client_id": "fake-client-id", "client_secret": "fake-client-secret", **extra}


async def refresh(client: Client, token: str = "fake-refresh-token") -> aiohttp.ClientResponse:
    return await client.post(TOKEN_URL, data=creds(grant_type="refresh_token", refresh_token=token))


async def exchange(
    client: Client, code: str, redirect_uri: str = "https://localhost/callback"
) -> aiohttp.ClientResponse:
    form = creds(grant_type="authorization_code", code=code, redirect_uri=redirect_uri)
    return await client.post(TOKEN_URL, data=form)


async def new_token(client: Client) -> str:
    resp = await refresh(client)
    assert resp.status == 200
    token: str = (await resp.json())["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


API_KEY = {"x-api-key": "cbat_fake_api_key"}

# --- token endpoint ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1.1", "v1.2", "v1.3"])
async def test_refresh_grant_answers_cloudbeds_shape(
    client: Client, state: FakeCloudbeds, version: str
) -> None:
    form = creds(grant_type="refresh_token", refresh_token="fake-refresh-token")
    resp = await client.post(f"/api/{version}/access_token", data=form)
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token", "resources"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["refresh_token"] == "fake-refresh-token"
    assert body["resources"] == [{"type": "property", "id": "1001"}]
    assert state.token_calls["refresh_token"] == 1
    assert state.valid_access_tokens() == [body["access_token"]]


async def test_authorize_page_then_code_grant(client: Client, state: FakeCloudbeds) -> None:
    query = {"client_id": "fake-client-id", "redirect_uri": "https://localhost/callback"}
    resp = await client.get(
        "/api/v1.3/oauth",
        params={**query, "response_type": "code", "state": "xyz"},
        allow_redirects=False,
    )
    assert resp.status == 302
    location = urlsplit(resp.headers["Location"])
    assert location.netloc == "localhost"
    assert location.path == "/callback"
    params = parse_qs(location.query)
    assert params["state"] == ["xyz"]
    resp = await exchange(client, params["code"][0])
    assert resp.status == 200
    body = await resp.json()
    assert body["refresh_token"] in state.valid_refresh_tokens()
    assert state.token_calls["authorization_code"] == 1


@pytest.mark.parametrize(
    "query",
    [
        {"client_id": "nope", "redirect_uri": "https://localhost/callback"},
        {"client_id": "fake-client-id", "redirect_uri": "https://evil.example/cb"},
    ],
)
async def test_authorize_page_rejects_unknown_client_or_redirect(
    client: Client, query: dict[str, str]
) -> None:
    resp = await client.get("/api/v1.3/oauth", params=query, allow_redirects=False)
    assert resp.status == 400


async def test_bad_client_is_401_invalid_client(client: Client) -> None:
    form = creds(grant_type="refresh_token", refresh_token="fake-refresh-token")
    form["client_secret"] = "wrong"
    resp = await client.post(TOKEN_URL, data=form)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "invalid_client"
    assert body["error_description"]


async def test_unknown_refresh_token_is_400_invalid_grant(client: Client) -> None:
    resp = await refresh(client, "not-a-token")
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"


async def test_reject_refresh_switch(client: Client, state: FakeCloudbeds) -> None:
    state.reject_refresh = True
    resp = await refresh(client)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"


async def test_add_refresh_token(client: Client, state: FakeCloudbeds) -> None:
    state.add_refresh_token("another")
    assert (await refresh(client, "another")).status == 200


async def test_code_is_single_use(client: Client, state: FakeCloudbeds) -> None:
    code = state.issue_code()
    assert (await exchange(client, code)).status == 200
    resp = await exchange(client, code)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "server_error"
    assert body["error_description"]


async def test_code_expires_after_ten_minutes(
    client: Client, state: FakeCloudbeds, clock: FakeClock
) -> None:
    early, late = state.issue_code(), state.issue_code()
    clock.advance(599)
    assert (await exchange(client, early)).status == 200
    clock.advance(1)
    resp = await exchange(client, late)
    assert resp.status == 401
    assert (await resp.json())["error"] == "server_error"


async def test_code_with_wrong_redirect_uri(client: Client, state: FakeCloudbeds) -> None:
    resp = await exchange(client, state.issue_code(), redirect_uri="https://other/cb")
    assert resp.status == 401
    assert (await resp.json())["error"] == "server_error"


async def test_rotation_replaces_refresh_token(client: Client, state: FakeCloudbeds) -> None:
    state.rotate_refresh_tokens = True
    body = await (await refresh(client)).json()
    assert body["refresh_token"] != "fake-refresh-token"
    assert (await refresh(client)).status == 400
    assert (await refresh(client, body["refresh_token"])).status == 200


async def test_token_failures_then_success(client: Client, state: FakeCloudbeds) -> None:
    state.token_failures = 2
    for _ in range(2):
        resp = await refresh(client)
        assert resp.status == 500
        assert isinstance(await resp.json(), dict)
    assert (await refresh(client)).status == 200
    assert state.token_calls["refresh_token"] == 3


async def test_token_delay_is_counted_before_answer(client: Client, state: FakeCloudbeds) -> None:
    state.token_delay = 0.2
    call = asyncio.ensure_future(refresh(client))
    await asyncio.sleep(0.1)
    assert state.token_calls["refresh_token"] == 1
    assert not call.done()
    assert (await call).status == 200


async def test_expires_in_is_configurable(client: Client, state: FakeCloudbeds) -> None:
    state.expires_in = 28800
    assert (await (await refresh(client)).json())["expires_in"] == 28800


# --- API authentication -------------------------------------------------------------


async def test_api_without_credentials_is_401_access_denied(
    client: Client, state: FakeCloudbeds
) -> None:
    resp = await client.get("/api/v1.3/getHotels")
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "access_denied"
    assert body["message"]
    assert state.rejected_calls == 1
    assert state.expired_token_calls == 0


async def test_api_key_is_accepted(client: Client) -> None:
    assert (await client.get("/api/v1.3/getHotels", headers=API_KEY)).status == 200


async def test_access_token_expires_by_clock(
    client: Client, state: FakeCloudbeds, clock: FakeClock
) -> None:
    token = await new_token(client)
    clock.advance(3599)
    assert (await client.get("/api/v1.3/getHotels", headers=bearer(token))).status == 200
    clock.advance(1)
    resp = await client.get("/api/v1.3/getHotels", headers=bearer(token))
    assert resp.status == 401
    assert (await resp.json())["error"] == "access_denied"
    assert state.expired_token_calls == 1
    assert state.rejected_calls == 1
    assert state.valid_access_tokens() == []


async def test_unknown_token_is_not_counted_as_expired(
    client: Client, state: FakeCloudbeds
) -> None:
    resp = await client.get("/api/v1.3/getHotels", headers=bearer("made-up"))
    assert resp.status == 401
    assert state.expired_token_calls == 0


async def test_revoke_all(client: Client, state: FakeCloudbeds) -> None:
    old = await new_token(client)
    state.revoke_all()
    resp = await client.get("/api/v1.3/getHotels", headers=bearer(old))
    assert resp.status == 401
    assert (await resp.json())["error"] == "access_denied"
    assert state.expired_token_calls == 0
    fresh = await new_token(client)
    assert (await client.get("/api/v1.3/getHotels", headers=bearer(fresh))).status == 200


async def test_oauth_metadata_requires_auth(client: Client) -> None:
    assert (await client.get("/api/v1.3/oauth/metadata")).status == 401
    resp = await client.get("/api/v1.3/oauth/metadata", headers=API_KEY)
    assert resp.status == 200
    assert isinstance(await resp.json(), dict)


async def test_rate_limit_next(client: Client, state: FakeCloudbeds) -> None:
    state.rate_limit_next, state.rate_limit_retry_after = 1, 7
    resp = await client.get("/api/v1.3/getHotels", headers=API_KEY)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "7"
    assert await resp.json() == {"success": False, "message": "rate limited"}
    assert (await client.get("/api/v1.3/getHotels", headers=API_KEY)).status == 200
    assert state.api_calls == 2
    assert state.per_second == {1_700_000_000: 2}


async def test_request_ids_and_requests_seen(client: Client, state: FakeCloudbeds) -> None:
    resp = await client.get("/api/v1.3/getHotels?x=1", headers={"X-Request-ID": "caller-1"})
    assert resp.headers["X-Request-ID"].startswith("fake-")
    resp = await refresh(client)
    assert resp.headers["X-Request-ID"].startswith("fake-")
    missing = await client.get("/api/v1.3/nothingHere")
    assert missing.status == 404
    assert missing.headers["X-Request-ID"].startswith("fake-")
    assert state.incoming_request_ids == ["caller-1"]
    assert state.requests_seen == [
        ("GET", "/api/v1.3/getHotels?x=1"),
        ("POST", TOKEN_URL),
        ("GET", "/api/v1.3/nothingHere"),
    ]


# --- fake-only endpoints -------------------------------------------------------------


async def raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send bytes on a fresh connection; return (head, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def test_echo_is_byte_exact(client: Client) -> None:
    assert client.port is not None
    path = "/api/v1.3/fake/echo?a=%2C+b&rooms[0][roomTypeID]=1"
    head, body = await raw_request(
        client.port,
        f"PUT {path} HTTP/1.1\r\nHost: x\r\nx-api-key: cbat_fake_api_key\r\n"
        "X-Odd-Case: A\r\nx-dup: 1\r\nX-Dup: 2\r\nContent-Length: 5\r\n"
        "Connection: close\r\n\r\nhello".encode(),
    )
    assert head.startswith(b"HTTP/1.1 200")
    echo = json.loads(body)
    assert echo["method"] == "PUT"
    assert echo["raw_path"] == path
    assert ["X-Odd-Case", "A"] in echo["headers"]
    assert [h for h in echo["headers"] if h[0].lower() == "x-dup"] == [
        ["x-dup", "1"],
        ["X-Dup", "2"],
    ]
    assert echo["body_length"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert base64.b64decode(echo["body_base64"]) == b"hello"


async def test_echo_tail_and_large_body(client: Client) -> None:
    blob = b"x" * (2 * 1024 * 1024)
    resp = await client.post("/api/v1.3/fake/echo/a/b%2Fc", data=io.BytesIO(blob), headers=API_KEY)
    echo = await resp.json()
    assert echo["raw_path"] == "/api/v1.3/fake/echo/a/b%2Fc"
    assert echo["body_length"] == len(blob)
    assert echo["body_sha256"] == hashlib.sha256(blob).hexdigest()
    assert echo["body_base64"] is None


async def test_gzip_is_precompressed(client: Client) -> None:
    assert client.port is not None
    head, body = await raw_request(
        client.port,
        b"GET /api/v1.3/fake/gzip HTTP/1.1\r\nHost: x\r\nx-api-key: cbat_fake_api_key\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert b"content-encoding: gzip" in head.lower()
    assert json.loads(gzip.decompress(body))["success"] is True


async def test_large_streams_deterministic_bytes(client: Client) -> None:
    size = 3 * 65536 + 17
    resp = await client.get("/api/v1.3/fake/large", params={"bytes": size}, headers=API_KEY)
    assert resp.headers["Content-Length"] == str(size)
    assert await resp.read() == large_body(size)


async def multipart_stream(size: int) -> AsyncIterator[bytes]:
    chunk = b"\x00\x01" * 32768
    for start in range(0, size, len(chunk)):
        yield chunk[: size - start]


@pytest.mark.parametrize("size", [1, pytest.param(100 * 1024 * 1024, marks=pytest.mark.slow)])
async def test_guest_document_upload_is_streamed(client: Client, size: int) -> None:
    form = aiohttp.FormData()
    form.add_field("propertyID", "1001")
    form.add_field("guestID", "42")
    form.add_field("file", multipart_stream(size), filename="passport.pdf")
    resp = await client.post("/api/v1.3/postGuestDocument", data=form, headers=API_KEY)
    assert resp.status == 200
    data = (await resp.json())["data"]
    expected = hashlib.sha256()
    async for chunk in multipart_stream(size):
        expected.update(chunk)
    assert data == {"bytes": size, "sha256": expected.hexdigest(), "filename": "passport.pdf"}


# --- control surface ------------------------------------------------------------------


async def test_control_sets_switches_and_actions(client: Client, state: FakeCloudbeds) -> None:
    token = await new_token(client)
    resp = await client.post(
        "/_fake/control",
        json={"token_failures": 2, "api_delay": 0.5, "revoke_all": True, "issue_code": True},
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["token_failures"] == 2
    assert state.api_delay == 0.5
    assert state.token_status(token) == "revoked"
    state.token_failures = 0
    assert (await exchange(client, body["code"])).status == 200
    await client.post("/_fake/control", json={"add_refresh_token": "rt-2"})
    assert "rt-2" in state.valid_refresh_tokens()


async def test_control_rejects_unknown_keys(client: Client) -> None:
    assert (await client.post("/_fake/control", json={"nope": 1})).status == 400
    assert (await client.post("/_fake/control", json={"api_delay": "x"})).status == 400
    assert (await client.post("/_fake/control", json=[1])).status == 400


async def test_state_reports_counters(client: Client) -> None:
    await refresh(client)
    body = await (await client.get("/_fake/state")).json()
    assert body["token_calls"] == {"refresh_token": 1}
    assert body["requests_seen"] == [["POST", TOKEN_URL]]
    assert client.app is not None
    assert client.app[FAKE_STATE].token_calls["refresh_token"] == 1


def test_default_app_has_state() -> None:
    assert isinstance(create_fake_app()[FAKE_STATE], FakeCloudbeds)


# --- the official SDK deserialises the fake's answers -------------------------------


@pytest.fixture
def sdk_client(client: Client) -> Iterator[Callable[[str], sdk.ApiClient]]:
    opened: list[sdk.ApiClient] = []

    def make(token: str) -> sdk.ApiClient:
        config = sdk.Configuration(
            host=f"http://127.0.0.1:{client.port}/api/v1.3", access_token=token
        )
        opened.append(sdk.ApiClient(config))
        return opened[-1]

    yield make
    for api_client in opened:
        api_client.rest_client.pool_manager.clear()


async def test_sdk_get_hotels(client: Client, sdk_client: Callable[[str], Any]) -> None:
    token = await new_token(client)
    result = await asyncio.to_thread(sdk.HotelApi(sdk_client(token)).get_hotels_get)
    assert result.success is True
    hotel = result.data[0]
    assert hotel.property_id == "1001"
    assert hotel.property_name == "Fake Hotel"
    assert hotel.property_currency[0].currency_code == "USD"


async def test_sdk_get_reservations(client: Client, sdk_client: Callable[[str], Any]) -> None:
    token = await new_token(client)
    api = sdk.ReservationApi(sdk_client(token))
    result = await asyncio.to_thread(api.get_reservations_get)
    assert result.data[0].status == "confirmed"
    assert result.data[0].start_date == datetime.date(2024, 2, 1)


async def test_sdk_post_reservation(
    client: Client, state: FakeCloudbeds, sdk_client: Callable[[str], Any]
) -> None:
    token = await new_token(client)
    api = sdk.ReservationApi(sdk_client(token))
    result = await asyncio.to_thread(
        api.post_reservation_post,
        property_id="1001",
        start_date=datetime.date(2024, 3, 1),
        end_date=datetime.date(2024, 3, 4),
        guest_first_name="Ada",
        guest_last_name="Lovelace",
        guest_country="GB",
        guest_email="ada@example.com",
        payment_method="cash",
        rooms=[sdk.PostReservationRequestRoomsInner(roomTypeID="1", quantity=1)],
        adults=[sdk.PostReservationRequestAdultsInner(roomTypeID="1", quantity=2)],
        children=[sdk.PostReservationRequestChildrenInner(roomTypeID="1", quantity=0)],
    )
    assert result.success is True
    assert result.status == "confirmed"
    assert result.guest_first_name == "Ada"
    assert result.start_date == datetime.date(2024, 3, 1)
    assert ("POST", "/api/v1.3/postReservation") in state.requests_seen


async def test_sdk_sees_401_shape(client: Client, sdk_client: Callable[[str], Any]) -> None:
    api = sdk.HotelApi(sdk_client("made-up"))
    with pytest.raises(sdk.exceptions.UnauthorizedException) as info:
        await asyncio.to_thread(api.get_hotels_get)
    assert json.loads(info.value.body)["error"] == "access_denied"


# --- apps and connections -------------------------------------------------------------

APP_B = {"client_id": "app-b", "client_secret": "b-secret", "redirect_uri": "https://b.example/cb"}


def b_creds(**extra: str) -> dict[str, str]:
    return {"client_id": "app-b", "client_secret": "b-secret", **extra}


async def b_exchange(
    client: Client, code: str, grant_type: str = "authorization_code"
) -> aiohttp.ClientResponse:
    form = b_creds(grant_type=grant_type, code=code, redirect_uri=APP_B["redirect_uri"])
    return await client.post(TOKEN_URL, data=form)


async def b_tokens(client: Client, state: FakeCloudbeds, **grant: Any) -> dict[str, Any]:
    """Install app B for the given properties or association; the token answer."""
    resp = await b_exchange(client, state.issue_code(client_id="app-b", **grant))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def hotel_ids(client: Client, headers: dict[str, str]) -> list[str]:
    resp = await client.get("/api/v1.3/getHotels", headers=headers)
    assert resp.status == 200, await resp.text()
    return [h["propertyID"] for h in (await resp.json())["data"]]


@pytest.fixture
def state_b(state: FakeCloudbeds) -> FakeCloudbeds:
    state.add_app(**APP_B)
    return state


async def test_added_app_has_its_own_client_and_codes(
    client: Client, state_b: FakeCloudbeds
) -> None:
    body = await b_tokens(client, state_b, properties=["2101", "2102"])
    assert body["resources"] == [
        {"type": "property", "id": "2101"},
        {"type": "property", "id": "2102"},
    ]
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert await hotel_ids(client, bearer(body["access_token"])) == ["2101", "2102"]
    # a code belongs to one app; a refresh token too
    resp = await exchange(client, state_b.issue_code(client_id="app-b"))
    assert resp.status == 401
    assert (await resp.json())["error"] == "server_error"
    assert (await refresh(client, body["refresh_token"])).status == 400
    wrong_secret = {**b_creds(), "client_secret": "fake-client-secret"}
    resp = await client.post(
        TOKEN_URL, data={**wrong_secret, "grant_type": "refresh_token", "refresh_token": "x"}
    )
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"
    with pytest.raises(ValueError, match="already exists"):
        state_b.add_app(**APP_B)
    with pytest.raises(ValueError, match="unknown app"):
        state_b.issue_code(client_id="nobody")


async def test_refresh_keeps_coverage_with_and_without_rotation(
    client: Client, state_b: FakeCloudbeds
) -> None:
    first = await b_tokens(client, state_b, properties=["2101"], association="A1")
    assert first["resources"] == [{"type": "association", "id": "A1"}]
    form = b_creds(grant_type="refresh_token", refresh_token=first["refresh_token"])
    again = await (await client.post(TOKEN_URL, data=form)).json()
    assert again["resources"] == [{"type": "association", "id": "A1"}]
    assert again["refresh_token"] == first["refresh_token"]
    state_b.rotate_refresh_tokens = True
    rotated = await (await client.post(TOKEN_URL, data=form)).json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert await hotel_ids(client, bearer(rotated["access_token"])) == ["2101"]
    assert (await client.post(TOKEN_URL, data=form)).status == 400


async def test_no_resources_switch(client: Client, state_b: FakeCloudbeds) -> None:
    state_b.no_resources = True
    body = await b_tokens(client, state_b, properties=["2101", "2102"])
    assert body["resources"] == []
    assert await hotel_ids(client, bearer(body["access_token"])) == ["2101", "2102"]


async def test_api_key_grant_delivers_a_key_for_the_codes_properties(
    client: Client, state_b: FakeCloudbeds
) -> None:
    code = state_b.issue_code(client_id="app-b", properties=["2101"])
    resp = await b_exchange(client, code, "urn:ietf:params:oauth:grant-type:api-key")
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token"}
    key = body["access_token"]
    assert key.startswith("cbat_")
    assert await hotel_ids(client, {"x-api-key": key}) == ["2101"]
    assert state_b.api_log[-1]["kind"] == "api_key"
    assert state_b.api_log[-1]["credential"] == state_b.credential_id(key)
    again = await b_exchange(client, code, "urn:ietf:params:oauth:grant-type:api-key")
    assert again.status == 401
    assert (await again.json())["error"] == "server_error"
    assert state_b.token_calls_by_client["app-b"] == {"urn:ietf:params:oauth:grant-type:api-key": 2}


async def test_refresh_token_exchange_then_refresh_revokes_the_key(
    client: Client, state_b: FakeCloudbeds
) -> None:
    tokens = await b_tokens(client, state_b, properties=["2101"])
    form = b_creds(grant_type="refresh_token_exchange", refresh_token=tokens["refresh_token"])
    resp = await client.post(TOKEN_URL, data=form)
    assert resp.status == 200
    key = (await resp.json())["access_token"]
    assert key.startswith("cbat_")
    assert await hotel_ids(client, {"x-api-key": key}) == ["2101"]
    refresh_form = b_creds(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert (await client.post(TOKEN_URL, data=refresh_form)).status == 200
    resp = await client.get("/api/v1.3/getHotels", headers={"x-api-key": key})
    assert resp.status == 401
    assert (await resp.json())["error"] == "access_denied"
    assert key not in state_b.valid_api_keys()
    bad = b_creds(grant_type="refresh_token_exchange", refresh_token="nope")
    assert (await client.post(TOKEN_URL, data=bad)).status == 400


async def test_counters_per_client_id(client: Client, state_b: FakeCloudbeds) -> None:
    tokens = await b_tokens(client, state_b, properties=["2101"])
    await refresh(client)
    await client.post(TOKEN_URL, data={"client_id": "stranger", "grant_type": "refresh_token"})
    await client.get("/api/v1.3/getHotels", headers=bearer(tokens["access_token"]))
    await client.get("/api/v1.3/getHotels", headers=API_KEY)
    await client.get("/api/v1.3/getHotels")  # no credential: no client id to count for
    assert state_b.token_calls_by_client == {
        "app-b": {"authorization_code": 1},
        "fake-client-id": {"refresh_token": 1},
        "stranger": {"refresh_token": 1},
    }
    assert state_b.api_calls_by_client == {"app-b": 1, "fake-client-id": 1}
    assert state_b.api_calls == 3
    assert state_b.per_second_by_client == {
        "app-b": {1_700_000_000: 2},
        "fake-client-id": {1_700_000_000: 2},
        "stranger": {1_700_000_000: 1},
    }
    body = await (await client.get("/_fake/state")).json()
    assert body["token_calls_by_client"]["app-b"] == {"authorization_code": 1}
    assert body["api_calls_by_client"] == {"app-b": 1, "fake-client-id": 1}
    assert body["per_second_by_client"]["app-b"] == {"1700000000": 2}
    assert body["max_in_window"] == {"app-b": 2, "fake-client-id": 2, "stranger": 1}


async def test_max_in_window_slides_across_second_boundaries(
    client: Client, state: FakeCloudbeds, clock: FakeClock
) -> None:
    clock.advance(0.5)
    for step in (0.0, 0.25, 0.25, 0.25):  # at .5, .75, 1.0, 1.25: 2 + 2 by integer second
        clock.advance(step)
        assert (await client.get("/api/v1.3/getHotels", headers=API_KEY)).status == 200
    assert sorted(state.per_second_by_client["fake-client-id"].values()) == [2, 2]
    assert state.max_in_window("fake-client-id") == 4
    assert state.max_in_window("fake-client-id", window=0.5) == 2
    assert state.max_in_window("fake-client-id", window=0.75) == 3
    assert state.max_in_window("nobody") == 0
    clock.advance(0.75)  # 2.0: exactly one second after 1.0, so outside [1.0, 2.0)
    await refresh(client)  # token calls spend the same budget
    await client.get("/api/v1.3/getHotels", headers=API_KEY)
    await client.get("/api/v1.3/getHotels", headers=API_KEY)
    # [1.25, 2.25) holds four; a closed [1.0, 2.0] would hold five
    assert state.max_in_window("fake-client-id") == 4
    body = await (await client.get("/_fake/state")).json()
    assert body["max_in_window"] == {"fake-client-id": 4}


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/v1.3/getHotels", {"X-PROPERTY-ID": "2102"}),
        ("/api/v1.3/getHotels", {"X-PROPERTY-ID": "2101,2102"}),
        ("/api/v1.3/getReservations?propertyID=2102", {}),
        ("/api/v1.3/getReservations?propertyIDs=2101%2C2102", {}),
    ],
)
async def test_wrong_property_is_refused_and_counted(
    client: Client, state_b: FakeCloudbeds, path: str, headers: dict[str, str]
) -> None:
    tokens = await b_tokens(client, state_b, properties=["2101"])
    resp = await client.get(path, headers={**bearer(tokens["access_token"]), **headers})
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is False
    assert "property" in body["message"]
    assert state_b.wrong_property_calls == 1
    assert state_b.api_log[-1]["status"] == 200
    assert "2102" in state_b.api_log[-1]["asked"]


async def test_wrong_property_status_switch_and_echo_takes_any_property(
    client: Client, state_b: FakeCloudbeds
) -> None:
    state_b.wrong_property_status = 403
    tokens = await b_tokens(client, state_b, properties=["2101"])
    auth = {**bearer(tokens["access_token"]), "X-PROPERTY-ID": "9999"}
    resp = await client.get("/api/v1.3/getReservations", headers=auth)
    assert resp.status == 403
    assert (await resp.json())["success"] is False
    assert (await client.get("/api/v1.3/fake/echo", headers=auth)).status == 200
    mixed = await client.get("/api/v1.3/getReservations?propertyID=2101", headers=auth)
    assert mixed.status == 403  # the header still names 9999
    ok = await client.get(
        "/api/v1.3/getReservations?propertyID=2101", headers=bearer(tokens["access_token"])
    )
    assert [r["propertyID"] for r in (await ok.json())["data"]] == ["2101"]
    assert state_b.wrong_property_calls == 2


async def test_api_log_names_the_credential_and_property(
    client: Client, state_b: FakeCloudbeds
) -> None:
    one = await b_tokens(client, state_b, properties=["2101"])
    group = await b_tokens(client, state_b, properties=["2201", "2202"], association="A9")
    await client.get("/api/v1.3/getHotels", headers=bearer(one["access_token"]))
    await client.get(
        "/api/v1.3/getReservations",
        headers={**bearer(group["access_token"]), "X-PROPERTY-ID": "2202"},
    )
    await client.get("/api/v1.3/getHotels")
    first, second, anonymous = state_b.api_log
    assert first == {
        "method": "GET",
        "path": "/api/v1.3/getHotels",
        "client_id": "app-b",
        "connection": "app-b/property:2101",
        "credential": state_b.credential_id(one["access_token"]),
        "kind": "access_token",
        "properties": ["2101"],
        "association": None,
        "asked": [],
        "status": 200,
    }
    assert second["connection"] == "app-b/association:A9"
    assert second["properties"] == ["2201", "2202"]
    assert second["asked"] == ["2202"]
    assert second["credential"] == state_b.credential_id(group["access_token"])
    assert anonymous["client_id"] is None
    assert anonymous["credential"] is None
    assert anonymous["status"] == 401
    body = await (await client.get("/_fake/state")).json()
    assert body["api_log"][0] == first
    assert one["access_token"] not in json.dumps(body)


async def test_post_app_state_disabled_disconnects_that_property(
    client: Client, state_b: FakeCloudbeds
) -> None:
    gone = await b_tokens(client, state_b, properties=["2101"])
    kept = await b_tokens(client, state_b, properties=["2102"])
    key_resp = await b_exchange(
        client,
        state_b.issue_code(client_id="app-b", properties=["2101"]),
        "urn:ietf:params:oauth:grant-type:api-key",
    )
    key = (await key_resp.json())["access_token"]
    resp = await client.post(
        "/api/v1.3/postAppState",
        data={"propertyID": "2101", "app_state": "disabled"},
        headers=bearer(gone["access_token"]),
    )
    assert resp.status == 200
    assert await resp.json() == {"success": True}
    form = b_creds(grant_type="refresh_token", refresh_token=gone["refresh_token"])
    resp = await client.post(TOKEN_URL, data=form)
    assert resp.status == 400
    assert await resp.json() == {
        "error": "invalid_request",
        "message": "The refresh token is invalid.",
    }
    for headers in (bearer(gone["access_token"]), {"x-api-key": key}):
        resp = await client.get("/api/v1.3/getHotels", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"] == "access_denied"
    assert await hotel_ids(client, bearer(kept["access_token"])) == ["2102"]
    form = b_creds(grant_type="refresh_token", refresh_token=kept["refresh_token"])
    assert (await client.post(TOKEN_URL, data=form)).status == 200
    assert state_b.app_state_calls == [
        {
            "client_id": "app-b",
            "property_id": "2101",
            "app_state": "disabled",
            "credential": state_b.credential_id(gone["access_token"]),
        }
    ]
    again = await b_tokens(client, state_b, properties=["2101"])  # a re-install works
    assert await hotel_ids(client, bearer(again["access_token"])) == ["2101"]


async def test_post_app_state_enabled_bad_value_and_other_property(
    client: Client, state_b: FakeCloudbeds
) -> None:
    tokens = await b_tokens(client, state_b, properties=["2101"])
    auth = bearer(tokens["access_token"])
    url = "/api/v1.3/postAppState"
    enabled = await client.post(
        url, data={"propertyID": "2101", "app_state": "enabled"}, headers=auth
    )
    assert await enabled.json() == {"success": True}
    bad = await client.post(url, data={"propertyID": "2101", "app_state": "off"}, headers=auth)
    assert bad.status == 400
    assert (await bad.json())["success"] is False
    other = await client.post(
        url, data={"propertyID": "9999", "app_state": "disabled"}, headers=auth
    )
    assert (await other.json())["success"] is False
    assert state_b.wrong_property_calls == 1
    assert (
        await client.post(url, data={"propertyID": "2101", "app_state": "disabled"})
    ).status == 401
    assert await hotel_ids(client, auth) == ["2101"]
    assert [c["app_state"] for c in state_b.app_state_calls] == ["enabled", "off", "disabled"]


async def authorize_redirect(client: Client, **query: str) -> dict[str, list[str]]:
    resp = await client.get(
        "/api/v1.3/oauth", params={"response_type": "code", **query}, allow_redirects=False
    )
    assert resp.status == 302, await resp.text()
    location = urlsplit(resp.headers["Location"])
    assert f"https://{location.netloc}{location.path}" == APP_B["redirect_uri"]
    return parse_qs(location.query)


async def test_authorize_page_takes_queued_installs_then_fresh_properties(
    client: Client, state_b: FakeCloudbeds
) -> None:
    query = {"client_id": "app-b", "redirect_uri": APP_B["redirect_uri"]}
    state_b.queue_install("app-b", properties=["3001", "3002"], association="G1")
    queued = await authorize_redirect(client, **query, state="s1")
    assert queued["state"] == ["s1"]
    body = await (await b_exchange(client, queued["code"][0])).json()
    assert body["resources"] == [{"type": "association", "id": "G1"}]
    assert await hotel_ids(client, bearer(body["access_token"])) == ["3001", "3002"]
    seen = []
    for _ in range(2):
        params = await authorize_redirect(client, **query)
        assert "state" not in params
        body = await (await b_exchange(client, params["code"][0])).json()
        seen.append(body["resources"])
    assert seen == [[{"type": "property", "id": "2001"}], [{"type": "property", "id": "2002"}]]
    resp = await client.get(
        "/api/v1.3/oauth",
        params={"client_id": "app-b", "redirect_uri": "https://localhost/callback"},
        allow_redirects=False,
    )
    assert resp.status == 400


async def test_marketplace_install_redirects_with_a_code_and_no_state(
    client: Client, state_b: FakeCloudbeds
) -> None:
    url = state_b.marketplace_install("app-b", properties=["4001"])
    parts = urlsplit(url)
    assert f"https://{parts.netloc}{parts.path}" == APP_B["redirect_uri"]
    params = parse_qs(parts.query)
    assert set(params) == {"code"}
    body = await (await b_exchange(client, params["code"][0])).json()
    assert body["resources"] == [{"type": "property", "id": "4001"}]
    fresh = parse_qs(urlsplit(state_b.marketplace_install("app-b")).query)
    body = await (await b_exchange(client, fresh["code"][0])).json()
    assert body["resources"] == [{"type": "property", "id": "2001"}]


async def test_control_drives_apps_and_installs(client: Client, state: FakeCloudbeds) -> None:
    async def control(**changes: Any) -> dict[str, Any]:
        resp = await client.post("/_fake/control", json=changes)
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    body = await control(add_app=APP_B, issue_code={"client_id": "app-b", "properties": ["5001"]})
    assert body["apps"] == ["fake-client-id", "app-b"]
    tokens = await (await b_exchange(client, body["code"])).json()
    assert tokens["resources"] == [{"type": "property", "id": "5001"}]

    await control(queue_install={"client_id": "app-b", "association": "G2", "properties": [5002]})
    params = await authorize_redirect(client, client_id="app-b", redirect_uri=APP_B["redirect_uri"])
    queued = await (await b_exchange(client, params["code"][0])).json()
    assert queued["resources"] == [{"type": "association", "id": "G2"}]
    assert await hotel_ids(client, bearer(queued["access_token"])) == ["5002"]

    body = await control(marketplace_install={"client_id": "app-b", "properties": ["5003"]})
    code = parse_qs(urlsplit(body["redirect_url"]).query)["code"][0]
    installed = await (await b_exchange(client, code)).json()
    assert installed["resources"] == [{"type": "property", "id": "5003"}]

    body = await control(disconnect={"client_id": "app-b", "property_id": "5003"})
    assert body["disconnected"] == 2  # its access token and its refresh token
    resp = await client.get("/api/v1.3/getHotels", headers=bearer(installed["access_token"]))
    assert resp.status == 401
    assert await hotel_ids(client, bearer(tokens["access_token"])) == ["5001"]

    await control(
        add_refresh_token={"token": "rt-b", "client_id": "app-b", "properties": ["5004"]},
        add_api_key={"key": "cbat_b", "client_id": "app-b", "properties": ["5005"]},
    )
    form = b_creds(grant_type="refresh_token", refresh_token="rt-b")
    seeded = await (await client.post(TOKEN_URL, data=form)).json()
    assert seeded["resources"] == [{"type": "property", "id": "5004"}]
    assert await hotel_ids(client, {"x-api-key": "cbat_b"}) == ["5005"]

    body = await control(no_resources=True, wrong_property_status=403)
    assert (body["no_resources"], body["wrong_property_status"]) == (True, 403)
    assert body["wrong_property_calls"] == 0
    assert body["app_state_calls"] == []


@pytest.mark.parametrize(
    "changes",
    [
        {"add_app": {"client_id": "x"}},
        {"add_app": {"client_id": "fake-client-id", "client_secret": "s", "redirect_uri": "r"}},
        {"issue_code": {"client_id": "nobody"}},
        {"issue_code": {"properties": "1001"}},
        {"issue_code": {"properties": [None]}},
        {"queue_install": {"properties": ["1"]}},
        {"marketplace_install": {"client_id": "fake-client-id", "colour": "red"}},
        {"disconnect": {"client_id": "fake-client-id"}},
        {"add_api_key": {"client_id": "fake-client-id"}},
    ],
)
async def test_control_rejects_bad_action_arguments(
    client: Client, changes: dict[str, Any]
) -> None:
    resp = await client.post("/_fake/control", json=changes)
    assert resp.status == 400
    assert (await resp.json())["error"] == "bad_control"


async def test_default_app_authorize_keeps_the_fakes_properties(
    client: Client, state: FakeCloudbeds
) -> None:
    state.properties = ("1001", "1002")
    query = {"client_id": "fake-client-id", "redirect_uri": "https://localhost/callback"}
    resp = await client.get("/api/v1.3/oauth", params=query, allow_redirects=False)
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    body = await (await exchange(client, code)).json()
    assert body["resources"] == [
        {"type": "property", "id": "1001"},
        {"type": "property", "id": "1002"},
    ]
    assert await hotel_ids(client, API_KEY) == ["1001", "1002"]
    state.queue_install("fake-client-id", properties=["1003"])
    resp = await client.get("/api/v1.3/oauth", params=query, allow_redirects=False)
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    body = await (await exchange(client, code)).json()
    assert body["resources"] == [{"type": "property", "id": "1003"}]
