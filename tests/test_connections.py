"""Apps and connections through the proxy's port: installs, routing, admin API, callers.

One proxy in this process on a real port with the default store (the SQLite file), the
fake Cloudbeds on another. Fleet behaviour (several replicas, Redis) is in
`test_partner_fleet.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from proxy.config import load_settings
from proxy.errors import StoreUnavailable
from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.redis_store import RedisStore
from tests.support import fake_env, free_port

Fake = tuple[FakeCloudbeds, str]
ADMIN = "admin-token-4e1f"
PARTNER = ("partner-client", "partner-secret-9c2", "https://partner.example/callback")
KEYS = ("keys-client", "keys-secret-77a", "https://keys.example/callback")
API = "/api/v1.3/getHotels"


def config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[apps.partner]
client_id = "{PARTNER[0]}"
client_secret = "{PARTNER[1]}"
redirect_uri = "{PARTNER[2]}"
rate_limit = 0

[apps.keys]
client_id = "{KEYS[0]}"
client_secret = "{KEYS[1]}"
redirect_uri = "{KEYS[2]}"
delivery = "api_key"
rate_limit = 0
{extra}
"""
    )
    return str(path)


@pytest.fixture
async def partner(
    fake_cloudbeds: Fake, start_proxy: Any, tmp_path: Path
) -> Callable[..., Awaitable[str]]:
    """Start a proxy with the two apps (and the fake's default credential); its base URL."""
    state, fake_url = fake_cloudbeds
    state.add_app(*PARTNER)
    state.add_app(*KEYS)

    async def start(extra: str = "", **env: str) -> str:
        settings = load_settings(
            {
                **fake_env(fake_url),
                "CBPROXY_ADMIN_TOKEN": ADMIN,
                "CBPROXY_STATE_FILE": str(tmp_path / "state.db"),
                **env,
            },
            config(tmp_path, extra),
        )
        return str(await start_proxy(settings))

    return start


async def call(
    method: str, url: str, *, json: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, url, json=json, headers=headers or {}, allow_redirects=False
        ) as response:
            text = await response.text()
            try:
                body: Any = await response.json(content_type=None)
            except ValueError:
                body = text
            return response.status, body, dict(response.headers)


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def install(proxy: str, redirect_url: str, app: str = "partner") -> dict[str, Any]:
    query = urlsplit(redirect_url).query
    status, body, _ = await call(
        "GET",
        f"{proxy}/_proxy/apps/{app}/callback?{query}",
        headers={"Accept": "application/json"},
    )
    assert status == 200, body
    connection: dict[str, Any] = body["connection"]
    return connection


async def test_marketplace_install_creates_a_connection_routed_by_property(
    fake_cloudbeds: Fake, partner: Any
) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    connection = await install(proxy, state.marketplace_install(PARTNER[0], properties=["3001"]))
    assert connection["id"] == "partner.property.3001"
    assert connection["kind"] == "oauth"
    assert connection["state"] == "ok"
    assert connection["properties"] == ["3001"]
    assert state.token_calls_by_client[PARTNER[0]]["authorization_code"] == 1
    for how in ({"headers": {"X-PROPERTY-ID": "3001"}}, {"query": "?propertyID=3001"}):
        status, body, _ = await call(
            "GET", proxy + API + str(how.get("query", "")), headers=how.get("headers")
        )
        assert status == 200, body
        assert body["data"][0]["propertyID"] == "3001"
        assert state.api_log[-1]["client_id"] == PARTNER[0]
        assert state.api_log[-1]["properties"] == ["3001"]
    status, metrics, _ = await call("GET", f"{proxy}/_proxy/metrics")
    assert 'cbproxy_connections{app="partner",state="ok"} 1.0' in metrics
    assert "partner.property.3001" not in metrics  # no series per connection
    status, body, _ = await call("GET", f"{proxy}/_proxy/readyz")
    assert body["connections"] == {"partner": {"ok": 1}}
    # The fake's default credential still serves requests that name no property.
    status, body, _ = await call("GET", proxy + API)
    assert status == 200
    assert state.api_log[-1]["client_id"] == state.client_id


