"""Partner installs end to end: apps and connections through real `serve` processes.

The fake Cloudbeds runs in this process on a real port, so its counters (`api_log`,
`token_calls_by_client`, `max_in_window`, `app_state_calls`) are read directly; the
proxies are real processes reached only through their HTTP ports. Installs arrive the
way Cloudbeds sends them: the fake's Marketplace redirect URL, replayed against the
proxy's callback with no state. Figures worth recording (how long an install takes to
reach another replica, what it costs, the highest count in any sliding second) are
printed: run with `-s`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import cloudbeds_pms_v1_3 as sdk
import pytest

from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.sqlite_store import SqliteStore
from tests.support import ProxyProcess, wait_ready

pytestmark = [pytest.mark.redis, pytest.mark.slow]

Fake = tuple[FakeCloudbeds, str]
Fleet = Callable[..., Awaitable[list[ProxyProcess]]]

ADMIN_TOKEN = "admin-token-for-partner-fleet-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"Accept": "application/json"}
PROXY_ERROR = "X-Cloudbeds-Proxy-Error"
HOTELS = "/api/v1.3/getHotels"
ALPHA = ("alpha", "partner-alpha", "alpha-secret", "https://partner.example/alpha/callback")
BETA = ("beta", "partner-beta", "beta-secret", "https://partner.example/beta/callback")
# "It happens" bounds, not performance targets: the contract says an install reaches
# every replica within a second; a loaded CI machine gets room.
PROPAGATION_BOUND = 5.0
EVENTUALLY = 10.0


def app_table(app: tuple[str, str, str, str], **extra: Any) -> str:
    name, client_id, secret, redirect = app
    lines = [
        f"[apps.{name}]",
        f'client_id = "{client_id}"',
        f'client_secret = "{secret}"',
        f'redirect_uri = "{redirect}"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def register(state: FakeCloudbeds, *apps: tuple[str, str, str, str]) -> None:
    for _, client_id, secret, redirect in apps:
        state.add_app(client_id, secret, redirect)


def partner_env(fake_url: str, config: Path, **extra: str) -> dict[str, str]:
    """A replica with apps only (no default credential), pointed at the fake."""
    return {
        "CBPROXY_UPSTREAM_URL": fake_url,
        "CBPROXY_TOKEN_URL": f"{fake_url}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{fake_url}/api/v1.3/oauth",
        "CBPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "CBPROXY_POLL_INTERVAL": "0.5",
        "CBPROXY_TOKEN_TIMEOUT": "2",
        "CBPROXY_LOCK_TTL": "3",
        "CBPROXY_WAIT_FOR_TOKEN": "5",
        "CBPROXY_SHUTDOWN_GRACE": "2",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def redis_env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"CBPROXY_REDIS_URL": redis_url, "CBPROXY_REDIS_PREFIX": prefix}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Start `serve --config` processes (in threads: the fake answers on this loop)."""
    started: list[ProxyProcess] = []

    async def start(env: dict[str, str], config: Path, count: int = 1) -> list[ProxyProcess]:
        procs = [
            ProxyProcess(
                env, tmp_path / f"proxy-{len(started) + i}.log", args=("--config", str(config))
            )
            for i in range(count)
        ]
        started.extend(procs)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        for proc in procs:
            await wait_ready(proc.url)
        return procs

    yield start
    await asyncio.gather(*(p.astop() for p in started))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


