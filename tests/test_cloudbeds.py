"""The token endpoint, sans-I/O: request forms, response decoding, and the thin sender."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from proxy.cloudbeds import (
    TokenResponse,
    code_form,
    decode_token_response,
    refresh_form,
    send_token_request,
)
from proxy.errors import TokenEndpointUnavailable, TokenEndpointUnrecognised, TokenRejected
from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import free_port

SECRET = "client-secret-do-not-leak"
REFRESH = "refresh-token-do-not-leak"


def body(**data: Any) -> bytes:
    return json.dumps(data).encode()


def success(**overrides: Any) -> bytes:
    data = {
        "access_token": "access-1",
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "refresh-2",
        "resources": [
            {"type": "property", "id": "1001"},
            {"type": "association", "id": "77"},
            {"type": "property", "id": 1002},
        ],
    }
    data.update(overrides)
    return json.dumps(data).encode()


def test_forms_match_the_cloudbeds_spec() -> None:
    assert refresh_form("id", SECRET, REFRESH) == {
        "grant_type": "refresh_token",
        "client_id": "id",
        "client_secret": SECRET,
        "refresh_token": REFRESH,
    }
    assert code_form("id", SECRET, "https://x/cb", "code-1") == {
        "grant_type": "authorization_code",
        "client_id": "id",
        "client_secret": SECRET,
        "redirect_uri": "https://x/cb",
        "code": "code-1",
    }


def test_success_decodes_tokens_and_properties() -> None:
    response = decode_token_response(200, success())
    assert response == TokenResponse(
        access_token="access-1",
        expires_in=3600.0,
        refresh_token="refresh-2",
        properties=("1001", "1002"),
        associations=("77",),
    )
    assert "access-1" not in repr(response)
    assert "refresh-2" not in repr(response)


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [(3600, 3600.0), (28_800, 28_800.0), (59.5, 59.5), ("7200", 7200.0), ("1800.5", 1800.5)],
)
def test_expires_in_is_taken_from_each_response(expires_in: Any, expected: float) -> None:
    assert decode_token_response(200, success(expires_in=expires_in)).expires_in == expected


def test_missing_refresh_token_and_resources_are_fine() -> None:
    data = {"access_token": "a", "expires_in": 3600, "token_type": "Bearer"}
    response = decode_token_response(200, body(**data))
    assert response.refresh_token is None
    assert response.properties == ()
    assert decode_token_response(200, success(refresh_token="")).refresh_token is None


@pytest.mark.parametrize(
    "expires_in", ["", '"soon"', "true", "[3600]", "null", "0", "-5", '"-1"', '"nan"', "1e999"]
)
def test_unusable_expires_in_is_transient_never_a_guess(expires_in: str) -> None:
    # Never assume 3600: a token whose lifetime is unknown is not adopted.
    field = f', "expires_in": {expires_in}' if expires_in else ""
    with pytest.raises(TokenEndpointUnavailable):
        decode_token_response(200, f'{{"access_token": "a"{field}}}'.encode())


@pytest.mark.parametrize(
    ("status", "payload", "reason"),
    [
        (401, {"error": "access_denied", "message": "Invalid client"}, "access_denied"),
        (401, {"error": "server_error", "error_description": "Invalid code"}, "server_error"),
        (400, {"error": "invalid_grant", "error_description": "Bad token"}, "invalid_grant"),
        (401, {"error": "invalid_client"}, "invalid_client"),
        (400, {"error": "invalid_request", "message": "The refresh token is invalid."}, "invalid_"),
    ],
)
def test_4xx_is_rejected(status: int, payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenRejected) as info:
        decode_token_response(status, json.dumps(payload).encode())
    assert info.value.status == status
    assert info.value.reason.startswith(reason)


@pytest.mark.parametrize(
    "raw", [b"<html>Bad Request</html>", b"", b"{}", b'{"error": 5}', b'{"error": " "}', b"[]"]
)
def test_4xx_without_an_oauth_error_body_is_transient_and_unrecognised(raw: bytes) -> None:
    # A load balancer's page is not Cloudbeds' verdict on the refresh token.
    with pytest.raises(TokenEndpointUnrecognised) as info:
        decode_token_response(400, raw)
    assert isinstance(info.value, TokenEndpointUnavailable)
    assert info.value.status == 400


@pytest.mark.parametrize("status", [408, 429])
def test_4xx_that_means_later_is_transient(status: int) -> None:
    with pytest.raises(TokenEndpointUnavailable):
        decode_token_response(status, body(error="rate_limited"))


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (500, body(success=False, message="fake transient error")),
        (502, b"<html>Bad Gateway</html>"),
        (503, b""),
        (200, b"not json"),
        (200, b"[1, 2]"),
        (200, body(token_type="Bearer", expires_in=3600)),
        (200, body(access_token="", expires_in=3600)),
        (200, body(access_token=42, expires_in=3600)),
        (302, b""),
    ],
)
def test_5xx_and_unreadable_answers_are_transient(status: int, raw: bytes) -> None:
    with pytest.raises(TokenEndpointUnavailable):
        decode_token_response(status, raw)


@pytest.mark.parametrize("status", [200, 400, 401, 500])
def test_error_messages_never_contain_the_secrets(status: int) -> None:
    # An endpoint that echoes what it was sent must not leak it through our message.
    raw = body(
        error=f"invalid_grant {REFRESH}", error_description=f"client_secret={SECRET} rt={REFRESH}"
    )
    with pytest.raises((TokenRejected, TokenEndpointUnavailable)) as info:
        decode_token_response(status, raw, secrets=[SECRET, REFRESH])
    assert SECRET not in str(info.value)
    assert REFRESH not in str(info.value)
    assert SECRET not in getattr(info.value, "reason", "")


# -- the sender, against the fake Cloudbeds on a real port --------------------------------------

Fake = tuple[FakeCloudbeds, str]


async def test_send_refresh_grant_to_the_fake(fake_cloudbeds: Fake) -> None:
    state, url = fake_cloudbeds
    state.expires_in = 8 * 3600
    form = refresh_form(state.client_id, state.client_secret, state.refresh_token)
    async with aiohttp.ClientSession() as session:
        response = await send_token_request(session, f"{url}/api/v1.3/access_token", form, 5)
    assert response.access_token in state.valid_access_tokens()
    assert response.expires_in == 8 * 3600
    assert response.properties == state.properties
    assert state.token_calls["refresh_token"] == 1


async def test_send_invalid_grant_is_rejected_without_the_token(fake_cloudbeds: Fake) -> None:
    state, url = fake_cloudbeds
    form = refresh_form(state.client_id, state.client_secret, "refresh-token-that-is-unknown")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenRejected) as info:
            await send_token_request(session, f"{url}/api/v1.3/access_token", form, 5)
    assert info.value.status == 400
    assert info.value.reason.startswith("invalid_grant")
    assert "refresh-token-that-is-unknown" not in info.value.reason


async def test_send_bad_code_is_rejected(fake_cloudbeds: Fake) -> None:
    state, url = fake_cloudbeds
    form = code_form(state.client_id, state.client_secret, state.redirect_uri, "no-such-code")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenRejected) as info:
            await send_token_request(session, f"{url}/api/v1.3/access_token", form, 5)
    assert (info.value.status, info.value.reason.split(":")[0]) == (401, "server_error")


async def test_send_5xx_timeout_and_unreachable_are_transient(fake_cloudbeds: Fake) -> None:
    state, url = fake_cloudbeds
    form = refresh_form(state.client_id, state.client_secret, state.refresh_token)
    token_url = f"{url}/api/v1.3/access_token"
    async with aiohttp.ClientSession() as session:
        state.token_failures = 1
        with pytest.raises(TokenEndpointUnavailable, match="HTTP 500"):
            await send_token_request(session, token_url, form, 5)
        state.token_delay = 0.5
        with pytest.raises(TokenEndpointUnavailable, match="timed out"):
            await send_token_request(session, token_url, form, 0.05)
        dead = f"http://127.0.0.1:{free_port()}/api/v1.3/access_token"
        with pytest.raises(TokenEndpointUnavailable, match="unreachable") as info:
            await send_token_request(session, dead, form, 5)
    assert state.client_secret not in str(info.value)
