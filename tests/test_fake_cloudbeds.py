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
