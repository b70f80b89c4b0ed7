"""The `cloudbeds-proxy` command: serve, demo, check-config, auth, token, connections,
fake-cloudbeds (`connections` lives in `proxy.cli_connections`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

from proxy import cli_connections, logs
from proxy.app import create_app, make_store
from proxy.clock import system_clock
from proxy.config import (
    DEFAULT_CREDENTIAL,
    ConfigError,
    CredentialSettings,
    Kind,
    Settings,
    load_settings,
    require_credentials,
)
from proxy.coordinator import OAuthCredential
from proxy.endpoints import authorize_url, exchange_code
from proxy.errors import ProxyError, StoreUnavailable
from proxy.fake_cloudbeds import FakeCloudbeds, create_fake_app
from proxy.metrics import Metrics
from proxy.runtime import RUNTIME


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"cloudbeds-proxy: configuration error: {exc}", file=sys.stderr)
        code = 2
    except ProxyError as exc:
        print(f"cloudbeds-proxy: {exc.code}: {exc.message}", file=sys.stderr)
        code = 1
    except OSError as exc:  # a port in use, a proxy that is not running
        print(
            f"cloudbeds-proxy: {exc.strerror or exc} (check CBPROXY_HOST and CBPROXY_PORT)",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudbeds-proxy", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML file; CBPROXY_* variables override it")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="run the proxy against a bundled fake Cloudbeds")
    demo.add_argument("--port", type=int, default=None, help="proxy port (default 8080)")
    demo.set_defaults(func=lambda a: _run(_demo(a)))

    check = sub.add_parser("check-config", parents=[common], help="print the configuration")
    check.set_defaults(func=_check_config)

    auth = sub.add_parser("auth", help="authorise an OAuth credential").add_subparsers(
        required=True, metavar="ACTION"
    )
    url = auth.add_parser("url", parents=[common], help="print the authorize link")
    url.add_argument("--credential", default=DEFAULT_CREDENTIAL)
    url.set_defaults(func=_auth_url)
    exchange = auth.add_parser("exchange", parents=[common], help="exchange a code for tokens")
    exchange.add_argument("code", metavar="CODE_OR_REDIRECT_URL")
    exchange.add_argument("--credential", default=DEFAULT_CREDENTIAL)
    exchange.set_defaults(func=lambda a: _run(_auth_exchange(a)))

    token = sub.add_parser("token", help="inspect or refresh tokens").add_subparsers(
        required=True, metavar="ACTION"
    )
    status = token.add_parser("status", parents=[common], help="state of every credential")
    status.set_defaults(func=lambda a: _run(_token_status(a)))
    refresh = token.add_parser("refresh", parents=[common], help="refresh one credential now")
    refresh.add_argument("name", nargs="?", default=DEFAULT_CREDENTIAL)
    refresh.set_defaults(func=lambda a: _run(_token_refresh(a)))

    cli_connections.add_parser(sub, common)

    fake = sub.add_parser("fake-cloudbeds", help="run the fake Cloudbeds API")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=9090)
    fake.add_argument("--expires-in", type=int, default=3600, help="access token lifetime")
    fake.add_argument("--rotate-refresh-tokens", action="store_true")
    fake.set_defaults(func=_fake)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(os.environ, getattr(args, "config", None))
    logs.configure(settings.log_format)
    return settings


def _run(coro: Any) -> int:
    return int(asyncio.run(coro) or 0)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    require_credentials(settings)
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, not {args.workers}")
    if args.workers > 1:
        if settings.redis_url is None:
            raise ConfigError(
                "CBPROXY_REDIS_URL: --workers above 1 needs Redis; with the in-process store "
                "each worker would keep and refresh its own token. Set CBPROXY_REDIS_URL "
                "or run one worker"
            )
        return _supervise(args)
    app = create_app(settings)
    _quiet_collector(app)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_grace,
        reuse_port=args.reuse_port or None,
        access_log=None,
        print=None,
    )
    return 0


_YOUNG_COLLECTION = 10_000
"""New container objects between two young collections (Python's default is 700)."""


def _quiet_collector(app: web.Application) -> None:
    """The garbage collector's policy for a serving process (a test process, which makes
    many apps, keeps Python's).

    A forwarded request leaves no reference cycle behind: its objects go as it ends. But
    with a few hundred requests in flight, their live objects alone pass Python's 700
    new objects again and again, and each young collection then walks all of them to find
    nothing (0.4 ms each, every 50 requests at 256 connections); a full one walked every
    object start-up made (25 ms, the bench's p99). So young collections come after 10,000
    new objects, and what start-up made, and then the load of the stored connections, is
    frozen (`gc.freeze`): it lives as long as the process, and no collection walks it.
    """
    gc.set_threshold(_YOUNG_COLLECTION, 10, 10)

    def freeze() -> None:
        gc.collect()  # garbage pending now would be frozen too, never to be collected
        gc.freeze()

    async def settle(app: web.Application) -> AsyncIterator[None]:
        freeze()
        registry = app[RUNTIME].registry

        async def after_load() -> None:
            await registry.loaded.wait()
            freeze()

        task = asyncio.create_task(after_load(), name="freeze")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(settle)


def _supervise(args: argparse.Namespace) -> int:
    """Run `--workers` serve processes on one port (SO_REUSEPORT); pass signals on.

    The workers get signals only from here (their own process group), so a Ctrl-C in a
    terminal reaches each once. A worker that exits on its own stops the others and the
    command fails, so the container's restart policy brings back a full set.
    """
    command = [sys.executable, "-m", "proxy", "serve", "--reuse-port"]
    if args.config:
        command += ["--config", args.config]
    children: list[subprocess.Popen[bytes]] = []
    stopping: list[int] = []

    def forward(signum: int, _: Any) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in range(args.workers):
        if not stopping:
            children.append(subprocess.Popen(command, process_group=0))  # noqa: S603
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not stopping:
        print("cloudbeds-proxy: a worker exited; stopping the others", file=sys.stderr)
        forward(signal.SIGTERM, None)
        stopping.clear()
    codes = [child.wait() for child in children]
    if stopping and all(code == 0 for code in codes):
        return 0
    return next((code for code in codes if code > 0), 1)


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(settings.describe(), indent=2))
    return 0


