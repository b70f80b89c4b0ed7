"""`cloudbeds-proxy connections ...` as a user runs it: real processes, the real store
(Redis under a prefix of the test's own, or a SQLite state file), the fake Cloudbeds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import make_store
from proxy.cli_connections import one_shot
from proxy.config import load_settings
from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.tokens import seed_record
from tests.support import ProxyProcess

Fake = tuple[FakeCloudbeds, str]
OAUTH_ID = "acme.property.1001"
KEY_ID = "keys.property.2002"
CALLER_TOKEN = "caller-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"
MARKETPLACE_STATE = "marketplace-state-0123456789"

CONFIG = f"""
[apps.acme]
client_id = "fake-client-id"
client_secret = "fake-client-secret"
redirect_uri = "https://localhost/callback"
marketplace_state = "{MARKETPLACE_STATE}"

[apps.keys]
client_id = "fake-client-id"
client_secret = "fake-client-secret"
redirect_uri = "https://localhost/callback"
delivery = "api_key"

[callers.svc]
token = "{CALLER_TOKEN}"
apps = ["*"]
"""


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one line a failed command prints; nothing on stdout, no traceback."""
        assert self.code != 0, self.out
        assert self.out == ""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        return lines[0]


@dataclasses.dataclass
class Cli:
    """Runs `python -m proxy ...` with the test's store, config and fake Cloudbeds."""

    env: dict[str, str]
    config: Path
    fake: FakeCloudbeds
    outputs: list[str] = dataclasses.field(default_factory=list)
    known: list[str] = dataclasses.field(default_factory=list)
    """Secrets a test made up that the fake does not know."""

    async def __call__(self, *args: str, stdin: str = "", **env: str) -> Result:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *args,
            "--config",
            str(self.config),
            env={**os.environ, **self.env, **env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), timeout=30)
        assert process.returncode is not None
        result = Result(process.returncode, out.decode(), err.decode())
        self.outputs += [result.out, result.err]
        assert "Traceback" not in result.err
        return result

    def secrets(self) -> list[str]:
        fake = self.fake
        return [
            fake.client_secret,
            *fake._access_tokens,
            *fake._refresh_tokens,
            *fake._api_keys,
            CALLER_TOKEN,
            ADMIN_TOKEN,
            MARKETPLACE_STATE,
            *self.known,
        ]

    def assert_no_secret(self, *texts: str) -> None:
        """Nothing any command printed (or `texts`) holds a secret the fake or config knows."""
        for text in (*self.outputs, *texts):
            for secret in self.secrets():
                assert secret not in text


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str) -> dict[str, str]:
    """Where the commands and proxies keep connections: a state file, or Redis."""
    if request.param == "sqlite":
        path = tmp_path / "state.db"
        path.touch()  # the state file exists once a proxy has started on it
        return {"CBPROXY_STATE_FILE": str(path)}
    url = request.getfixturevalue("redis_url")
    request.getfixturevalue("real_redis")  # deletes the prefix's keys afterwards
    return {"CBPROXY_REDIS_URL": url, "CBPROXY_REDIS_PREFIX": key_prefix}


@pytest.fixture
def cli(fake_cloudbeds: Fake, store_env: dict[str, str], tmp_path: Path) -> Iterator[Cli]:
    yield from make_cli(fake_cloudbeds, store_env, tmp_path)


@pytest.fixture
def file_cli(fake_cloudbeds: Fake, tmp_path: Path) -> Iterator[Cli]:
    """For what does not depend on the store: the commands on a state file."""
    path = tmp_path / "state.db"
    path.touch()
    yield from make_cli(fake_cloudbeds, {"CBPROXY_STATE_FILE": str(path)}, tmp_path)


def make_cli(fake_cloudbeds: Fake, store_env: dict[str, str], tmp_path: Path) -> Iterator[Cli]:
    state, url = fake_cloudbeds
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG)
    env = {
        "CBPROXY_UPSTREAM_URL": url,
        "CBPROXY_TOKEN_URL": f"{url}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{url}/api/v1.3/oauth",
        "CBPROXY_LOG_FORMAT": "json",
        **store_env,
    }
    runner = Cli(env, config, state)
    yield runner
    runner.assert_no_secret()