def write_config(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / f"proxy-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(tables))
    return path


async def install(
    session: aiohttp.ClientSession, proxy: str, app: str, redirect_url: str
) -> dict[str, Any]:
    """Replay Cloudbeds' Marketplace redirect (a code, no state) against the proxy."""
    query = urlsplit(redirect_url).query
    assert "state=" not in query
    url = f"{proxy}/_proxy/apps/{app}/callback?{query}"
    async with session.get(url, headers=JSON) as response:
        body = await response.json()
        assert response.status == 200, body
    connection: dict[str, Any] = body["connection"]
    return connection


async def hotels(
    session: aiohttp.ClientSession, proxy: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str | None]:
    """GET getHotels through `proxy`: (status, JSON body, the proxy-error header)."""
    async with session.get(proxy + HOTELS, headers=headers or {}) as response:
        body = await response.json(content_type=None)
        return response.status, body, response.headers.get(PROXY_ERROR)


async def served_entry(
    state: FakeCloudbeds, session: aiohttp.ClientSession, proxy: str, headers: dict[str, str]
) -> dict[str, Any] | None:
    """One sequential call; the `api_log` entry it produced if Cloudbeds answered success."""
    before = len(state.api_log)
    status, body, error = await hotels(session, proxy, headers)
    if status != 200 or error is not None or body.get("success") is not True:
        return None
    entries = [e for e in state.api_log[before:] if e["path"] == HOTELS]
    assert len(entries) == 1, entries
    return entries[0]


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = EVENTUALLY, what: str = ""
) -> tuple[Any, float]:
    """Poll `check` until it returns something truthy; (its result, seconds it took)."""
    start = time.monotonic()
    while True:
        result = await check()
        if result:
            return result, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def admin(
    session: aiohttp.ClientSession, method: str, proxy: str, name: str, body: Any = None
) -> tuple[int, Any]:
    url = f"{proxy}/_proxy/admin/connections/{name}"
    async with session.request(method, url, headers=ADMIN, json=body) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


def assert_no_secrets(state: FakeCloudbeds, procs: list[ProxyProcess]) -> None:
    """No credential the fake issued (nor the admin token, nor a client secret) is logged."""
    issued = [*state._access_tokens, *state._refresh_tokens, *state._api_keys, *state._codes]
    for proc in procs:
        text = proc.log_text()
        for secret in [*issued, ADMIN_TOKEN, ALPHA[2], BETA[2]]:
            assert secret not in text, f"a secret leaked into {proc.log_path.name}"
        # Used codes and rotated tokens are no longer in the fake's books: their shapes.
        for shape in ("fake-code-", "fake-access-", "fake-refresh-"):
            assert shape not in text, f"a {shape}... credential leaked into {proc.log_path.name}"


def token_calls(state: FakeCloudbeds, client_id: str) -> int:
    return sum(state.token_calls_by_client[client_id].values())


# --- 1. an install on one replica is usable on another ----------------------------------


