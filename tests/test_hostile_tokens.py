"""Token answers from a hostile or broken token endpoint: validated once, at the edge.

Unit tests of `decode_token_response`, then the refresh loop through the proxy's real
port against an endpoint that answers numbers too large for a float, a load balancer's
HTML 400, and Cloudbeds' own answer to a revoked refresh token.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import pytest

from proxy.cloudbeds import decode_token_response
from proxy.errors import TokenEndpointUnavailable, TokenRejected
from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import settings_for
from tests.test_hostile_wire import BOUND, RawUpstream, read_head

Fake = tuple[FakeCloudbeds, str]


def answer(**fields: Any) -> bytes:
    return json.dumps({"access_token": "a", "expires_in": 3600, **fields}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"access_token": "a", "expires_in": 1' + b"0" * 400 + b"}",  # OverflowError in float()
        b'{"access_token": "a", "expires_in": 1e400}',
        b'{"access_token": "a", "expires_in": "1e400"}',
        b'{"access_token": "a", "expires_in": 1e300}',
        answer(expires_in=366 * 24 * 3600 + 1),
        answer(expires_in=" "),
        answer(access_token="a\r\nX-Injected: 1"),
        answer(access_token="tök"),
        answer(access_token="a" * 5000),
        answer(refresh_token=["r"]),
        answer(refresh_token="r\n"),
        answer(token_type="mac"),
        answer(token_type=1),
        answer(resources="1001"),
        answer(resources=[{"type": "property", "id": None}]),
        answer(resources=[{"type": "property", "id": "x" * 65}]),
        answer(resources=[{"type": "property", "id": True}]),
        answer(resources=[{"type": "property", "id": "10\n01"}]),
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the stack: RecursionError in json
        b'{"access_token": "a", "expires_in": 3600, "x": ' + b"[" * 100_000 + b"}",
    ],
)
def test_a_malformed_success_is_transient_never_a_crash(raw: bytes) -> None:
    with pytest.raises(TokenEndpointUnavailable):
        decode_token_response(200, raw)


def test_valid_fields_pass_in_their_full_range() -> None:
    response = decode_token_response(
        200,
        answer(
            expires_in=366 * 24 * 3600,
            token_type="bearer",
            refresh_token="r" * 4096,
            resources=[
                {"type": "property", "id": 1001},
                {"type": "property", "id": "1002"},
                {"type": "association", "id": 77},
                "not a resource",
            ],
        ),
    )
    assert response.expires_in == 366 * 24 * 3600
    assert response.properties == ("1001", "1002")
    assert response.associations == ("77",)
    assert response.refresh_token == "r" * 4096


def test_a_group_without_a_usable_id_is_refused() -> None:
    """A group's id names its connection: one that cannot be an id is no usable answer."""
    bad = answer(resources=[{"type": "association", "id": {"any": "shape"}}])
    with pytest.raises(
        TokenEndpointUnavailable, match=r"resource \(association\) without a usable id"
    ):
        decode_token_response(200, bad)


def test_a_4xx_error_text_is_cut_to_printable_characters() -> None:
    raw = json.dumps({"error": "invalid_request\r\n", "message": "bad\x00 token\x1b[31m"})
    with pytest.raises(TokenRejected) as info:
        decode_token_response(400, raw.encode())
    assert info.value.reason == "invalid_request: bad token[31m"


async def logged(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    """The log lines so far, once one with `event` has appeared (bounded wait)."""
    async with asyncio.timeout(BOUND):
        while True:
            lines = [json.loads(line) for line in stream.getvalue().splitlines()]
            if any(line.get("event") == event for line in lines):
                return lines
            await asyncio.sleep(0.01)


def token_endpoint(status_line: bytes, content_type: bytes, body: bytes) -> RawUpstream:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status_line, content_type, len(body), body)
        )
        await writer.drain()

    return RawUpstream(behaviour)


async def test_an_expires_in_too_large_for_a_float_is_a_transient_failure(
    fake_cloudbeds: Fake, start_proxy: Any, captured_logs: io.StringIO
) -> None:
    _, fake_url = fake_cloudbeds
    huge = b'{"access_token": "a", "token_type": "Bearer", "expires_in": 1' + b"0" * 400 + b"}"
    async with token_endpoint(b"200 OK", b"application/json", huge) as endpoint:
        settings = settings_for(fake_url, CBPROXY_TOKEN_URL=f"{endpoint.url}/access_token")
        proxy = await start_proxy(settings, ready=False)
        lines = await logged(captured_logs, "token.refresh.failed")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy}/_proxy/tokens") as response:
                status = (await response.json())["default"]
            async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
                assert response.status == 503
    assert not [line for line in lines if line["event"] == "token.refresh.crashed"]
    assert status["state"] == "ok"
    assert "expires_in" in status["last_error"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [(b"text/html", b"<html><body>400 Bad Request</body></html>"), (b"text/plain", b"")],
    ids=["html-page", "empty"],
)
async def test_a_4xx_without_an_oauth_error_alerts_but_does_not_lock_the_credential(
    fake_cloudbeds: Fake,
    start_proxy: Any,
    captured_logs: io.StringIO,
    content_type: bytes,
    body: bytes,
) -> None:
    _, fake_url = fake_cloudbeds
    async with token_endpoint(b"400 Bad Request", content_type, body) as endpoint:
        settings = settings_for(fake_url, CBPROXY_TOKEN_URL=f"{endpoint.url}/access_token")
        proxy = await start_proxy(settings, ready=False)
        lines = await logged(captured_logs, "token.refresh.unrecognised_answer")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy}/_proxy/tokens") as response:
                status = (await response.json())["default"]
            async with session.get(f"{proxy}/_proxy/metrics") as response:
                metrics = await response.text()
    (alert,) = [line for line in lines if line["event"] == "token.refresh.unrecognised_answer"]
    assert alert["level"] == "error"
    assert alert["status"] == 400
    assert alert["retry_in"] >= 15  # the long backoff: 30 s, jittered down to no less than half
    assert not [line for line in lines if line["event"] == "token.refresh.rejected"]
    assert status["state"] == "ok"
    assert 'outcome="unrecognised_4xx"' in metrics


async def test_cloudbeds_answer_to_a_revoked_refresh_token_is_permanent(
    fake_cloudbeds: Fake, start_proxy: Any, captured_logs: io.StringIO
) -> None:
    _, fake_url = fake_cloudbeds
    revoked = b'{"error":"invalid_request","message":"The refresh token is invalid."}'
    async with token_endpoint(b"400 Bad Request", b"application/json", revoked) as endpoint:
        settings = settings_for(fake_url, CBPROXY_TOKEN_URL=f"{endpoint.url}/access_token")
        proxy = await start_proxy(settings, ready=False)
        await logged(captured_logs, "token.refresh.rejected")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy}/_proxy/tokens") as response:
                status = (await response.json())["default"]
    assert status["state"] == "reauthorization_required"
    assert status["last_error"] == "invalid_request: The refresh token is invalid."
