"""`cloudbeds-proxy connections list|show|import|delete|refresh|migrate`: the admin API's
operations from a terminal, on the store the running proxies use.

Rules (DESIGN.md, "Many properties"):

- The work is `proxy.connections` and `proxy.admin.listing`, the same code as the admin
  API's, so the answers and the stable error codes are the same.
- One command makes at most the one credential it needs: the registry runs one-shot
  (`proxy.registry`), nothing refreshes in the background, and `refresh` goes through the
  connection's lock and compare-and-set like a replica's refresh.
- Secrets never on the command line, where `ps` shows them: from a file or stdin. Nothing
  printed holds a secret: stdout is the connection's public view as one JSON document,
  logs (warnings and worse, redacted) go to stderr.
- Without Redis the store is the state file, which must already exist: a mistyped
  CBPROXY_STATE_FILE would otherwise create an empty store that no proxy reads.
- Input is checked before the store is opened; an error is one line (`proxy.cli.main`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from proxy import admin, logs
from proxy.app import credential_factory, make_limiter, make_store
from proxy.clock import system_clock
from proxy.config import CONNECTION_ID, ConfigError, Settings, load_settings
from proxy.connections import Connections
from proxy.errors import InvalidConnection, RecordUnreadable
from proxy.logs import register_secret
from proxy.metrics import Metrics
from proxy.registry import Registry
from proxy.store import TokenStore
from proxy.tokens import TokenRecord

Command = Callable[[argparse.Namespace, TokenStore, Connections], Awaitable[dict[str, Any]]]
_SECRET_FLAGS = {
    "refresh_token_file": ("--refresh-token-file", "refresh_token"),
    "refresh_token_stdin": ("--refresh-token-stdin", "refresh_token"),
    "api_key_file": ("--api-key-file", "api_key"),
    "api_key_stdin": ("--api-key-stdin", "api_key"),
}
_PAGE = 500


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The `connections` command and its actions, under the CLI's subparsers."""
    actions = sub.add_parser(
        "connections", help="list, show, import, delete, refresh or migrate connections"
    ).add_subparsers(required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="list connections as JSON")
    listing.add_argument("--app", help="only this app's connections")
    listing.add_argument("--property", dest="prop", help="only connections covering it")
    listing.add_argument(
        "--state", help="ok, reauthorization_required, disconnected or store_unreadable"
    )
    listing.add_argument("--limit", type=int, default=100, help="per page, 1 to 500")
    listing.add_argument("--cursor", help="next_cursor of the previous page")
    listing.add_argument("--all", action="store_true", help="follow the cursor to the end")
    listing.set_defaults(func=_runner(_list))

    def one(name: str, command: Command, text: str) -> argparse.ArgumentParser:
        action: argparse.ArgumentParser = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("id", metavar="ID")
        action.set_defaults(func=_runner(command))
        return action

    one("show", _show, "print one connection")
    imports = one("import", _import, "create or replace a connection from a secret")
    one("delete", _delete, "disconnect a connection (tells Cloudbeds if the app says so)")
    one("refresh", _refresh, "refresh an OAuth connection now, through its lock")
    one("migrate", _migrate, "move an OAuth connection to an API key, once")
    imports.add_argument("--app", required=True, help="the [apps.NAME] it belongs to")
    imports.add_argument("--refresh-token-file", metavar="F", help="file holding a refresh token")
    imports.add_argument("--api-key-file", metavar="F", help="file holding an API key (cbat_…)")
    imports.add_argument("--refresh-token-stdin", action="store_true", help="read it from stdin")
    imports.add_argument("--api-key-stdin", action="store_true", help="read it from stdin")
    imports.add_argument(
        "--property",
        dest="properties",
        action="append",
        default=[],
        metavar="P",
        help="a property id it covers (repeat for several)",
    )
    imports.add_argument("--metadata", metavar="JSON", help='a JSON object, like {"crm": 7}')
    imports.set_defaults(prepare=_import_body)


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = load_settings(os.environ, args.config)
        # Warnings reach stderr after a command that succeeded (a postAppState that failed);
        # a failed command prints only its error line, which says what they would.
        held = io.StringIO()
        logs.configure(settings.log_format, stream=held, level=logging.WARNING)
        if hasattr(args, "id") and not CONNECTION_ID.fullmatch(args.id):
            raise InvalidConnection("ID: a connection id uses 1 to 128 of A-Z a-z 0-9 . _ -")
        prepare = getattr(args, "prepare", None)
        if prepare is not None:
            args.body = prepare(args)
        _require_store(settings)
        document = asyncio.run(_run(settings, command, args))
        sys.stderr.write(held.getvalue())
        print(json.dumps(document, indent=2))
        return 0

    return run