def secret_file(tmp_path: Path, value: str) -> str:
    path = tmp_path / f"secret-{len(list(tmp_path.iterdir()))}"
    path.write_text(value + "\n")
    return str(path)


async def import_oauth(cli: Cli, tmp_path: Path, token: str, *extra: str) -> Result:
    path = secret_file(tmp_path, token)
    return await cli(
        "connections", "import", OAUTH_ID, "--app", "acme", "--refresh-token-file", path, *extra
    )


async def test_each_subcommand_on_the_shared_store(cli: Cli, tmp_path: Path) -> None:
    fake = cli.fake
    token = "imported-refresh-token-0123456789"
    fake.add_refresh_token(token)

    made = (
        await import_oauth(cli, tmp_path, token, "--property", "1001", "--metadata", '{"crm": 7}')
    ).json()
    assert made["result"] == "created"
    first = made["connection"]
    assert first["id"] == OAUTH_ID
    assert (first["app"], first["kind"], first["state"]) == ("acme", "oauth", "ok")
    assert first["properties"] == ["1001"]
    assert first["metadata"] == {"crm": 7}
    assert first["expires_at"] is None
    assert fake.token_calls["refresh_token"] == 0, "an import refreshes nothing itself"

    # The same id again, the secret from stdin: replaced, metadata and created_at kept.
    again = await cli(
        "connections", "import", OAUTH_ID, "--app", "acme", "--refresh-token-stdin", stdin=token
    )
    replaced = again.json()
    assert replaced["result"] == "replaced"
    assert replaced["connection"]["metadata"] == {"crm": 7}
    assert replaced["connection"]["created_at"] == first["created_at"]
    assert replaced["connection"]["generation"] > first["generation"]

    key = (
        await cli(
            "connections",
            "import",
            KEY_ID,
            "--app",
            "keys",
            "--api-key-file",
            secret_file(tmp_path, fake.api_key),
            "--property",
            "2002",
        )
    ).json()["connection"]
    assert (key["kind"], key["expires_at"]) == ("api_key", None)

    shown = (await cli("connections", "show", OAUTH_ID)).json()
    assert shown == {"connection": replaced["connection"]}

    listed = (await cli("connections", "list")).json()
    assert [c["id"] for c in listed["connections"]] == [OAUTH_ID, KEY_ID]
    assert listed["next_cursor"] is None
    page = (await cli("connections", "list", "--limit", "1")).json()
    assert [c["id"] for c in page["connections"]] == [OAUTH_ID]
    assert page["next_cursor"] is not None
    rest = (
        await cli("connections", "list", "--limit", "1", "--cursor", page["next_cursor"])
    ).json()
    assert [c["id"] for c in rest["connections"]] == [KEY_ID]
    every = (await cli("connections", "list", "--limit", "1", "--all")).json()
    assert every == listed
    by_app = (await cli("connections", "list", "--app", "keys")).json()
    assert [c["id"] for c in by_app["connections"]] == [KEY_ID]
    by_prop = (await cli("connections", "list", "--property", "1001")).json()
    assert [c["id"] for c in by_prop["connections"]] == [OAUTH_ID]

    refreshed = (await cli("connections", "refresh", OAUTH_ID)).json()["connection"]
    assert fake.token_calls["refresh_token"] == 1
    assert refreshed["generation"] == replaced["connection"]["generation"] + 1
    assert refreshed["expires_at"] is not None

    never = (await cli("connections", "refresh", KEY_ID)).error_line()
    assert never.startswith("cloudbeds-proxy: invalid_connection: ")
    assert "API key never refreshes" in never

    gone = (await cli("connections", "delete", OAUTH_ID)).json()["connection"]
    assert gone["state"] == "disconnected"
    assert [c["property_id"] for c in fake.app_state_calls] == ["1001"]
    disconnected = (await cli("connections", "list", "--state", "disconnected")).json()
    assert [c["id"] for c in disconnected["connections"]] == [OAUTH_ID]
    after = (await cli("connections", "refresh", OAUTH_ID)).error_line()
    assert after.startswith("cloudbeds-proxy: connection_disconnected: ")
    assert fake.token_calls["refresh_token"] == 1


