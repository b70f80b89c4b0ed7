"""The admin API, `/_proxy/admin/connections`: list, show, import, edit, delete, refresh, migrate.

Rules (DESIGN.md, "Many properties"):
- Every call carries `Authorization: Bearer <CBPROXY_ADMIN_TOKEN>`, compared in constant
  time; without one configured the API answers 403 `admin_disabled`, with a wrong or
  missing token 401 `admin_unauthorized`.
- A connection is shown as its public view (never a secret); `GET` pages with `?limit=`
  (at most 500) and `?cursor=`, filtered by `?app=`, `?property=` and `?state=`. A page
  may hold fewer than `limit` connections when a filter drops some: follow `next_cursor`
  until it is null.
- A page reads its own connections only (one page of the store's id index, then their
  records in one round trip), never every record: `GET` costs the same at any number of
  connections.
- The work itself is `proxy.connections`; handlers parse, authorise and shape answers.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import web

from proxy.config import CONNECTION_ID
from proxy.errors import AdminDisabled, AdminUnauthorized, InvalidConnection, RecordUnreadable
from proxy.runtime import RUNTIME, Runtime
from proxy.store import TokenStore
from proxy.tokens import State, TokenRecord

MAX_LIMIT = 500
PREFIX = "/_proxy/admin/connections"


def _runtime(request: web.Request) -> Runtime:

    runtime = request.app[RUNTIME]
    token = runtime.settings.admin_token
    if not token:
        raise AdminDisabled("the admin API is off: set CBPROXY_ADMIN_TOKEN to turn it on")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise AdminUnauthorized("send Authorization: Bearer <CBPROXY_ADMIN_TOKEN>")
    return runtime


Listed = TokenRecord | RecordUnreadable
"""A listed connection: its record, or the error that its stored record cannot be read."""


async def views(store: TokenStore, pairs: list[tuple[str, Listed]]) -> list[dict[str, Any]]:
    """Public views of connections, with their last-used times; an unreadable one says so."""
    used = await store.last_used([name for name, _ in pairs])
    return [
        {"id": name, "state": "store_unreadable", "error": record.message}
        if isinstance(record, RecordUnreadable)
        else record.view(name, used.get(name))
        for name, record in pairs
    ]


async def listing(
    store: TokenStore,
    *,
    app: str | None = None,
    prop: str | None = None,
    state: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of connection views and the next page's cursor (the API's and the CLI's)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidConnection(f"limit: a whole number from 1 to {MAX_LIMIT}")
    states = [*(s.value for s in State), "store_unreadable"]
    if state is not None and state not in states:
        raise InvalidConnection(f"state: one of {', '.join(states)}")
    pairs: list[tuple[str, Listed]]
    if prop is not None:
        names = [n for n in await store.covering(prop) if cursor is None or n > cursor]
        chosen = names[:limit]
        following = chosen[-1] if len(names) > limit else None
        found = await store.load_many(chosen)  # one round trip for the page
        pairs = [(name, found[name]) for name in chosen if name in found]
    else:
        pairs, following = await store.page(app=app, cursor=cursor, limit=limit)
    pairs = [(n, r) for n, r in pairs if _matches(r, app, state)]
    return await views(store, pairs), following


def _matches(record: Listed, app: str | None, state: str | None) -> bool:
    if isinstance(record, RecordUnreadable):
        return state in (None, "store_unreadable")
    return (app is None or record.app == app) and (state is None or record.state.value == state)


async def _answer(
    runtime: Runtime, name: str, record: TokenRecord, status: int = 200
) -> web.Response:
    (view,) = await views(runtime.store, [(name, record)])
    return web.json_response({"connection": view}, status=status)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isdigit():
        raise InvalidConnection(f"limit: a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


async def list_connections(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    query = request.query
    found, following = await listing(
        runtime.store,
        app=query.get("app"),
        prop=query.get("property"),
        state=query.get("state"),
        cursor=query.get("cursor") or None,
        limit=_limit(request),
    )
    return web.json_response({"connections": found, "next_cursor": following})


def _id(request: web.Request) -> str:
    name = request.match_info["id"]
    if not CONNECTION_ID.fullmatch(name):
        raise InvalidConnection("a connection id uses 1 to 128 of A-Z a-z 0-9 . _ -")
    return name


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise InvalidConnection("the body is not valid JSON") from None


async def show(request: web.Request) -> web.Response:
    runtime, name = _runtime(request), _id(request)
    return await _answer(runtime, name, await runtime.connections.get(name))


async def put(request: web.Request) -> web.Response:
    runtime, name = _runtime(request), _id(request)
    record, created = await runtime.connections.put(name, await _json(request))
    return await _answer(runtime, name, record, 201 if created else 200)


async def patch(request: web.Request) -> web.Response:
    runtime, name = _runtime(request), _id(request)
    return await _answer(runtime, name, await runtime.connections.patch(name, await _json(request)))


async def delete(request: web.Request) -> web.Response:
    runtime, name = _runtime(request), _id(request)
    await runtime.connections.delete(name)
    return web.Response(status=204)


async def refresh(request: web.Request) -> web.Response:
    runtime, name = _runtime(request), _id(request)
    return await _answer(runtime, name, await runtime.connections.refresh(name))


async def migrate(request: web.Request) -> web.Response:
    runtime, name = _runtime(request), _id(request)
    return await _answer(runtime, name, await runtime.connections.migrate(name))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(PREFIX, list_connections)
    one = PREFIX + "/{id}"
    router.add_get(one, show)
    router.add_put(one, put)
    router.add_patch(one, patch)
    router.add_delete(one, delete)
    router.add_post(one + "/refresh", refresh)
    router.add_post(one + "/migrate-to-api-key", migrate)
