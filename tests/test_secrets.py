"""No secret ever leaves the proxy: not in a log line, an error body, metrics or status.

The proxy runs in-process with its logs captured; the test drives the paths where a
token is most likely to slip out (refresh, 401 replay, a rejected refresh token, 502,
413, 503, a caller's own credentials), then greps everything it captured.
"""

from __future__ import annotations

import io
from typing import Any

import aiohttp

from proxy.clock import FakeClock
from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import free_port, settings_for

Fake = tuple[FakeCloudbeds, str]
CALLER_AUTHORIZATION = "Bearer caller-own-token-0123456789"
CALLER_API_KEY = "cbat_callerOwnKey0123456789"


class Transcript:
    """Everything a caller or an operator could see: bodies, headers, status pages."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def call(
        self, session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
    ) -> tuple[int, str]:
        async with session.request(method, url, **kwargs) as response:
            text = await response.text()
            self.parts.append(f"{response.status} {dict(response.headers)!r}\n{text}")
            return response.status, text


async def test_no_secret_in_logs_errors_metrics_or_status(
    captured_logs: io.StringIO, fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    state, fake_url = fake_cloudbeds
    clock = FakeClock()
    state.clock = clock  # before any token is minted: the fake and the proxy share time
    state.rotate_refresh_tokens = True
    issued: set[str] = set()
    refresh_tokens: set[str] = set(state.valid_refresh_tokens())

    def remember() -> None:
        issued.update(state.valid_access_tokens())
        refresh_tokens.update(state.valid_refresh_tokens())

    settings = settings_for(fake_url, CBPROXY_MAX_BODY_BYTES="1000", CBPROXY_WAIT_FOR_TOKEN="0.2")
    proxy = await start_proxy(settings, clock=clock)
    remember()
    state.add_refresh_token(state.refresh_token)  # rotation consumed it; the second proxy seeds too
    dead = f"http://127.0.0.1:{free_port()}"
    unreachable = await start_proxy(settings_for(fake_url, CBPROXY_UPSTREAM_URL=dead), clock=clock)
    remember()
    seen = Transcript()
    api = f"{proxy}/api/v1.3"
    async with aiohttp.ClientSession() as session:
        # A normal call, and one carrying the caller's own credentials.
        assert (await seen.call(session, "GET", f"{api}/getHotels"))[0] == 200
        own = {"Authorization": CALLER_AUTHORIZATION, "x-api-key": CALLER_API_KEY}
        assert (await seen.call(session, "GET", f"{api}/getHotels", headers=own))[0] == 200
        # Cloudbeds revokes the token: 401, refresh, replay.
        clock.advance(60)
        state.revoke_all()
        assert (await seen.call(session, "GET", f"{api}/getReservations"))[0] == 200
        remember()
        assert state.token_calls["refresh_token"] >= 3  # two proxies started, one replay
        # 413 and 502 answered by the proxy itself.
        status, _ = await seen.call(session, "POST", f"{api}/fake/echo", data=b"x" * 1001)
        assert status == 413
        status, _ = await seen.call(session, "GET", f"{unreachable}/api/v1.3/getHotels")
        assert status == 502
        # The refresh token is rejected: the caller gets Cloudbeds' 401, then a 503.
        clock.advance(60)
        state.revoke_all()
        state.reject_refresh = True
        status, _ = await seen.call(session, "GET", f"{api}/getHotels", headers=own)
        assert status == 401
        clock.advance(3600)
        status, body = await seen.call(session, "GET", f"{api}/getHotels")
        assert status == 503
        assert "reauthorization_required" in body
        # What an operator looks at.
        for url in (proxy, unreachable):
            for page in ("metrics", "tokens", "readyz"):
                await seen.call(session, "GET", f"{url}/_proxy/{page}")
    remember()
    issued.update(state._access_tokens)  # every token ever minted, revoked ones included

    log_lines = captured_logs.getvalue().splitlines()
    assert any('"event": "request"' in line for line in log_lines)
    assert any("token.refresh.rejected" in line for line in log_lines)
    secrets = {
        *issued,
        *refresh_tokens,
        state.client_secret,
        CALLER_AUTHORIZATION,
        CALLER_AUTHORIZATION.removeprefix("Bearer "),
        CALLER_API_KEY,
    }
    assert len(issued) >= 3  # two starts and the refresh after the revocation
    assert len(refresh_tokens) >= 3
    for where, texts in (("log", log_lines), ("response", seen.parts)):
        for text in texts:
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{where} leaks {leaked}: {text[:300]}"