async def test_migrate_moves_an_oauth_connection_to_an_api_key(cli: Cli, tmp_path: Path) -> None:
    assert (await import_oauth(cli, tmp_path, cli.fake.refresh_token)).code == 0
    moved = (await cli("connections", "migrate", OAUTH_ID)).json()["connection"]
    assert (moved["kind"], moved["state"], moved["expires_at"]) == ("api_key", "ok", None)
    assert cli.fake.token_calls["refresh_token_exchange"] == 1

    again = (await cli("connections", "migrate", OAUTH_ID)).error_line()
    assert again.startswith("cloudbeds-proxy: invalid_connection: ")
    assert "cannot migrate" in again
    assert cli.fake.token_calls["refresh_token_exchange"] == 1


async def test_refresh_takes_the_lock_replicas_take(cli: Cli, tmp_path: Path) -> None:
    assert (await import_oauth(cli, tmp_path, cli.fake.refresh_token)).code == 0
    settings = load_settings({**os.environ, **cli.env}, str(cli.config))
    store = make_store(settings)
    lock = store.lock(OAUTH_ID, settings.lock_ttl)
    try:
        assert await lock.acquire()  # a replica is refreshing it right now
        busy = (await cli("connections", "refresh", OAUTH_ID)).error_line()
        assert busy.startswith("cloudbeds-proxy: no_usable_token: ")
        assert "refreshing elsewhere" in busy
        assert cli.fake.token_calls["refresh_token"] == 0
    finally:
        await lock.release()
        await store.close()
    assert (await cli("connections", "refresh", OAUTH_ID)).code == 0
    assert cli.fake.token_calls["refresh_token"] == 1


async def test_a_rejected_refresh_says_to_reinstall(cli: Cli, tmp_path: Path) -> None:
    assert (await import_oauth(cli, tmp_path, cli.fake.refresh_token)).code == 0
    cli.fake.reject_refresh = True
    line = (await cli("connections", "refresh", OAUTH_ID)).error_line()
    assert line.startswith("cloudbeds-proxy: reauthorization_required: ")
    assert "install the app again" in line
    shown = (await cli("connections", "show", OAUTH_ID)).json()["connection"]
    assert shown["state"] == "reauthorization_required"


async def test_a_failed_token_call_is_an_error_not_a_stale_answer(cli: Cli, tmp_path: Path) -> None:
    assert (await import_oauth(cli, tmp_path, cli.fake.refresh_token)).code == 0
    cli.fake.token_failures = 1
    line = (await cli("connections", "refresh", OAUTH_ID)).error_line()
    assert line.startswith("cloudbeds-proxy: upstream_unreachable: ")
    shown = (await cli("connections", "show", OAUTH_ID)).json()["connection"]
    assert (shown["state"], shown["generation"]) == ("ok", 1)


BAD_INPUT = [
    (("show", "bad id"), "", 1, "invalid_connection: ID: a connection id uses"),
    (("show", "x" * 129), "", 1, "invalid_connection: ID: a connection id uses"),
    (("delete", "a/b"), "", 1, "invalid_connection: ID: a connection id uses"),
    (("show", "nobody"), "", 1, "unknown_connection: no connection 'nobody'"),
    (("refresh", "nobody"), "", 1, "unknown_connection: no connection 'nobody'"),
    (
        ("import", "x", "--app", "nope", "--refresh-token-stdin"),
        "some-refresh-token",
        1,
        "unknown_app: no app 'nope' is configured ([apps.NAME]); apps: acme, keys",
    ),
    (
        ("import", "bad id", "--app", "acme", "--refresh-token-stdin"),
        "some-refresh-token",
        1,
        "invalid_connection: ID: a connection id uses",
    ),
    (
        ("import", "x", "--app", "acme", "--refresh-token-stdin", "--api-key-file", "F"),
        "some-refresh-token",
        1,
        "invalid_connection: give exactly one of --refresh-token-file, --refresh-token-stdin, "
        "--api-key-file, --api-key-stdin",
    ),
    (
        ("import", "x", "--app", "acme"),
        "",
        1,
        "invalid_connection: give exactly one of --refresh-token-file",
    ),
    (
        ("import", "x", "--app", "acme", "--refresh-token-stdin", "--metadata", "{crm: 7"),
        "some-refresh-token",
        1,
        "invalid_connection: --metadata: not valid JSON (",
    ),
    (
        ("import", "x", "--app", "acme", "--refresh-token-stdin", "--metadata", "[7]"),
        "some-refresh-token",
        1,
        "invalid_connection: --metadata: must be a JSON object",
    ),
    (
        ("import", "x", "--app", "acme", "--refresh-token-stdin"),
        "\n",
        1,
        "invalid_connection: --refresh-token-stdin: empty",
    ),
    (
        ("import", "x", "--app", "keys", "--api-key-stdin"),
        "not-a-cloudbeds-key",
        1,
        'invalid_connection: "api_key": a Cloudbeds API key starts with cbat_',
    ),
    (
        ("import", "x", "--app", "acme", "--refresh-token-file", "/nonexistent/secret"),
        "",
        2,
        "configuration error: --refresh-token-file: cannot read /nonexistent/secret",
    ),
    (("list", "--state", "gone"), "", 1, "invalid_connection: state: one of ok,"),
    (("list", "--limit", "501"), "", 1, "invalid_connection: limit: a whole number from 1"),
]