async def test_install_link_state_is_single_use_and_bound_to_the_proxy(
    fake_cloudbeds: Fake, partner: Any
) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    status, _, headers = await call("GET", f"{proxy}/_proxy/apps/partner/install")
    assert status == 302
    authorize = headers["Location"]
    params = parse_qs(urlsplit(authorize).query)
    assert params["client_id"] == [PARTNER[0]]
    assert params["redirect_uri"] == [PARTNER[2]]
    issued = params["state"][0]
    state.queue_install(PARTNER[0], properties=["3101"])
    status, _, headers = await call("GET", authorize)
    assert status == 302
    connection = await install(proxy, headers["Location"])
    assert connection["id"] == "partner.property.3101"
    calls = sum(state.token_calls_by_client[PARTNER[0]].values())

    # The same state again, with a fresh code: refused before any token call.
    code = state.issue_code(client_id=PARTNER[0], properties=["3102"])
    for forged in (issued, "made-up-state"):
        status, body, _ = await call(
            "GET", f"{proxy}/_proxy/apps/partner/callback?code={code}&state={forged}"
        )
        assert status == 400
        assert body["error"] == "invalid_state"
    assert sum(state.token_calls_by_client[PARTNER[0]].values()) == calls
    # A state issued for one app does not complete another's install.
    _, _, headers = await call("GET", f"{proxy}/_proxy/apps/keys/install")
    other = parse_qs(urlsplit(headers["Location"]).query)["state"][0]
    status, body, _ = await call(
        "GET", f"{proxy}/_proxy/apps/partner/callback?code={code}&state={other}"
    )
    assert (status, body["error"]) == (400, "invalid_state")


async def test_an_apps_fixed_marketplace_state_is_a_marketplace_install(
    fake_cloudbeds: Fake, partner: Any
) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner(extra='marketplace_state = "fixed-state-in-app-settings"')  # [apps.keys]
    fixed = "state=fixed-state-in-app-settings"
    code = state.issue_code(client_id=KEYS[0], properties=["3201"])
    status, body, _ = await call(
        "GET",
        f"{proxy}/_proxy/apps/keys/callback?code={code}&{fixed}",
        headers={"Accept": "application/json"},
    )
    assert status == 200, body
    assert body["connection"]["id"] == "keys.property.3201"
    code = state.issue_code(client_id=PARTNER[0], properties=["3202"])
    status, body, _ = await call("GET", f"{proxy}/_proxy/apps/partner/callback?code={code}&{fixed}")
    assert (status, body["error"]) == (400, "invalid_state")  # partner has no such state
    # Any bytes in a state are an answer, never a crash (the fixed one is compared safely).
    status, body, _ = await call("GET", f"{proxy}/_proxy/apps/keys/callback?code=x&state=%C3%A9")
    assert (status, body["error"]) == (400, "invalid_state")


async def test_refused_code_gets_a_clear_page_and_no_connection(
    fake_cloudbeds: Fake, partner: Any
) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    redirect = state.marketplace_install(PARTNER[0], properties=["3301"])
    await install(proxy, redirect)
    query = urlsplit(redirect).query
    status, page, headers = await call(
        "GET", f"{proxy}/_proxy/apps/partner/callback?{query}", headers={"Accept": "text/html"}
    )
    assert status == 400
    assert headers["X-Cloudbeds-Proxy-Error"] == "authorization_failed"
    assert "10 minutes and only once" in page
    assert headers["Content-Type"].startswith("text/html")
    status, body, _ = await call(
        "GET", f"{proxy}/_proxy/admin/connections?app=partner", headers=admin()
    )
    assert [c["id"] for c in body["connections"]] == ["partner.property.3301"]


