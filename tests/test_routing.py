"""Several credentials from `--config`: a request picks one by name, by property, or default."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import ProxyProcess, wait_ready

Fake = tuple[FakeCloudbeds, str]
pytestmark = pytest.mark.slow

CONFIG = """
[proxy]
rate_limit = 0

# First table: the default for requests that name no credential and no known property.
[credentials.b]
api_key = "{api_key}"
properties = ["2002"]

[credentials.a]
client_id = "{client_id}"
client_secret = "{client_secret}"
refresh_token = "{refresh_token}"
properties = ["1001"]
"""


@pytest.fixture
async def routed_proxy(fake_cloudbeds: Fake, tmp_path: Path) -> Any:
    state, fake_url = fake_cloudbeds
    state.properties = ("1001", "3003")  # 3003 is learned from the token's resources
    config = tmp_path / "proxy.toml"
    config.write_text(
        CONFIG.format(
            api_key=state.api_key,
            client_id=state.client_id,
            client_secret=state.client_secret,
            refresh_token=state.refresh_token,
        )
    )
    env = {
        "CBPROXY_UPSTREAM_URL": fake_url,
        "CBPROXY_TOKEN_URL": f"{fake_url}/api/v1.3/access_token",
        "CBPROXY_RATE_LIMIT": "0",
    }
    proc = ProxyProcess(env, tmp_path / "proxy.log", args=("--config", str(config)))
    await asyncio.to_thread(proc.start)
    await wait_ready(proc.url)
    yield proc
    await proc.astop()


async def credential_sent(url: str, headers: dict[str, str]) -> str:
    """Which credential reached the fake: `oauth` (a bearer token) or `api_key`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/api/v1.3/fake/echo", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        seen = {k.lower(): v for k, v in (await response.json())["headers"]}
    assert "x-cloudbeds-credential" not in seen, "the selector never goes upstream"
    if seen.get("authorization", "").startswith("Bearer fake-access-"):
        assert "x-api-key" not in seen
        return "oauth"
    assert seen["x-api-key"].startswith("cbat_")
    return "api_key"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Cloudbeds-Credential": "a"}, "oauth"),
        ({"X-Cloudbeds-Credential": "b"}, "api_key"),
        ({"X-Cloudbeds-Credential": "b", "X-PROPERTY-ID": "1001"}, "api_key"),
        ({"X-PROPERTY-ID": "1001"}, "oauth"),
        ({"X-PROPERTY-ID": "2002"}, "api_key"),
        ({"X-PROPERTY-ID": "3003"}, "oauth"),
        ({"X-PROPERTY-ID": "9999"}, "api_key"),
        ({}, "api_key"),
    ],
)
async def test_routes_by_name_then_property_then_default(
    routed_proxy: ProxyProcess, headers: dict[str, str], expected: str
) -> None:
    assert await credential_sent(routed_proxy.url, headers) == expected


async def test_unknown_credential_is_a_404(
    routed_proxy: ProxyProcess, fake_cloudbeds: Fake
) -> None:
    state, _ = fake_cloudbeds
    calls = state.api_calls
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{routed_proxy.url}/api/v1.3/getHotels", headers={"X-Cloudbeds-Credential": "zzz"}
        ) as response,
    ):
        body = await response.json()
        assert response.status == 404
        assert response.headers["X-Cloudbeds-Proxy-Error"] == "unknown_connection"
    assert body["error"] == "unknown_connection"
    assert "zzz" in body["message"]
    assert state.api_calls == calls, "nothing went upstream"

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{routed_proxy.url}/_proxy/tokens") as response,
    ):
        tokens = await response.json()
    assert tokens["a"]["kind"] == "oauth"
    assert tokens["a"]["properties"] == ["1001", "3003"]
    assert tokens["b"]["kind"] == "api_key"