@pytest.mark.parametrize(("args", "stdin", "code", "message"), BAD_INPUT)
async def test_bad_input_is_one_line_naming_the_fix(
    file_cli: Cli, args: tuple[str, ...], stdin: str, code: int, message: str
) -> None:
    cli = file_cli
    result = await cli("connections", *args, stdin=stdin)
    assert result.code == code
    assert result.error_line().startswith(f"cloudbeds-proxy: {message}")
    assert (await cli("connections", "list")).json()["connections"] == []
    cli.assert_no_secret()
    assert "some-refresh-token" not in result.err


async def test_without_redis_the_state_file_must_exist(file_cli: Cli, tmp_path: Path) -> None:
    cli = file_cli
    missing = str(tmp_path / "elsewhere.db")
    result = await cli("connections", "list", CBPROXY_STATE_FILE=missing)
    assert result.code == 2
    assert result.error_line().startswith(
        "cloudbeds-proxy: configuration error: CBPROXY_STATE_FILE"
    )
    assert not Path(missing).exists()


@pytest.fixture
async def proxy(cli: Cli, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """`serve` on the commands' store and config, in a process of its own."""
    process = ProxyProcess(
        {**cli.env, "CBPROXY_POLL_INTERVAL": "0.5"},
        tmp_path / "proxy.log",
        args=("--config", str(cli.config)),
    )
    await asyncio.to_thread(process.start)
    yield process
    await process.astop()
    cli.assert_no_secret(process.log_text())


async def status_through(proxy: ProxyProcess, connection: str, want: int) -> dict[str, Any]:
    """Ask through the proxy for `connection` until it answers `want` (bounded: 15 s)."""
    headers = {"X-Cloudbeds-Connection": connection, "Authorization": f"Bearer {CALLER_TOKEN}"}
    async with aiohttp.ClientSession() as session, asyncio.timeout(15):
        while True:
            async with session.get(f"{proxy.url}/api/v1.3/getHotels", headers=headers) as answer:
                body: dict[str, Any] = await answer.json()
                if answer.status == want:
                    return body
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_running_proxy_picks_up_what_the_commands_change(
    cli: Cli, proxy: ProxyProcess, tmp_path: Path
) -> None:
    assert (await status_through(proxy, OAUTH_ID, 404))["error"] == "unknown_connection"

    assert (
        await import_oauth(cli, tmp_path, cli.fake.refresh_token, "--property", "1001")
    ).code == 0
    assert (await status_through(proxy, OAUTH_ID, 200))["success"] is True
    assert cli.fake.token_calls["refresh_token"] == 1, "the proxy refreshed it, once"

    status = (await cli("token", "status", CBPROXY_PORT=str(proxy.port))).json()
    assert status["connections"] == {"acme": {"ok": 1}}

    assert (await cli("connections", "delete", OAUTH_ID)).code == 0
    gone = await status_through(proxy, OAUTH_ID, 410)
    assert gone["error"] == "connection_disconnected"
    status = (await cli("token", "status", CBPROXY_PORT=str(proxy.port))).json()
    assert status["connections"] == {"acme": {"disconnected": 1}}


async def test_check_config_shows_apps_and_callers_masked(file_cli: Cli) -> None:
    described = (await file_cli("check-config", CBPROXY_ADMIN_TOKEN=ADMIN_TOKEN)).json()
    acme = described["apps"]["acme"]
    assert (acme["client_id"], acme["client_secret"]) == ("fake-client-id", "<set>")
    assert acme["marketplace_state"] == "<set>"
    assert described["apps"]["keys"]["delivery"] == "api_key"
    assert described["callers"]["svc"]["token"] == "<set>"
    assert described["callers"]["svc"]["apps"] == ["*"]
    assert described["admin_token"] == "<set>"


def refresh_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("refresh:"))


