"""The proxy's own endpoints under `/_proxy/`: small handlers over explicit checks.

`healthz` is liveness and touches nothing. `readyz` checks the store and every configured
credential (connections of apps are counted by state, not checked: one property that must
re-authorise does not take the fleet out of service). Its cost does not grow with the
number of connections: the counts are the registry's, kept as credentials change. A store
that answers late (`StoreBusy`) is reported but does not fail readiness: requests never
wait for the store. Readiness does not wait for the background load of the stored
connections either: while it runs, a request for a connection not loaded yet is looked up
in the store (`Registry.find`); `load` in the answer says how far it is. `status` is the
same at a glance: counts by app and state, the configured credentials in full, the load,
and where to page through the connections themselves (the admin API); it never lists them.
`tokens` shows state, never a secret. `oauth/start` and `oauth/callback` bootstrap a
configured OAuth credential (Cloudbeds quickstart, steps 3 and 4); `apps/{app}/install`
and `apps/{app}/callback` make connections of an app. A `state` is issued here, kept in
the store (single use, 10 minutes) and bound to what it authorises; a callback with any
other state is refused before any token call. A callback with no state (or the app's
`marketplace_state`) is a Cloudbeds Marketplace install.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import os
import secrets
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import cloudbeds
from proxy.config import DEFAULT_CREDENTIAL, Kind, Settings
from proxy.coordinator import OAuthCredential
from proxy.errors import (
    AuthorizationFailed,
    InvalidState,
    ProxyError,
    StoreBusy,
    StoreUnavailable,
    TokenEndpointError,
)
from proxy.runtime import RUNTIME, Runtime
from proxy.tokens import TokenRecord


def _runtime(request: web.Request) -> Runtime:

    return request.app[RUNTIME]


async def healthz(request: web.Request) -> web.Response:
    # The pid tells `--workers` processes apart; liveness reads nothing else.
    return web.json_response({"status": "alive", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    checks: dict[str, dict[str, Any]] = {}
    if runtime.store.shared:
        try:
            await runtime.store.ping()
            checks["store"] = {"ok": True, "detail": "reachable"}
        except StoreBusy as exc:  # slow, not gone: requests do not wait for the store
            checks["store"] = {"ok": True, "detail": exc.message}
        except StoreUnavailable as exc:
            checks["store"] = {"ok": False, "detail": exc.message}
    else:
        checks["store"] = {"ok": True, "detail": "in-process"}
    connections = runtime.registry.connections
    for cred in runtime.settings.credentials:
        ok, detail = connections[cred.name].ready()
        checks[f"credential:{cred.name}"] = {"ok": ok, "detail": detail}
    ready = all(check["ok"] for check in checks.values())
    body = {
        "ready": ready,
        "checks": checks,
        "connections": _counts(runtime),
        "load": runtime.registry.progress.view(_now()),
    }
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """The replica at a glance; one connection's detail is the admin API's, paged."""
    runtime = _runtime(request)
    connections = runtime.registry.connections
    credentials = {
        cred.name: {
            **connections[cred.name].status(),
            "rate_limit": runtime.limiter.describe(cred.budget),
        }
        for cred in runtime.settings.credentials
    }
    body = {
        "load": runtime.registry.progress.view(_now()),
        "connections": _counts(runtime),
        "credentials": credentials,
        "listing": "GET /_proxy/admin/connections?limit=&cursor= (admin token; ?app=, "
        "?property=, ?state= narrow it; follow next_cursor)",
    }
    return web.json_response(body)


def _counts(runtime: Runtime) -> dict[str, dict[str, int]]:
    """Connections of apps by app and state: the registry's counts, not a loop over them."""
    counts: dict[str, dict[str, int]] = {}
    for (app, state), count in sorted(runtime.registry.counts().items()):
        counts.setdefault(app, {})[state] = count
    return counts