async def test_install_on_one_replica_is_served_by_another(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    a, b = await fleet(env, config, count=2)
    client = ALPHA[1]

    status, body, error = await hotels(session, b.url, {"X-PROPERTY-ID": "2001"})
    assert (status, error) == (404, "unknown_property"), body

    calls_before = state.api_calls_by_client[client]
    connection = await install(session, a.url, "alpha", state.marketplace_install(client))
    installed_at = time.monotonic()
    install_tokens, install_api = token_calls(state, client), state.api_calls_by_client[client]
    prop = connection["properties"][0]
    assert connection["id"] == f"alpha.property.{prop}"
    assert (connection["app"], connection["kind"], connection["state"]) == ("alpha", "oauth", "ok")

    async def served_on_b() -> dict[str, Any] | None:
        return await served_entry(state, session, b.url, {"X-PROPERTY-ID": prop})

    entry, _ = await eventually(served_on_b, PROPAGATION_BOUND, "replica B serves the install")
    took = time.monotonic() - installed_at
    assert entry["client_id"] == client
    assert entry["connection"] == f"{client}/property:{prop}"
    assert entry["asked"] == [prop]
    print(
        f"\ninstall on A -> served by B: {took * 1000:.0f} ms; install cost: "
        f"{install_tokens} token call(s) {dict(state.token_calls_by_client[client])}, "
        f"{install_api - calls_before} API call(s)"
    )
    assert install_tokens == 1
    assert install_api == calls_before  # the answer named the property: no getHotels

    # A group install: one connection for the association, every property routed to it.
    group = ["3001", "3002", "3003"]
    before_tokens, before_api = token_calls(state, client), state.api_calls_by_client[client]
    redirect = state.marketplace_install(client, properties=group, association="77")
    connection = await install(session, a.url, "alpha", redirect)
    group_tokens = token_calls(state, client) - before_tokens
    group_api = state.api_calls_by_client[client] - before_api
    assert connection["id"] == "alpha.association.77"
    assert sorted(connection["properties"]) == group
    installed_at = time.monotonic()
    for pid in group:
        for proxy in (a, b):

            async def served(pid: str = pid, proxy: ProxyProcess = proxy) -> Any:
                return await served_entry(state, session, proxy.url, {"X-PROPERTY-ID": pid})

            entry, _ = await eventually(served, PROPAGATION_BOUND, f"{pid} on {proxy.url}")
            assert entry["connection"] == f"{client}/association:77"
            assert entry["asked"] == [pid]
    print(
        f"group install: {group_tokens} token call(s), {group_api} API call(s) (getHotels); "
        f"all {len(group)} properties served on both replicas "
        f"{(time.monotonic() - installed_at) * 1000:.0f} ms after the callback"
    )
    assert (group_tokens, group_api) == (1, 1)
    assert_no_secrets(state, [a, b])


async def test_install_started_on_one_replica_completes_on_another(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    a, b = await fleet(env, config, count=2)
    client = ALPHA[1]
    state.queue_install(client, ["2501"])

    async with session.get(f"{a.url}/_proxy/apps/alpha/install", allow_redirects=False) as r:
        assert r.status == 302
        authorize = r.headers["Location"]
    async with session.get(authorize, allow_redirects=False) as r:  # Cloudbeds approves
        assert r.status == 302
        query = urlsplit(r.headers["Location"]).query
    assert "state=" in query
    callback = f"{b.url}/_proxy/apps/alpha/callback?{query}"
    async with session.get(callback, headers=JSON) as r:
        body = await r.json()
        assert r.status == 200, body
    assert body["connection"]["id"] == "alpha.property.2501"
    tokens = token_calls(state, client)
    async with session.get(callback, headers=JSON) as r:  # the state is single use
        again = await r.json()
        assert (r.status, again["error"]) == (400, "invalid_state"), again
    assert token_calls(state, client) == tokens  # refused before any token call

    async def served_on_a() -> Any:
        return await served_entry(state, session, a.url, {"X-PROPERTY-ID": "2501"})

    entry, _ = await eventually(served_on_a, PROPAGATION_BOUND, "served on A")
    assert entry["connection"] == f"{client}/property:2501"
    assert_no_secrets(state, [a, b])


# --- 2. both deliveries -------------------------------------------------------------------


async def test_api_key_delivery_stores_the_key_and_never_refreshes(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    state.expires_in = 4  # an OAuth token this short would refresh within the test
    register(state, ALPHA)
    config = write_config(
        tmp_path, app_table(ALPHA, delivery="api_key", rate_limit=50, rate_burst=50)
    )
    env = partner_env(
        fake_url, config, CBPROXY_REFRESH_LEEWAY="2", **redis_env(redis_url, key_prefix)
    )
    a, b = await fleet(env, config, count=2)
    client = ALPHA[1]

    connection = await install(session, a.url, "alpha", state.marketplace_install(client))
    prop = connection["properties"][0]
    assert (connection["kind"], connection["expires_at"]) == ("api_key", None)
    assert dict(state.token_calls_by_client[client]) == {
        "urn:ietf:params:oauth:grant-type:api-key": 1
    }
    # The key's answer lists no property: the proxy asked getHotels with the key.
    assert state.api_log[-1]["kind"] == "api_key"
    (key,) = state.valid_api_keys() - {state.api_key}

    for proxy in (a, b):

        async def served(proxy: ProxyProcess = proxy) -> Any:
            return await served_entry(state, session, proxy.url, {"X-PROPERTY-ID": prop})

        entry, _ = await eventually(served, PROPAGATION_BOUND, f"served on {proxy.url}")
        assert entry["kind"] == "api_key"
        assert entry["credential"] == state.credential_id(key)
    # Longer than an OAuth token of this fake would live before its refresh.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        entry = await served_entry(state, session, b.url, {"X-PROPERTY-ID": prop})
        assert entry is not None
        assert entry["credential"] == state.credential_id(key)
        await asyncio.sleep(0.2)
    assert "refresh_token" not in state.token_calls_by_client[client]
    assert token_calls(state, client) == 1
    assert_no_secrets(state, [a, b])


# --- 3. a re-install keeps the connection and replaces its credential ---------------------


async def test_reinstall_keeps_id_and_metadata_and_replaces_the_credential(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    a, b = await fleet(env, config, count=2)
    client = ALPHA[1]

    first = await install(session, a.url, "alpha", state.marketplace_install(client, ["4100"]))
    name = first["id"]
    status, patched = await admin(session, "PATCH", a.url, name, {"metadata": {"tenant": "t-1"}})
    assert status == 200, patched
    assert patched["connection"]["metadata"] == {"tenant": "t-1"}

    async def served_on_b() -> Any:
        return await served_entry(state, session, b.url, {"X-PROPERTY-ID": "4100"})

    old, _ = await eventually(served_on_b, PROPAGATION_BOUND, "first install served on B")

    second = await install(session, b.url, "alpha", state.marketplace_install(client, ["4100"]))
    assert second["id"] == name
    assert second["created_at"] == first["created_at"]
    assert second["metadata"] == {"tenant": "t-1"}
    assert second["generation"] > patched["connection"]["generation"] > first["generation"]
    assert second["state"] == "ok"

    for proxy in (a, b):

        async def new_credential(proxy: ProxyProcess = proxy) -> Any:
            entry = await served_entry(state, session, proxy.url, {"X-PROPERTY-ID": "4100"})
            return entry if entry and entry["credential"] != old["credential"] else None

        await eventually(new_credential, PROPAGATION_BOUND, f"new credential on {proxy.url}")
    # Once switched, never back: ten more calls per replica all carry the new credential.
    for proxy in (a, b):
        for _ in range(10):
            entry = await served_entry(state, session, proxy.url, {"X-PROPERTY-ID": "4100"})
            assert entry is not None
            assert entry["credential"] != old["credential"]
    status, shown = await admin(session, "GET", a.url, name)
    assert status == 200
    assert shown["connection"]["generation"] == second["generation"]
    assert shown["connection"]["metadata"] == {"tenant": "t-1"}
    assert_no_secrets(state, [a, b])


# --- 4. delete through the admin API ------------------------------------------------------


async def test_delete_disables_the_app_and_stops_every_replica(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    a, b = await fleet(env, config, count=2)
    client, props = ALPHA[1], ["5001", "5002"]

    connection = await install(session, a.url, "alpha", state.marketplace_install(client, props))
    name = connection["id"]
    assert name == "alpha.property.5001"
    for proxy in (a, b):
        for pid in props:

            async def served(proxy: ProxyProcess = proxy, pid: str = pid) -> Any:
                return await served_entry(state, session, proxy.url, {"X-PROPERTY-ID": pid})

            await eventually(served, PROPAGATION_BOUND, f"{pid} served on {proxy.url}")

    status, body = await admin(session, "DELETE", b.url, name)
    assert status == 204, body
    tokens_at_delete = token_calls(state, client)
    disabled = [c for c in state.app_state_calls if c["client_id"] == client]
    # One postAppState per property, the first with a working credential. The fake (as
    # "Connecting and disconnecting apps" reads) ends the whole authorisation with the
    # first, so the second may be refused: either way nothing of the app's still works.
    assert [c["property_id"] for c in disabled][:1] == ["5001"]
    assert {c["app_state"] for c in disabled} == {"disabled"}
    assert len(disabled) <= len(props)
    still = [*state.valid_refresh_tokens(), *state.valid_access_tokens()]
    assert [t for t in still if getattr(state.grant_of(t), "client_id", None) == client] == []

    for proxy in (a, b):
        for pid in props:

            async def gone(proxy: ProxyProcess = proxy, pid: str = pid) -> Any:
                status, body, error = await hotels(session, proxy.url, {"X-PROPERTY-ID": pid})
                return (status, error, body.get("error")) == (
                    410,
                    "connection_disconnected",
                    "connection_disconnected",
                )

            await eventually(gone, PROPAGATION_BOUND, f"410 for {pid} on {proxy.url}")
    before = len(state.api_log)
    status, body, error = await hotels(session, a.url, {"X-Cloudbeds-Connection": name})
    assert (status, error) == (410, "connection_disconnected"), body
    assert len(state.api_log) == before  # nothing went upstream
    for proxy in (a, b):
        status, shown = await admin(session, "GET", proxy.url, name)
        assert status == 200
        assert shown["connection"]["state"] == "disconnected"
    assert token_calls(state, client) == tokens_at_delete  # no replica tries to refresh it
    assert_no_secrets(state, [a, b])


# --- 5. one budget per app across the fleet ------------------------------------------------

RATE, BURST = 5, 5


def record_calls(state: FakeCloudbeds) -> list[tuple[float, str, str]]:
    """(time, client id, "token" or "api") of every call the fake counts, for diagnosis."""
    calls: list[tuple[float, str, str]] = []
    count = state.count_call

    def counted(client_id: str, *, token: bool = False) -> None:
        calls.append((state.clock(), client_id, "token" if token else "api"))
        count(client_id, token=token)

    state.count_call = counted  # type: ignore[method-assign]
    return calls


def busiest_second(calls: list[tuple[float, str, str]], client_id: str) -> list[str]:
    """The calls of the busiest sliding second, as offsets from its start and kinds."""
    times = sorted((t, kind) for t, c, kind in calls if c == client_id)
    best: list[tuple[float, str]] = []
    start = 0
    for end in range(len(times)):
        while times[end][0] - times[start][0] >= 1.0:
            start += 1
        if end - start + 1 > len(best):
            best = times[start : end + 1]
    return [f"+{t - best[0][0]:.3f}s {kind}" for t, kind in best]


async def _caller(
    session: aiohttp.ClientSession,
    targets: list[tuple[str, str]],
    offset: int,
    stop: asyncio.Event,
    outcomes: collections.Counter[str],
) -> None:
    """Round-robin over (replica, property) pairs until `stop`; count what came back."""
    turn = offset
    while not stop.is_set():
        proxy, pid = targets[turn % len(targets)]
        turn += 1
        try:
            status, body, error = await hotels(session, proxy, {"X-PROPERTY-ID": pid})
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcomes[f"error:{type(exc).__name__}"] += 1
            continue
        if status == 200 and body.get("success") is True:
            outcomes["ok"] += 1
        elif status == 429 and error == "rate_limited":
            outcomes["rate_limited"] += 1
            # A well-behaved caller backs off (Retry-After is at least 1 s; jitter spreads
            # the retries); it also keeps this loop, where the fake stamps arrivals, free
            # enough that its timestamps are the arrival times.
            await asyncio.sleep(random.random())
        else:
            outcomes[f"unexpected:{status}:{error}:{str(body)[:80]}"] += 1


async def test_one_budget_per_app_across_connections_and_replicas(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    state.expires_in = 4  # refreshes (token calls) happen inside the measured window
    calls = record_calls(state)
    register(state, ALPHA, BETA)
    config = write_config(
        tmp_path,
        app_table(ALPHA, rate_limit=RATE, rate_burst=BURST),
        app_table(BETA, rate_limit=RATE, rate_burst=BURST),
    )
    # A refresh may wait for its slot as long as its lock outlives the token call
    # (CBPROXY_LOCK_TTL - CBPROXY_TOKEN_TIMEOUT); longer than the requests' own wait
    # (CBPROXY_RATE_MAX_WAIT, 2 s), or a saturated budget starves the refresh.
    env = partner_env(
        fake_url,
        config,
        CBPROXY_REFRESH_LEEWAY="2",
        CBPROXY_LOCK_TTL="6",
        **redis_env(redis_url, key_prefix),
    )
    replicas = await fleet(env, config, count=3)
    client, props = ALPHA[1], ["6001", "6002", "6003", "6004"]
    for i, pid in enumerate(props):
        await install(
            session, replicas[i % 3].url, "alpha", state.marketplace_install(client, [pid])
        )
    await install(session, replicas[0].url, "beta", state.marketplace_install(BETA[1], ["6901"]))
    for proxy in replicas:
        for pid in props:

            async def routed(proxy: ProxyProcess = proxy, pid: str = pid) -> bool:
                _, _, error = await hotels(session, proxy.url, {"X-PROPERTY-ID": pid})
                return error != "unknown_property"

            await eventually(routed, PROPAGATION_BOUND, f"{pid} known on {proxy.url}")
    refreshes_before = state.token_calls_by_client[client]["refresh_token"]

    targets = [(p.url, pid) for p in replicas for pid in props]
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    callers = [asyncio.create_task(_caller(session, targets, i, stop, outcomes)) for i in range(24)]
    await asyncio.sleep(10)  # the measured window: load, not a wait for something
    stop.set()
    await asyncio.gather(*callers)

    highest = {c: state.max_in_window(c) for c in (client, BETA[1])}
    refreshes = state.token_calls_by_client[client]["refresh_token"] - refreshes_before
    print(
        f"\nshared app budget ({RATE}/s, burst {BURST}), 3 replicas x {len(props)} connections, "
        f"24 callers for 10 s: highest sliding-second count per client id {highest}; "
        f"outcomes {dict(outcomes)}; refresh token calls in the window: {refreshes}; "
        f"busiest second: {' '.join(busiest_second(calls, client))}"
    )
    assert state.max_in_window(client) <= RATE + BURST, " ".join(busiest_second(calls, client))
    assert set(outcomes) <= {"ok", "rate_limited"}, outcomes
    assert outcomes["ok"] >= 30  # the budget is used, not starved
    assert outcomes["rate_limited"] > 0  # the load exceeded it
    assert refreshes >= 1  # token calls were part of the window

    # A Cloudbeds 429 on one connection pauses the app's other connections everywhere.
    state.rate_limit_next, state.rate_limit_retry_after = 1, 5
    status, body, error = await hotels(session, replicas[0].url, {"X-PROPERTY-ID": "6001"})
    assert (status, error) == (429, None), body  # Cloudbeds' own 429, passed through
    before = len(state.api_log)
    for proxy in replicas:
        for pid in ("6002", "6003"):
            status, body, error = await hotels(session, proxy.url, {"X-PROPERTY-ID": pid})
            assert (status, error) == (429, "rate_limited"), (proxy.url, pid, body)
    assert [e for e in state.api_log[before:] if e["client_id"] == client] == []
    for proxy in replicas:  # another app's budget is its own
        entry = await served_entry(state, session, proxy.url, {"X-PROPERTY-ID": "6901"})
        assert entry is not None
        assert entry["client_id"] == BETA[1]
    assert_no_secrets(state, replicas)


async def test_replays_after_a_401_spend_the_app_budget_too(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    calls = record_calls(state)
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=RATE, rate_burst=BURST))
    env = partner_env(fake_url, config, CBPROXY_LOCK_TTL="6", **redis_env(redis_url, key_prefix))
    (proxy,) = await fleet(env, config)
    client = ALPHA[1]
    await install(session, proxy.url, "alpha", state.marketplace_install(client, ["6101"]))

    # Cloudbeds revokes the token. A 401 forces a refresh only once the token is 5 s old
    # (`min_forced_interval`): until then each 401 goes back to its caller. Then one refresh
    # runs and every request in flight is sent again; Cloudbeds counts each of those calls.
    state.revoke_all()
    before = state.api_calls_by_client[client]
    answers: list[tuple[int, dict[str, Any], str | None]] = []
    async with asyncio.timeout(20):
        while state.token_calls_by_client[client]["refresh_token"] == 0:
            answers += await asyncio.gather(
                *(hotels(session, proxy.url, {"X-PROPERTY-ID": "6101"}) for _ in range(5 * BURST))
            )
    outcomes = collections.Counter(
        "ok" if status == 200 and body.get("success") else f"{status}:{error}"
        for status, body, error in answers
    )
    upstream = sum(error is None for _, _, error in answers)
    replays = state.api_calls_by_client[client] - before - upstream
    print(
        f"\n401 storm: outcomes {dict(outcomes)}, {replays} replayed call(s), token calls "
        f"{dict(state.token_calls_by_client[client])}, highest sliding-second count "
        f"{state.max_in_window(client)}: {' '.join(busiest_second(calls, client))}"
    )
    assert state.token_calls_by_client[client]["refresh_token"] == 1
    assert set(outcomes) <= {"ok", "401:None", "429:rate_limited"}, outcomes
    assert outcomes["ok"] >= 1
    assert replays >= 1  # the storm happened
    assert state.max_in_window(client) <= RATE + BURST, " ".join(busiest_second(calls, client))


# --- 6. without Redis: the SQLite file survives a restart ----------------------------------


async def test_sqlite_store_keeps_the_rotated_refresh_token_across_a_restart(
    fake_cloudbeds: Fake, fleet: Fleet, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state, fake_url = fake_cloudbeds
    state.rotate_refresh_tokens, state.expires_in = True, 4
    register(state, ALPHA)
    client = ALPHA[1]
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    state_file = tmp_path / "state.db"
    env = partner_env(
        fake_url, config, CBPROXY_STATE_FILE=str(state_file), CBPROXY_REFRESH_LEEWAY="2"
    )
    (proxy,) = await fleet(env, config)
    connection = await install(
        session, proxy.url, "alpha", state.marketplace_install(client, ["7001"])
    )
    name, first_generation = connection["id"], connection["generation"]

    async def rotated() -> Any:
        # A connection of an app is refreshed ahead only while requests use it.
        await hotels(session, proxy.url, {"X-PROPERTY-ID": "7001"})
        _, shown = await admin(session, "GET", proxy.url, name)
        return state.token_calls_by_client[client]["refresh_token"] >= 1 and (
            shown["connection"]["generation"] > first_generation
        )

    await eventually(rotated, 10, "one refresh (a rotation) before the restart")
    status, before = await admin(session, "GET", proxy.url, name)
    assert before["connection"]["state"] == "ok"
    proxy.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proxy.wait, 15) == 0

    store = SqliteStore(str(state_file))
    try:
        record = await store.load(name)
    finally:
        await store.close()
    assert record is not None
    assert record.refresh_token in state.valid_refresh_tokens()  # the rotated one
    assert record.generation >= before["connection"]["generation"]

    (again,) = await fleet(env, config)
    status, shown = await admin(session, "GET", again.url, name)
    assert status == 200
    assert shown["connection"]["generation"] >= before["connection"]["generation"]
    assert shown["connection"]["state"] == "ok"
    entry = await served_entry(state, session, again.url, {"X-PROPERTY-ID": "7001"})
    assert entry is not None
    assert entry["connection"] == f"{client}/property:7001"
    refreshes = state.token_calls_by_client[client]["refresh_token"]

    async def refreshed_again() -> Any:
        await hotels(session, again.url, {"X-PROPERTY-ID": "7001"})  # in use: refreshed ahead
        return state.token_calls_by_client[client]["refresh_token"] > refreshes

    await eventually(refreshed_again, 10, "a refresh after the restart")
    status, shown = await admin(session, "GET", again.url, name)
    assert shown["connection"]["state"] == "ok"
    print(
        f"\nsqlite restart: generation {first_generation} -> {before['connection']['generation']}"
        f" before the stop -> {shown['connection']['generation']} after; token calls "
        f"{dict(state.token_calls_by_client[client])}"
    )
    assert state.token_calls_by_client[client]["authorization_code"] == 1  # no new install
    assert_no_secrets(state, [proxy, again])


# --- 7. the official SDK, routed by the propertyID it sends --------------------------------


async def test_official_sdk_is_routed_by_property(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    client = ALPHA[1]
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    (proxy,) = await fleet(env, config)
    for pid in ("8001", "8002"):
        await install(session, proxy.url, "alpha", state.marketplace_install(client, [pid]))

    # Exactly what a service does: the host, no access token, no API key.
    api = sdk.ReservationApi(sdk.ApiClient(sdk.Configuration(host=f"{proxy.url}/api/v1.3")))
    for pid in ("8001", "8002"):
        before = len(state.api_log)
        answer = await asyncio.to_thread(api.get_reservations_get, property_id=pid)
        assert answer.success is True
        assert [r.property_id for r in answer.data or []] == [pid]
        (entry,) = state.api_log[before:]
        assert entry["path"] == "/api/v1.3/getReservations"
        assert (entry["connection"], entry["asked"]) == (f"{client}/property:{pid}", [pid])
    assert_no_secrets(state, [proxy])


# --- refresh what is used: an imported connection nobody uses costs no token call; its first
# request makes exactly one (and waits for it), and the other replica serves the same token.
# An idle API key gets its keep-alive call from one replica.

IDLE_IMPORTS = 20


async def test_an_idle_import_makes_no_token_call_until_a_request_then_one(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    env = partner_env(fake_url, config, **redis_env(redis_url, key_prefix))
    a, b = await fleet(env, config, count=2)
    client = ALPHA[1]
    for n in range(IDLE_IMPORTS):
        prop = str(5000 + n)
        token = f"imported-idle-{n}"
        state.add_refresh_token(token, state.grant(client, properties=[prop]))
        body = {"app": "alpha", "refresh_token": token, "properties": [prop]}
        status, answer = await admin(session, "PUT", a.url, f"alpha.property.{prop}", body)
        assert status == 201, answer

    async def known_to_b() -> bool:
        status, _ = await admin(session, "GET", b.url, f"alpha.property.{5000 + IDLE_IMPORTS - 1}")
        return status == 200

    await eventually(known_to_b, what="the imports reach the other replica")
    await asyncio.sleep(2.0)  # several poll intervals and feed reads: time to misbehave
    assert sum(state.token_calls_by_client[client].values()) == 0

    # The first request waits for the one refresh it needs, and succeeds.
    status, body, error = await hotels(session, a.url, {"X-PROPERTY-ID": "5003"})
    assert (status, error, body.get("success")) == (200, None, True), body
    assert state.token_calls_by_client[client]["refresh_token"] == 1
    # The token is shared: more requests, on either replica, make no further call.
    for proxy in (a, b, a, b):
        status, body, error = await hotels(session, proxy.url, {"X-PROPERTY-ID": "5003"})
        assert (status, error) == (200, None), body
    await asyncio.sleep(1.0)
    assert sum(state.token_calls_by_client[client].values()) == 1
    api_keys_or_tokens = {e["credential"] for e in state.api_log if e["path"].endswith("Hotels")}
    assert len(api_keys_or_tokens) == 1  # one access token served every request


async def test_an_idle_api_key_is_kept_alive_by_one_replica(
    fake_cloudbeds: Fake,
    redis_url: str,
    key_prefix: str,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    state, fake_url = fake_cloudbeds
    register(state, ALPHA)
    config = write_config(tmp_path, app_table(ALPHA, rate_limit=50, rate_burst=50))
    # A 4-second interval: a keep-alive 2 to 4 seconds after the key's last use.
    env = partner_env(
        fake_url,
        config,
        CBPROXY_KEEPALIVE_INTERVAL="4",
        **redis_env(redis_url, key_prefix),
    )
    key = state.mint_api_key(state.grant(ALPHA[1], properties=["5100"]))
    a, _ = await fleet(env, config, count=2)
    body = {"app": "alpha", "api_key": key, "properties": ["5100"]}
    status, answer = await admin(session, "PUT", a.url, "alpha.property.5100", body)
    assert status == 201, answer

    def keepalives() -> list[dict[str, object]]:
        return [e for e in state.api_log if e["path"] == "/api/v1.3/getHotels"]

    async def kept_alive() -> bool:
        return bool(keepalives())

    await eventually(kept_alive, what="a keep-alive call with the idle key")
    first = len(keepalives())
    assert keepalives()[0]["kind"] == "api_key"
    assert keepalives()[0]["status"] == 200
    status, answer = await admin(session, "GET", a.url, "alpha.property.5100")
    assert status == 200
    # Recorded as a use for the fleet (the admin API shows it).
    await eventually(lambda: _last_used(session, a.url), what="last_used_at set")
    await asyncio.sleep(4.0)
    # One interval later: at most one more, whichever replica made it (never one each).
    assert first <= len(keepalives()) <= first + 2
    assert key not in a.log_text()


async def _last_used(session: aiohttp.ClientSession, url: str) -> bool:
    status, answer = await admin(session, "GET", url, "alpha.property.5100")
    return status == 200 and answer["connection"]["last_used_at"] is not None