async def test_api_key_delivery_and_group_install(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    keyed = await install(
        proxy, state.marketplace_install(KEYS[0], properties=["4001"]), app="keys"
    )
    assert keyed["kind"] == "api_key"
    assert keyed["expires_at"] is None
    assert keyed["properties"] == ["4001"]  # from getHotels: an API-key answer lists none
    status, _, _ = await call("GET", proxy + API, headers={"X-PROPERTY-ID": "4001"})
    assert status == 200
    assert state.api_log[-1]["kind"] == "api_key"
    assert state.token_calls_by_client[KEYS[0]].get("refresh_token", 0) == 0

    group = await install(
        proxy, state.marketplace_install(PARTNER[0], properties=["5001", "5002"], association="A9")
    )
    assert group["id"] == "partner.association.A9"
    assert sorted(group["properties"]) == ["5001", "5002"]
    for prop in ("5001", "5002"):
        status, _, _ = await call("GET", f"{proxy}{API}?propertyIDs={prop},9999")
        assert status == 200
        assert state.api_log[-1]["association"] == "A9"


async def test_reinstall_keeps_id_metadata_and_created_at(
    fake_cloudbeds: Fake, partner: Any
) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    first = await install(proxy, state.marketplace_install(PARTNER[0], properties=["3401"]))
    url = f"{proxy}/_proxy/admin/connections/{first['id']}"
    status, body, _ = await call(
        "PATCH", url, json={"metadata": {"crm": "h-1", "tier": "gold"}}, headers=admin()
    )
    assert status == 200
    assert body["connection"]["metadata"] == {"crm": "h-1", "tier": "gold"}
    status, body, _ = await call("PATCH", url, json={"metadata": {"tier": None}}, headers=admin())
    assert body["connection"]["metadata"] == {"crm": "h-1"}
    again = await install(proxy, state.marketplace_install(PARTNER[0], properties=["3401"]))
    assert again["id"] == first["id"]
    assert again["created_at"] == first["created_at"]
    assert again["metadata"] == {"crm": "h-1"}
    assert again["generation"] > body["connection"]["generation"]
    await call("GET", proxy + API, headers={"X-PROPERTY-ID": "3401"})
    assert state.api_log[-1]["status"] == 200


async def test_delete_tells_cloudbeds_and_leaves_a_disconnected_record(
    fake_cloudbeds: Fake, partner: Any
) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    connection = await install(
        proxy, state.marketplace_install(PARTNER[0], properties=["3501", "3502"], association="G")
    )
    url = f"{proxy}/_proxy/admin/connections/{connection['id']}"
    status, _, _ = await call("DELETE", url, headers=admin())
    assert status == 204
    # Disabling the app for the group's first property ends the group's credential at the
    # fake, so the call for the second is refused there: the proxy goes on regardless.
    assert state.app_state_calls[0]["property_id"] == "3501"
    assert {c["app_state"] for c in state.app_state_calls} == {"disabled"}
    assert all(
        getattr(state.grant_of(t), "client_id", None) != PARTNER[0]
        for t in state.valid_access_tokens()
    )
    status, body, headers = await call("GET", proxy + API, headers={"X-PROPERTY-ID": "3501"})
    assert status == 410
    assert body["error"] == headers["X-Cloudbeds-Proxy-Error"] == "connection_disconnected"
    status, body, _ = await call("GET", url, headers=admin())
    assert body["connection"]["state"] == "disconnected"
    assert body["connection"]["expires_at"] is None
    # A new install of the same group recovers the connection.
    again = await install(
        proxy, state.marketplace_install(PARTNER[0], properties=["3501", "3502"], association="G")
    )
    assert again["state"] == "ok"
    status, _, _ = await call("GET", proxy + API, headers={"X-PROPERTY-ID": "3502"})
    assert status == 200


async def test_routing_errors(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    await install(proxy, state.marketplace_install(PARTNER[0], properties=["3601"]))
    await install(proxy, state.marketplace_install(KEYS[0], properties=["3601"]), app="keys")
    cases = [
        ({"X-PROPERTY-ID": "7777"}, 404, "unknown_property"),
        ({"X-Cloudbeds-Connection": "nope"}, 404, "unknown_connection"),
        ({"X-Cloudbeds-Credential": "nope"}, 404, "unknown_connection"),
        ({"X-PROPERTY-ID": "3601"}, 409, "ambiguous_property"),
    ]
    for headers, status, code in cases:
        got, body, answer = await call("GET", proxy + API, headers=headers)
        assert (got, body["error"], answer["X-Cloudbeds-Proxy-Error"]) == (status, code, code)
        assert body["message"]
    got, _, _ = await call(
        "GET", proxy + API, headers={"X-PROPERTY-ID": "3601", "X-Cloudbeds-App": "keys"}
    )
    assert got == 200
    assert state.api_log[-1]["client_id"] == KEYS[0]
    got, _, _ = await call(
        "GET", proxy + API, headers={"X-Cloudbeds-Connection": "partner.property.3601"}
    )
    assert got == 200
    assert state.api_log[-1]["client_id"] == PARTNER[0]


async def test_routing_headers_do_not_go_upstream(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    await install(proxy, state.marketplace_install(PARTNER[0], properties=["3701"]))
    status, body, _ = await call(
        "GET",
        proxy + "/api/v1.3/fake/echo",
        headers={"X-Cloudbeds-Connection": "partner.property.3701", "X-Cloudbeds-App": "partner"},
    )
    assert status == 200
    names = {name.lower() for name, _ in body["headers"]}
    assert not names & {"x-cloudbeds-connection", "x-cloudbeds-app", "x-cloudbeds-credential"}


async def test_admin_api_auth_and_bad_input(fake_cloudbeds: Fake, partner: Any) -> None:
    proxy = await partner()
    base = f"{proxy}/_proxy/admin/connections"
    status, body, _ = await call("GET", base)
    assert (status, body["error"]) == (401, "admin_unauthorized")
    status, body, _ = await call("GET", base, headers=admin("wrong"))
    assert (status, body["error"]) == (401, "admin_unauthorized")
    bad = [
        ("PUT", f"{base}/ok-id", {"app": "ghost", "refresh_token": "r"}, "unknown_app"),
        ("PUT", f"{base}/ok-id", {"app": "partner"}, "invalid_connection"),
        (
            "PUT",
            f"{base}/ok-id",
            {"app": "partner", "refresh_token": "r", "api_key": "cbat_x"},
            "invalid_connection",
        ),
        ("PUT", f"{base}/bad%20id", {"app": "partner", "refresh_token": "r"}, "invalid_connection"),
        (
            "PUT",
            f"{base}/{'x' * 129}",
            {"app": "partner", "refresh_token": "r"},
            "invalid_connection",
        ),
        ("PUT", f"{base}/ok-id", {"app": "keys", "api_key": "not-a-key"}, "invalid_connection"),
        ("PATCH", f"{base}/ok-id", {"metadata": "x"}, "invalid_connection"),
        ("GET", f"{base}?limit=501", None, "invalid_connection"),
        ("GET", f"{base}?state=happy", None, "invalid_connection"),
    ]
    for method, url, json, code in bad:
        status, body, _ = await call(method, url, json=json, headers=admin())
        assert (status, body["error"]) == (400, code), (method, url, body)
        assert "request_id" in body
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{base}/ok-id", data=b"{not json", headers=admin()) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "invalid_connection"
    status, body, _ = await call("GET", f"{base}/nobody", headers=admin())
    assert (status, body["error"]) == (404, "unknown_connection")


async def test_admin_api_disabled_without_a_token(fake_cloudbeds: Fake, partner: Any) -> None:
    proxy = await partner(CBPROXY_ADMIN_TOKEN="")
    status, body, _ = await call("GET", f"{proxy}/_proxy/admin/connections", headers=admin())
    assert (status, body["error"]) == (403, "admin_disabled")


async def test_admin_import_list_pages_and_refresh(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    base = f"{proxy}/_proxy/admin/connections"
    for n in range(5):
        token = f"imported-refresh-{n}"
        state.add_refresh_token(token, state.grant(PARTNER[0], properties=[f"60{n}"]))
        status, body, _ = await call(
            "PUT",
            f"{base}/partner.property.60{n}",
            json={"app": "partner", "refresh_token": token, "metadata": {"n": n}},
            headers=admin(),
        )
        assert status == 201, body
        assert "refresh_token" not in body["connection"]
    status, body, _ = await call(
        "PUT",
        f"{base}/partner.property.600",
        json={"app": "partner", "refresh_token": "imported-refresh-0"},
        headers=admin(),
    )
    assert status == 200
    assert body["connection"]["metadata"] == {"n": 0}  # replaced, metadata kept
    seen, cursor = [], ""
    while True:
        status, body, _ = await call(
            "GET", f"{base}?app=partner&limit=2&cursor={cursor}", headers=admin()
        )
        assert status == 200
        seen += [c["id"] for c in body["connections"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"partner.property.60{n}" for n in range(5)]
    status, body, _ = await call("GET", f"{base}?property=603", headers=admin())
    assert [c["id"] for c in body["connections"]] == ["partner.property.603"]

    # An imported refresh token becomes a token with the first refresh; requests use it.
    async def served() -> bool:
        got, _, _ = await call("GET", proxy + API, headers={"X-PROPERTY-ID": "602"})
        return got == 200

    await eventually(served)
    before = state.token_calls_by_client[PARTNER[0]]["refresh_token"]
    status, body, _ = await call("POST", f"{base}/partner.property.602/refresh", headers=admin())
    assert status == 200
    assert state.token_calls_by_client[PARTNER[0]]["refresh_token"] == before + 1
    assert body["connection"]["expires_at"] is not None


async def test_migrate_to_api_key(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    proxy = await partner()
    connection = await install(proxy, state.marketplace_install(PARTNER[0], properties=["3801"]))
    url = f"{proxy}/_proxy/admin/connections/{connection['id']}/migrate-to-api-key"
    status, body, _ = await call("POST", url, headers=admin())
    assert status == 200, body
    assert body["connection"]["kind"] == "api_key"
    assert body["connection"]["expires_at"] is None
    assert state.token_calls_by_client[PARTNER[0]]["refresh_token_exchange"] == 1
    status, _, _ = await call("GET", proxy + API, headers={"X-PROPERTY-ID": "3801"})
    assert status == 200
    assert state.api_log[-1]["kind"] == "api_key"
    status, body, _ = await call("POST", url, headers=admin())
    assert (status, body["error"]) == (400, "invalid_connection")  # once is all there is
    status, body, _ = await call(
        "POST", f"{proxy}/_proxy/admin/connections/{connection['id']}/refresh", headers=admin()
    )
    assert (status, body["error"]) == (400, "invalid_connection")
    assert state.token_calls_by_client[PARTNER[0]].get("refresh_token", 0) == 0


async def test_callers_are_checked_and_never_forwarded(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    extra = """
[callers.crm]
token = "caller-token-crm-1"
apps = ["partner"]

[callers.ops]
token = "caller-token-ops-2"
connections = ["default"]
"""
    proxy = await partner(extra=extra)
    await install(proxy, state.marketplace_install(PARTNER[0], properties=["3901"]))
    echo, prop = proxy + "/api/v1.3/fake/echo", {"X-PROPERTY-ID": "3901"}
    status, body, _ = await call("GET", echo, headers=prop)
    assert (status, body["error"]) == (401, "caller_unauthorized")
    status, body, _ = await call("GET", echo, headers={**prop, "Authorization": "Bearer nope"})
    assert (status, body["error"]) == (401, "caller_unauthorized")
    status, body, _ = await call(
        "GET", echo, headers={**prop, "Authorization": "Bearer caller-token-crm-1"}
    )
    assert status == 200
    sent = {k.lower(): v for k, v in body["headers"]}
    assert "caller-token" not in str(body["headers"])
    assert sent["authorization"].startswith("Bearer fake-access-")
    status, body, _ = await call("GET", echo, headers={**prop, "x-api-key": "caller-token-ops-2"})
    assert (status, body["error"]) == (403, "connection_forbidden")
    status, body, _ = await call("GET", echo, headers={"x-api-key": "caller-token-ops-2"})
    assert status == 200
    assert "caller-token" not in str(body["headers"])
    # Health needs no caller token.
    status, _, _ = await call("GET", f"{proxy}/_proxy/healthz")
    assert status == 200


async def test_public_listener_serves_only_installs(fake_cloudbeds: Fake, partner: Any) -> None:
    state, _ = fake_cloudbeds
    port = free_port()
    proxy = await partner(CBPROXY_PUBLIC_PORT=str(port))
    public = f"http://127.0.0.1:{port}"
    connection = await install(public, state.marketplace_install(PARTNER[0], properties=["3991"]))
    assert connection["id"] == "partner.property.3991"
    for path in (API, "/_proxy/healthz", "/_proxy/admin/connections", "//evil.example/x"):
        status, body, _ = await call("GET", public + path, headers=admin())
        assert (status, body["error"]) == (404, "not_found"), path
    status, _, _ = await call("GET", f"{public}/_proxy/apps/partner/install")
    assert status == 302
    status, body, _ = await call("GET", f"{proxy}/_proxy/apps/partner/install")
    assert (status, body["error"]) == (404, "not_found")
    status, _, _ = await call("GET", proxy + API, headers={"X-PROPERTY-ID": "3991"})
    assert status == 200


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_an_install_while_the_store_is_down_is_kept_and_written_back(
    fake_cloudbeds: Fake, partner: Any, private_redis: Any
) -> None:
    """The code is single use: its grant exists nowhere else, so it is never dropped."""
    state, _ = fake_cloudbeds
    proxy = await partner(CBPROXY_REDIS_URL=private_redis.url, CBPROXY_POLL_INTERVAL="0.2")
    private_redis.stop()
    for kind, app, client in (("oauth", "partner", PARTNER[0]), ("api_key", "keys", KEYS[0])):
        prop = "6101" if kind == "oauth" else "6102"
        connection = await install(
            proxy, state.marketplace_install(client, properties=[prop]), app=app
        )
        assert connection["kind"] == kind
        status, _, _ = await call("GET", proxy + API, headers={"X-PROPERTY-ID": prop})
        assert status == 200
    private_redis.start()
    store = RedisStore.from_url(private_redis.url, prefix="cbproxy")

    async def written() -> bool:
        try:
            return all(
                [await store.load("partner.property.6101"), await store.load("keys.property.6102")]
            )
        except StoreUnavailable:
            return False

    await eventually(written)
    stored = await store.load("keys.property.6102")
    assert stored is not None and stored.access_token in state.valid_api_keys()
    await store.close()