def _oauth_settings(
    settings: Settings, name: str, *, authorising: bool = True
) -> CredentialSettings:
    cred = settings.credential(name)
    if cred is None or cred.kind is not Kind.OAUTH:
        names = [c.name for c in settings.credentials if c.kind is Kind.OAUTH]
        raise ConfigError(f"--credential: no OAuth credential {name!r}; have: {names or 'none'}")
    if authorising and not cred.redirect_uri:
        raise ConfigError("CBPROXY_REDIRECT_URI: required to authorise (the registered URI)")
    return cred


def _auth_url(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cred = _oauth_settings(settings, args.credential)
    assert cred.client_id is not None  # an OAuth credential always has one (config checks)
    assert cred.redirect_uri is not None  # checked by _oauth_settings
    print(authorize_url(settings.authorize_url, cred.client_id, cred.redirect_uri, ""))
    return 0


def _code_from(text: str) -> str:
    """Accept a bare code or the whole redirect URL the browser landed on."""
    if "://" not in text:
        return text.strip()
    codes = parse_qs(urlsplit(text).query).get("code")
    if not codes:
        raise ConfigError("CODE_OR_REDIRECT_URL: the URL has no code= parameter")
    return codes[0]


@contextlib.asynccontextmanager
async def _credential(
    settings: Settings, name: str, *, authorising: bool
) -> AsyncIterator[tuple[OAuthCredential, aiohttp.ClientSession]]:
    """The credential as a replica sees it (same store, same lock), for one command."""
    if settings.redis_url is None:
        raise ConfigError(
            "CBPROXY_REDIS_URL: the command shares tokens with running proxies through Redis; "
            "without it use the running proxy's /_proxy/oauth/start and /_proxy/tokens"
        )
    cred = _oauth_settings(settings, name, authorising=authorising)
    store = make_store(settings)
    async with aiohttp.ClientSession() as session:
        try:
            credential = OAuthCredential(
                cred, settings, store=store, session=session, metrics=Metrics(), clock=system_clock
            )
            await credential.start()
            yield credential, session
        finally:
            await store.close()


async def _auth_exchange(args: argparse.Namespace) -> int:
    settings = _settings(args)
    code = _code_from(args.code)
    async with _credential(settings, args.credential, authorising=True) as (credential, session):
        record = await exchange_code(session, settings, credential, code)
    print(
        f"authorised {credential.name}: generation {record.generation}, "
        f"properties {', '.join(record.properties) or 'none listed'}"
    )
    return 0


async def _token_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.redis_url is None:
        # Configured credentials live inside the running proxy: ask it. App connections
        # are counted from the state file they share, if there is one.
        url = f"http://{settings.host}:{settings.port}/_proxy/tokens"
        answer = await asyncio.to_thread(_get_json, url)
        shared = await asyncio.to_thread(os.path.isfile, settings.state_file)
        if settings.apps and shared:
            store = make_store(settings)
            try:
                answer["connections"] = await cli_connections.counts(store)
            finally:
                await store.close()
        print(json.dumps(answer, indent=2))
        return 0
    store = make_store(settings)
    out: dict[str, Any] = {}
    try:
        for cred in settings.credentials:
            if cred.kind is Kind.API_KEY:
                out[cred.name] = {"kind": "api_key", "state": "ok"}
                continue
            record = await store.load(cred.name)
            out[cred.name] = {
                "kind": "oauth",
                "state": record.state.value if record else "not_authorized",
                "generation": record.generation if record else None,
                "expires_in": round(record.seconds_left(system_clock()), 1) if record else None,
                "last_refresh": record.refreshed_at if record else None,
            }
        if settings.apps:
            # App connections by app and state: counts, never one line per connection.
            out["connections"] = await cli_connections.counts(store)
    except StoreUnavailable as exc:
        print(f"cloudbeds-proxy: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(json.dumps(out, indent=2))
    return 0


async def _token_refresh(args: argparse.Namespace) -> int:
    settings = _settings(args)
    async with _credential(settings, args.name, authorising=False) as (credential, _):
        record = await credential.refresh_now()
    status = credential.status()
    print(json.dumps({"credential": credential.name, **status}, indent=2))
    return 0 if record is not None and status["state"] == "ok" and not status["last_error"] else 1


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own port
        return json.load(response)


def _fake(args: argparse.Namespace) -> int:
    logs.configure("console")
    state = FakeCloudbeds(
        expires_in=args.expires_in, rotate_refresh_tokens=args.rotate_refresh_tokens
    )
    print(
        f"fake Cloudbeds on http://{args.host}:{args.port} (client id {state.client_id}, "
        f"client secret {state.client_secret}, refresh token {state.refresh_token})",
        flush=True,
    )
    web.run_app(create_fake_app(state), host=args.host, port=args.port, print=None, access_log=None)
    return 0


DEMO_APP = ("demo-partner-client", "demo-partner-secret")


async def _demo(args: argparse.Namespace) -> int:
    """The proxy and a fake Cloudbeds in one process: try it with no Cloudbeds account.

    It serves the fake's own credential (a hotel with its own API credentials) and a
    partner app, `demo`, that properties install: each install link that is followed
    makes a connection for a new property (2001, 2002, ...).
    """
    logs.configure("console")
    fake_state = FakeCloudbeds()
    fake_runner = web.AppRunner(create_fake_app(fake_state))
    await fake_runner.setup()
    site = web.TCPSite(fake_runner, "127.0.0.1", 0)
    await site.start()
    fake_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake = f"http://127.0.0.1:{fake_port}"
    port = args.port if args.port is not None else 8080
    base = f"http://127.0.0.1:{port}"
    fake_state.add_app(*DEMO_APP, f"{base}/_proxy/apps/demo/callback")
    workdir = tempfile.mkdtemp(prefix="cloudbeds-proxy-demo-")
    config = Path(workdir, "demo.toml")
    await asyncio.to_thread(
        config.write_text,
        "[apps.demo]\n"
        f'client_id = "{DEMO_APP[0]}"\nclient_secret = "{DEMO_APP[1]}"\n'
        f'redirect_uri = "{base}/_proxy/apps/demo/callback"\n',
    )
    env = {
        **os.environ,
        "CBPROXY_UPSTREAM_URL": fake,
        "CBPROXY_TOKEN_URL": f"{fake}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{fake}/api/v1.3/oauth",
        "CBPROXY_CLIENT_ID": "fake-client-id",
        "CBPROXY_CLIENT_SECRET": "fake-client-secret",
        "CBPROXY_REFRESH_TOKEN": "fake-refresh-token",
        "CBPROXY_LOG_FORMAT": "console",
        "CBPROXY_PORT": str(port),
        "CBPROXY_ADMIN_TOKEN": "demo-admin-token",
        "CBPROXY_STATE_FILE": str(Path(workdir, "state.db")),
    }
    settings = load_settings(env, str(config))
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    admin = "-H 'Authorization: Bearer demo-admin-token'"
    print(
        f"\nfake Cloudbeds: {fake}\nproxy:          {base}\n\n"
        f"A hotel with its own credential:\n  curl {base}/api/v1.3/getHotels\n\n"
        "A partner app that properties install (open the link in a browser, or):\n"
        f"  curl -sL -H 'Accept: application/json' {base}/_proxy/apps/demo/install\n"
        "then call the API for the new property (the first install is property 2001):\n"
        f"  curl -H 'X-PROPERTY-ID: 2001' {base}/api/v1.3/getHotels\n"
        f"  curl {admin} {base}/_proxy/admin/connections\n\nCtrl-C stops.",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await fake_runner.cleanup()
    return 0
