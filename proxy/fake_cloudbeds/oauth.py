"""The fake's token endpoint (`.../access_token`) and authorize page (`.../oauth`)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.fake_cloudbeds.installs import Grant
from proxy.fake_cloudbeds.state import FakeCloudbeds, state_of

API_KEY_GRANT = "urn:ietf:params:oauth:grant-type:api-key"
EXCHANGE_GRANT = "refresh_token_exchange"


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    """An OAuth-style error body as the token endpoint sends it."""
    return web.json_response({"error": error, "error_description": description}, status=status)


def _refresh_error(state: FakeCloudbeds, form: dict[str, str]) -> web.Response | None:
    """None if the form's refresh token may be used by its client, else the error to send."""
    token = form.get("refresh_token", "")
    grant = state.grant_of(token)
    if state.refresh_status(token) == "disconnected" and not state.reject_refresh:
        # "Connecting and disconnecting apps": the documented answer after a disconnect.
        body = {"error": "invalid_request", "message": "The refresh token is invalid."}
        return web.json_response(body, status=400)
    valid = state.refresh_status(token) == "valid"
    if (
        state.reject_refresh
        or not valid
        or grant is None
        or grant.client_id != form.get("client_id")
    ):
        return _oauth_error(400, "invalid_grant", "Invalid refresh token")
    return None


def _token_body(state: FakeCloudbeds, grant: Grant, refresh_token: str) -> dict[str, Any]:
    """A successful token response in Cloudbeds' shape."""
    return {
        "access_token": state.mint_access_token(grant),
        "token_type": "Bearer",
        "expires_in": state.expires_in,
        "refresh_token": refresh_token,
        "resources": state.resources(grant),
    }


def _refresh_grant(state: FakeCloudbeds, form: dict[str, str]) -> web.Response:
    """Answer the refresh_token grant; it revokes an API key migrated from this token."""
    error = _refresh_error(state, form)
    if error is not None:
        return error
    token = form["refresh_token"]
    grant = state.grant_of(token)
    assert grant is not None  # checked by _refresh_error
    state.refreshed(token)
    if state.rotate_refresh_tokens:
        token = state.rotate(token)
    return web.json_response(_token_body(state, grant, token))


def _exchange_grant(state: FakeCloudbeds, form: dict[str, str]) -> web.Response:
    """Answer refresh_token_exchange: an API key covering what the refresh token covers."""
    error = _refresh_error(state, form)
    if error is not None:
        return error
    return web.json_response({"access_token": state.migrate(form["refresh_token"])})


def _code(state: FakeCloudbeds, form: dict[str, str]) -> Grant | web.Response:
    """The Grant of the form's code for the form's app, or the 401 server_error to send."""
    grant = state.take_code(form.get("code", ""))
    if grant is None or grant.client_id != form.get("client_id"):
        return _oauth_error(401, "server_error", "Invalid, used or expired authorization code")
    app = state.app(grant.client_id)
    if app is None or form.get("redirect_uri") != app.redirect_uri:
        return _oauth_error(401, "server_error", "redirect_uri does not match")
    return grant


def _code_grant(state: FakeCloudbeds, form: dict[str, str]) -> web.Response:
    """Answer the authorization_code grant; a code is consumed by any attempt."""
    grant = _code(state, form)
    if isinstance(grant, web.Response):
        return grant
    return web.json_response(_token_body(state, grant, state.mint_refresh_token(grant)))


def _api_key_grant(state: FakeCloudbeds, form: dict[str, str]) -> web.Response:
    """Answer the API-key grant (automatic delivery): a new key for the code's grant."""
    grant = _code(state, form)
    if isinstance(grant, web.Response):
        return grant
    return web.json_response({"access_token": state.mint_api_key(grant)})


_GRANTS = {
    "refresh_token": _refresh_grant,
    "authorization_code": _code_grant,
    API_KEY_GRANT: _api_key_grant,
    EXCHANGE_GRANT: _exchange_grant,
}


async def access_token(request: web.Request) -> web.Response:
    """POST .../access_token: the token endpoint; every call spends its client id's budget."""
    state = state_of(request)
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    grant, client_id = form.get("grant_type", ""), form.get("client_id", "")
    state.token_calls[grant] += 1
    state.token_calls_by_client[client_id][grant] += 1
    state.count_call(client_id, token=True)
    if state.token_delay:
        await asyncio.sleep(state.token_delay)
    if state.token_failures > 0:
        state.token_failures -= 1
        return web.json_response({"success": False, "message": "fake transient error"}, status=500)
    app = state.app(client_id)
    if app is None or form.get("client_secret") != app.client_secret:
        return _oauth_error(401, "invalid_client", "Invalid client_id or client_secret")
    answer = _GRANTS.get(grant)
    if answer is None:
        return _oauth_error(400, "unsupported_grant_type", f"Unsupported grant_type {grant!r}")
    return answer(state, form)


async def authorize(request: web.Request) -> web.Response:
    """GET .../oauth: approves at once and redirects to the app's redirect URI with a code."""
    state, query = state_of(request), request.query
    app = state.app(query.get("client_id"))
    if app is None or query.get("redirect_uri") != app.redirect_uri:
        return _oauth_error(400, "invalid_request", "Unknown client_id or redirect_uri")
    raise web.HTTPFound(state.redirect_url(state.next_install(app.client_id), query.get("state")))
