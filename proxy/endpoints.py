"""The proxy's own endpoints under `/_proxy/`: small handlers over explicit checks.

`healthz` is liveness and touches nothing. `readyz` checks the store and every
credential. `tokens` shows state, never a secret. `oauth/start` and `oauth/callback`
bootstrap an OAuth credential (Cloudbeds quickstart, steps 3 and 4).
"""

from __future__ import annotations

import html
import os
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import cloudbeds
from proxy.config import DEFAULT_CREDENTIAL, Kind, Settings
from proxy.coordinator import OAuthCredential
from proxy.errors import BadRequest, ProxyError, StoreUnavailable, TokenEndpointError
from proxy.tokens import TokenRecord

if TYPE_CHECKING:
    from proxy.app import Runtime

STATE_COOKIE = "cbproxy_oauth_state"


class AuthorizationFailed(BadRequest):
    code = "authorization_failed"


def _runtime(request: web.Request) -> Runtime:
    from proxy.app import RUNTIME  # noqa: PLC0415 - app imports this module

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
        except StoreUnavailable as exc:
            checks["store"] = {"ok": False, "detail": exc.message}
    else:
        checks["store"] = {"ok": True, "detail": "in-process"}
    for name, credential in runtime.credentials.items():
        ok, detail = credential.ready()
        checks[f"credential:{name}"] = {"ok": ok, "detail": detail}
    ready = all(check["ok"] for check in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_runtime(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tokens(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    return web.json_response(
        {
            name: {**credential.status(), "rate_limit": runtime.limiter.describe(name)}
            for name, credential in runtime.credentials.items()
        }
    )


def _oauth_credential(request: web.Request, name: str) -> OAuthCredential:
    runtime = _runtime(request)
    credential = runtime.credentials.get(name)
    if not isinstance(credential, OAuthCredential):
        names = [n for n, c in runtime.credentials.items() if c.settings.kind is Kind.OAUTH]
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
    state = f"{name}.{secrets.token_urlsafe(16)}"
    settings = credential.settings
    assert settings.client_id is not None
    assert settings.redirect_uri is not None
    target = authorize_url(
        _runtime(request).settings.authorize_url, settings.client_id, settings.redirect_uri, state
    )
    # Returned, not raised, so the cookie goes with it; a returned HTTPException is deprecated.
    response = web.Response(status=302, headers={"Location": target})
    response.set_cookie(STATE_COOKIE, state, max_age=600, httponly=True, samesite="Lax")
    return response


async def oauth_callback(request: web.Request) -> web.Response:
    query = request.query
    if "error" in query:
        raise AuthorizationFailed(
            f"Cloudbeds did not authorise: {query['error'][:100]}; "
            "start again at /_proxy/oauth/start"
        )
    state, code = query.get("state", ""), query.get("code", "")
    if not code:
        raise AuthorizationFailed(
            "no authorization code in the callback; start at /_proxy/oauth/start"
        )
    if not state or request.cookies.get(STATE_COOKIE) != state:
        raise AuthorizationFailed(
            "this callback does not match an authorisation started here (state mismatch); "
            "start again at /_proxy/oauth/start in the same browser"
        )
    credential = _oauth_credential(request, state.split(".", 1)[0])
    runtime = _runtime(request)
    record = await exchange_code(runtime.session, runtime.settings, credential, code)
    page = (
        f"<h1>Authorised</h1><p>Credential <b>{html.escape(credential.name)}</b> now has a token "
        f"(generation {record.generation}) for properties "
        f"{html.escape(', '.join(record.properties) or 'none listed')}.</p>"
    )
    response = web.Response(text=_page("Authorised", page), content_type="text/html")
    response.del_cookie(STATE_COOKIE)
    return response


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
