"""OAuth bootstrap against the fake: the callback flow, and the auth/token commands."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.config import load_settings
from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import fake_env, wait_ready

Fake = tuple[FakeCloudbeds, str]
API = "/api/v1.3/getHotels"


def unauthorised_env(fake_url: str, **extra: str) -> dict[str, str]:
    """The fake's client, but no refresh token: the credential starts unauthorised."""
    env = {k: v for k, v in fake_env(fake_url).items() if k != "CBPROXY_REFRESH_TOKEN"}
    return {**env, **extra}


async def follow_authorize(session: aiohttp.ClientSession, url: str) -> str:
    """Open the authorize link at the fake; return the redirect URI it sends the browser to."""
    async with session.get(url, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
        return response.headers["Location"]


async def callback(
    session: aiohttp.ClientSession, proxy: str, query: str, **headers: str
) -> tuple[int, str, dict[str, str]]:
    async with session.get(
        f"{proxy}/_proxy/oauth/callback?{query}", headers=headers, allow_redirects=False
    ) as response:
        return response.status, await response.text(), dict(response.headers)


async def start(session: aiohttp.ClientSession, proxy: str) -> str:
    """Open /_proxy/oauth/start; return the authorize link it redirects to."""
    async with session.get(f"{proxy}/_proxy/oauth/start", allow_redirects=False) as response:
        assert response.status == 302
        return response.headers["Location"]


async def test_callback_flow_end_to_end(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(load_settings(unauthorised_env(fake_url)), ready=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy + API) as response:
            assert response.status == 503
            assert (await response.json())["error"] == "no_usable_token"

        authorize = await start(session, proxy)
        assert authorize.startswith(f"{fake_url}/api/v1.3/oauth?")
        params = parse_qs(urlsplit(authorize).query)
        assert params["client_id"] == [state.client_id]
        assert params["redirect_uri"] == [state.redirect_uri]
        assert params["response_type"] == ["code"]
        issued = params["state"][0]
        assert len(issued) >= 32

        redirect = await follow_authorize(session, authorize)
        assert redirect.startswith(state.redirect_uri + "?")
        query = urlsplit(redirect).query
        assert parse_qs(query)["state"] == [issued]

        status, page, headers = await callback(session, proxy, query)
        assert status == 200, page
        assert "Authorised" in page
        assert "1001" in page
        assert headers["Content-Type"].startswith("text/html")
        assert state.token_calls["authorization_code"] == 1
        await wait_ready(proxy)
        async with session.get(proxy + API) as response:
            assert response.status == 200
            assert (await response.json())["success"] is True

        # The same callback again: its state was used, so it never reaches Cloudbeds.
        status, body, headers = await callback(session, proxy, query)
        assert status == 400
        assert json.loads(body)["error"] == headers["X-Cloudbeds-Proxy-Error"] == "invalid_state"
        # A forged state, or none, is refused the same way.
        fresh = state.issue_code()
        for forged in ("default.forged", ""):
            status, body, _ = await callback(session, proxy, f"code={fresh}&state={forged}")
            assert (status, json.loads(body)["error"]) == (400, "invalid_state")
        assert state.token_calls["authorization_code"] == 1

        # A fresh state with a code Cloudbeds already took: the page says to start over.
        new_state = parse_qs(urlsplit(await start(session, proxy)).query)["state"][0]
        used_code = parse_qs(query)["code"][0]
        status, page, headers = await callback(
            session, proxy, f"code={used_code}&state={new_state}", Accept="text/html,*/*"
        )
        assert status == 400
        assert headers["Content-Type"].startswith("text/html")
        assert headers["X-Cloudbeds-Proxy-Error"] == "authorization_failed"
        assert "only once" in page
        assert "/_proxy/oauth/start" in page
        assert state.token_calls["authorization_code"] == 2

        async with session.get(proxy + API) as response:
            assert response.status == 200, "the stored token survives the failed callbacks"


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`python -m proxy ARGS` as a subprocess, without blocking the loop the fake runs on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode()


def assert_no_secret(text: str, state: FakeCloudbeds) -> None:
    for secret in (
        *state._access_tokens,
        *state.valid_refresh_tokens(),
        state.refresh_token,
        state.client_secret,
    ):
        assert secret not in text


@pytest.mark.redis
@pytest.mark.slow
async def test_auth_exchange_and_token_commands_share_tokens_through_redis(
    fake_cloudbeds: Fake,
    start_proxy: Any,
    redis_url: str,
    key_prefix: str,
    real_redis: aioredis.Redis,
) -> None:
    state, fake_url = fake_cloudbeds
    env = unauthorised_env(
        fake_url,
        CBPROXY_REDIS_URL=redis_url,
        CBPROXY_REDIS_PREFIX=key_prefix,
        CBPROXY_POLL_INTERVAL="0.5",
        CBPROXY_LOG_FORMAT="json",
    )
    proxy = await start_proxy(load_settings(env), ready=False)

    code, link = await run_cli(env, "auth", "url")
    assert code == 0, link
    async with aiohttp.ClientSession() as session:
        redirect = await follow_authorize(session, link.strip())
    code, out = await run_cli(env, "auth", "exchange", redirect)
    assert code == 0, out
    assert "authorised default" in out
    assert_no_secret(out, state)
    await wait_ready(proxy)  # the running proxy picked the token up from Redis
    async with aiohttp.ClientSession() as session, session.get(proxy + API) as response:
        assert response.status == 200

    code, out = await run_cli(env, "token", "status")
    assert code == 0, out
    status = json.loads(out)["default"]
    assert status["state"] == "ok"
    assert status["expires_in"] > 3000
    assert_no_secret(out, state)
    generation = status["generation"]

    # A refresh needs no redirect URI (only authorising does).
    code, out = await run_cli({**env, "CBPROXY_REDIRECT_URI": ""}, "token", "refresh")
    assert code == 0, out
    assert state.token_calls["refresh_token"] == 1
    assert_no_secret(out, state)
    refreshed = json.loads(out[out.index("{\n") :])  # after the JSON log lines
    assert refreshed["generation"] == generation + 1

    async def adopted() -> bool:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy}/_proxy/tokens") as response:
                tokens = await response.json()
        return bool(tokens["default"]["generation"] == generation + 1)

    async with asyncio.timeout(5):
        while not await adopted():
            await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as session, session.get(proxy + API) as response:
        assert response.status == 200
    assert state.rejected_calls == 0

    # A reused code from the terminal is refused with the same stable code.
    code, out = await run_cli(env, "auth", "exchange", redirect)
    assert code == 1
    assert "authorization_failed" in out