def _now() -> float:
    return asyncio.get_running_loop().time()


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_runtime(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tokens(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    return web.json_response(
        {
            cred.name: {
                **runtime.registry.connections[cred.name].status(),
                "rate_limit": runtime.limiter.describe(cred.budget),
            }
            for cred in runtime.settings.credentials
        }
    )


def _oauth_credential(request: web.Request, name: str) -> OAuthCredential:
    runtime = _runtime(request)
    credential = runtime.registry.connections.get(name)
    if not isinstance(credential, OAuthCredential) or credential.settings.app is not None:
        names = [c.name for c in runtime.settings.credentials if c.kind is Kind.OAUTH]
        raise AuthorizationFailed(
            f"no OAuth credential named {name[:64]!r}; "
            f"OAuth credentials: {', '.join(names) or 'none'}"
        )
    if not credential.settings.redirect_uri:
        raise AuthorizationFailed(
            f"credential {name!r} has no redirect URI: set CBPROXY_REDIRECT_URI (or redirect_uri "
            "in its [credentials] table) to the HTTPS address that reaches /_proxy/oauth/callback"
        )
    return credential


def authorize_url(authorize_base: str, client_id: str, redirect_uri: str, state: str) -> str:
    query = {"client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code"}
    if state:
        query["state"] = state
    return f"{authorize_base}?{urlencode(query)}"


async def oauth_start(request: web.Request) -> web.Response:
    name = request.query.get("credential", DEFAULT_CREDENTIAL)
    credential = _oauth_credential(request, name)
    state = secrets.token_urlsafe(24)
    await _runtime(request).store.save_state(state, {"credential": name})
    settings = credential.settings
    assert settings.client_id is not None
    assert settings.redirect_uri is not None
    target = authorize_url(
        _runtime(request).settings.authorize_url, settings.client_id, settings.redirect_uri, state
    )
    return web.Response(status=302, headers={"Location": target})


def _code(request: web.Request, start: str) -> str:
    query = request.query
    if "error" in query:
        raise AuthorizationFailed(
            f"Cloudbeds did not authorise: {query['error'][:100]}; start again at {start}"
        )
    code = query.get("code", "")
    if not code or len(code) > 4096:
        raise AuthorizationFailed(f"no authorization code in the callback; start at {start}")
    return code


async def _take_state(request: web.Request, state: str, start: str) -> dict[str, str]:
    issued = await _runtime(request).store.take_state(state) if 0 < len(state) <= 128 else None
    if issued is None:
        raise InvalidState(
            "this callback's state was not issued here, was used already or is older than 10 "
            f"minutes; start again at {start}"
        )
    return issued


async def oauth_callback(request: web.Request) -> web.Response:
    start = "/_proxy/oauth/start"
    code = _code(request, start)
    issued = await _take_state(request, request.query.get("state", ""), start)
    credential = _oauth_credential(request, issued.get("credential", ""))
    runtime = _runtime(request)
    record = await exchange_code(runtime.session, runtime.settings, credential, code)
    page = (
        f"<h1>Authorised</h1><p>Credential <b>{html.escape(credential.name)}</b> now has a token "
        f"(generation {record.generation}) for properties "
        f"{html.escape(', '.join(record.properties) or 'none listed')}.</p>"
    )
    return web.Response(text=_page("Authorised", page), content_type="text/html")


async def app_install(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    app = runtime.connections.app(request.match_info["app"])
    state = secrets.token_urlsafe(24)
    await runtime.store.save_state(state, {"app": app.name})
    target = authorize_url(runtime.settings.authorize_url, app.client_id, app.redirect_uri, state)
    return web.Response(status=302, headers={"Location": target})


async def app_callback(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    app = runtime.connections.app(request.match_info["app"])
    start = f"/_proxy/apps/{app.name}/install"
    code = _code(request, start)
    state = request.query.get("state", "")
    marketplace = not state or (
        app.marketplace_state is not None
        and hmac.compare_digest(state.encode(), app.marketplace_state.encode())
    )
    if not marketplace:
        issued = await _take_state(request, state, start)
        if issued.get("app") != app.name:
            raise InvalidState(f"this state was issued for another app; start again at {start}")
    name, record, event = await runtime.connections.install(app, code)
    view = record.view(name)
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"connection": view})
    what = "reconnected" if event.value != "connection.created" else "connected"
    page = (
        f"<h1>Connected</h1><p>{html.escape(app.name)} is {what}: connection "
        f"<b>{html.escape(name)}</b> for properties "
        f"{html.escape(', '.join(record.properties))}.</p>"
    )
    return web.Response(text=_page("Connected", page), content_type="text/html")


async def exchange_code(
    session: aiohttp.ClientSession, settings: Settings, credential: OAuthCredential, code: str
) -> TokenRecord:
    """Exchange an authorization code and store the tokens (the callback and the CLI)."""
    cred = credential.settings
    assert cred.client_id is not None
    assert cred.client_secret is not None
    assert cred.redirect_uri is not None
    form = cloudbeds.code_form(cred.client_id, cred.client_secret, cred.redirect_uri, code)
    try:
        response = await cloudbeds.send_token_request(
            session, settings.token_url, form, settings.token_timeout
        )
    except TokenEndpointError as exc:
        raise AuthorizationFailed(
            f"Cloudbeds refused the authorization code ({exc.reason}). A code is valid for "
            "10 minutes and only once: start again at /_proxy/oauth/start"
        ) from None
    return await credential.install(response)


async def not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound


def wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def error_page(exc: ProxyError) -> str:
    return _page(
        "Authorisation failed", f"<h1>Authorisation failed</h1><p>{html.escape(exc.message)}</p>"
    )


def _page(title: str, body: str) -> str:
    return f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"