def _require_store(settings: Settings) -> None:
    if settings.redis_url is None and not Path(settings.state_file).is_file():
        raise ConfigError(
            f"CBPROXY_STATE_FILE: no state file at {settings.state_file}; set it to the file "
            "the proxy uses (the proxy creates it at start), or set CBPROXY_REDIS_URL"
        )


async def _run(settings: Settings, command: Command, args: argparse.Namespace) -> dict[str, Any]:
    async with one_shot(settings) as made:
        return await command(args, made.store, made.connections)


@dataclasses.dataclass(frozen=True)
class OneShot:
    """What one command works with: nothing in it runs in the background."""

    store: TokenStore
    registry: Registry
    connections: Connections


@contextlib.asynccontextmanager
async def one_shot(settings: Settings) -> AsyncIterator[OneShot]:
    """The store, registry and `Connections` for one command, built as a replica's are."""
    for secret in settings.secrets():
        register_secret(secret, configured=True)
    store, metrics, clock = make_store(settings), Metrics(), system_clock
    try:
        async with aiohttp.ClientSession() as session:
            limiter = make_limiter(settings, store, metrics, clock)
            make = credential_factory(
                settings, store, session=session, limiter=limiter, metrics=metrics, clock=clock
            )
            registry = Registry(settings, store, make, metrics, clock, one_shot=True)
            try:
                connections = Connections(settings, store, session, registry, limiter, clock=clock)
                yield OneShot(store, registry, connections)
            finally:
                await registry.stop(settings.token_timeout)
    finally:
        await store.close()


async def _view(store: TokenStore, name: str, record: TokenRecord) -> dict[str, Any]:
    (view,) = await admin.views(store, [(name, record)])
    return view


async def _list(args: argparse.Namespace, store: TokenStore, _: Connections) -> dict[str, Any]:
    query = {"app": args.app, "prop": args.prop, "state": args.state, "limit": args.limit}
    found, following = await admin.listing(store, cursor=args.cursor or None, **query)
    while args.all and following is not None:
        more, following = await admin.listing(store, cursor=following, **query)
        found += more
    return {"connections": found, "next_cursor": following}


async def _show(args: argparse.Namespace, store: TokenStore, conns: Connections) -> dict[str, Any]:
    return {"connection": await _view(store, args.id, await conns.get(args.id))}


async def _delete(
    args: argparse.Namespace, store: TokenStore, conns: Connections
) -> dict[str, Any]:
    return {"connection": await _view(store, args.id, await conns.delete(args.id))}


async def _refresh(
    args: argparse.Namespace, store: TokenStore, conns: Connections
) -> dict[str, Any]:
    return {"connection": await _view(store, args.id, await conns.refresh(args.id))}


async def _migrate(
    args: argparse.Namespace, store: TokenStore, conns: Connections
) -> dict[str, Any]:
    return {"connection": await _view(store, args.id, await conns.migrate(args.id))}


async def _import(
    args: argparse.Namespace, store: TokenStore, conns: Connections
) -> dict[str, Any]:
    record, created = await conns.put(args.id, args.body)
    view = await _view(store, args.id, record)
    return {"result": "created" if created else "replaced", "connection": view}


def _import_body(args: argparse.Namespace) -> dict[str, Any]:
    """The admin API's `PUT` body, from the flags; the secret from its file or stdin."""
    given = [dest for dest in _SECRET_FLAGS if getattr(args, dest)]
    if len(given) != 1:
        names = ", ".join(flag for flag, _ in _SECRET_FLAGS.values())
        raise InvalidConnection(f"give exactly one of {names}")
    dest = given[0]
    flag, field = _SECRET_FLAGS[dest]
    secret = sys.stdin.read() if dest.endswith("_stdin") else _read(flag, getattr(args, dest))
    secret = secret.strip()
    if not secret:
        raise InvalidConnection(f"{flag}: empty; it must hold the {field.replace('_', ' ')}")
    body: dict[str, Any] = {"app": args.app, field: secret}
    if args.properties:
        body["properties"] = args.properties
    if args.metadata is not None:
        body["metadata"] = _metadata(args.metadata)
    return body


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None


def _metadata(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidConnection(f"--metadata: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidConnection('--metadata: must be a JSON object, like {"crm": 7}')
    return value


async def counts(store: TokenStore) -> dict[str, dict[str, int]]:
    """How many connections each app has in each state (for `token status`); records that
    cannot be read count under `(unreadable)`, a name no app can have."""
    found: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    cursor: str | None = None
    while True:
        pairs, cursor = await store.page(cursor=cursor, limit=_PAGE)
        for _, record in pairs:
            if isinstance(record, RecordUnreadable):
                found["(unreadable)"]["store_unreadable"] += 1
            elif record.app is not None:
                found[record.app][record.state.value] += 1
        if cursor is None:
            return {app: dict(sorted(states.items())) for app, states in sorted(found.items())}