async def test_one_shot_makes_only_the_credential_a_command_needs(file_cli: Cli) -> None:
    settings = load_settings({**os.environ, **file_cli.env}, str(file_cli.config))
    body = {"app": "acme", "refresh_token": file_cli.fake.refresh_token}
    async with one_shot(settings) as made:
        for n in range(3):
            await made.connections.put(f"acme.property.{n}", body)
        assert made.registry.connections == {}, "a write makes no credential"
        await made.connections.refresh("acme.property.1")
        assert list(made.registry.connections) == ["acme.property.1"]
        assert refresh_tasks() == [], "and nothing refreshes in the background"
    assert file_cli.fake.token_calls["refresh_token"] == 1


async def test_the_cli_and_the_admin_api_answer_alike(file_cli: Cli, start_proxy: Any) -> None:
    file_cli.known += [f"refresh-token-{n}-0123456789" for n in (1, 2, 3)]
    for n in (1, 2, 3):
        imported = await file_cli(
            "connections", "import", f"acme.property.{n}", "--app", "acme",
            "--refresh-token-stdin", "--property", str(n), stdin=f"refresh-token-{n}-0123456789",
        )  # fmt: skip
        assert imported.code == 0
    # A proxy without the [apps] tables serves none of them: nothing changes them meanwhile.
    env = {**os.environ, **file_cli.env, "CBPROXY_ADMIN_TOKEN": ADMIN_TOKEN}
    url = await start_proxy(load_settings(env), ready=False)
    admin = f"{url}/_proxy/admin/connections"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for query, flags in (
            ({"limit": "2"}, ("--limit", "2")),
            (
                {"limit": "2", "cursor": "acme.property.2"},
                ("--limit", "2", "--cursor", "acme.property.2"),
            ),
            ({"property": "2"}, ("--property", "2")),
            ({"app": "keys"}, ("--app", "keys")),
        ):
            async with session.get(admin, params=query) as answer:
                assert answer.status == 200
                api = await answer.json()
            assert (await file_cli("connections", "list", *flags)).json() == api
        async with session.get(f"{admin}/acme.property.3") as answer:
            api = await answer.json()
        assert (await file_cli("connections", "show", "acme.property.3")).json() == api
        async with session.get(admin, params={"limit": "0"}) as answer:
            api = await answer.json()
        line = (await file_cli("connections", "list", "--limit", "0")).error_line()
        assert line == f"cloudbeds-proxy: {api['error']}: {api['message']}"


async def test_one_shot_refreshes_a_configured_credential_too(file_cli: Cli) -> None:
    env = {
        **os.environ,
        **file_cli.env,
        "CBPROXY_CLIENT_ID": "fake-client-id",
        "CBPROXY_CLIENT_SECRET": "fake-client-secret",
    }
    settings = load_settings(env, str(file_cli.config))
    async with one_shot(settings) as made:
        await made.store.put("default", seed_record(file_cli.fake.refresh_token, 1))
        refreshed = await made.connections.refresh("default")
        assert (refreshed.generation, refreshed.state.value) == (2, "ok")
        assert list(made.registry.connections) == ["default"]
        assert refresh_tasks() == []
    assert file_cli.fake.token_calls["refresh_token"] == 1
