"""The fake's control surface (`/_fake/state`, `/_fake/control`), routes and app factory."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.fake_cloudbeds import api, extras, oauth
from proxy.fake_cloudbeds.api import Handler
from proxy.fake_cloudbeds.installs import Grant
from proxy.fake_cloudbeds.state import FAKE_STATE, SWITCHES, FakeCloudbeds, state_of

MAX_BODY = 200 * 1024 * 1024
VERSION = r"{version:v1\.[123]}"
_GRANT_ARGS: dict[str, type] = {"client_id": str, "properties": list, "association": str}


async def fake_state(request: web.Request) -> web.Response:
    """GET /_fake/state: switches and counters."""
    return web.json_response(state_of(request).snapshot())


def _args(value: object, types: Mapping[str, type], required: tuple[str, ...]) -> dict[str, Any]:
    """A control action's arguments, checked against `types`. Raises ValueError."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, not {value!r}")  # noqa: TRY004 - a 400
    for key, arg in value.items():
        if key not in types or not isinstance(arg, types[key]):
            raise ValueError(f"unknown argument or bad value {key!r}: {arg!r}")
    if missing := [k for k in required if k not in value]:
        raise ValueError(f"missing {', '.join(missing)}")
    if not all(isinstance(p, str | int) for p in value.get("properties", [])):
        raise ValueError("properties must be a list of ids")
    return value


def _grant(state: FakeCloudbeds, value: object, required: tuple[str, ...] = ()) -> Grant:
    """A Grant from `{"client_id", "properties", "association"}` (each optional)."""
    return state.grant(**_args(value, _GRANT_ARGS, required))


def _add_secret(state: FakeCloudbeds, value: object, name: str) -> str:
    """`add_refresh_token`/`add_api_key`: a bare string, or an object with a grant."""
    if isinstance(value, str):
        return value
    args = dict(_args(value, {name: str, **_GRANT_ARGS}, (name,)))
    secret = args.pop(name)
    grant = state.grant(**args)
    if name == "token":
        state.add_refresh_token(secret, grant)
    else:
        state.add_api_key(secret, grant)
    return ""


def _action(state: FakeCloudbeds, key: str, value: object) -> dict[str, Any]:
    """Run one control action; returns extra answer fields. Raises ValueError."""
    if key == "revoke_all" and value is True:
        state.revoke_all()
    elif key == "add_refresh_token":
        if token := _add_secret(state, value, "token"):
            state.add_refresh_token(token)
    elif key == "add_api_key":
        if api_key := _add_secret(state, value, "key"):
            state.add_api_key(api_key)
    elif key == "issue_code":
        grant = state.grant() if value is True else _grant(state, value)
        return {"code": state.issue_code_for(grant)}
    elif key == "add_app":
        types = {"client_id": str, "client_secret": str, "redirect_uri": str}
        state.add_app(**_args(value, types, tuple(types)))
    elif key == "queue_install":
        state.queue_install(**_args(value, _GRANT_ARGS, ("client_id",)))
    elif key == "marketplace_install":
        return {
            "redirect_url": state.marketplace_install(**_args(value, _GRANT_ARGS, ("client_id",)))
        }
    elif key == "disconnect":
        types = {"client_id": str, "property_id": str}
        return {"disconnected": state.disconnect(**_args(value, types, tuple(types)))}
    else:
        raise ValueError(f"unknown control {key!r} or bad value {value!r}")
    return {}


def _apply_control(state: FakeCloudbeds, changes: object) -> dict[str, Any]:
    """Apply a control object, in order; returns extra fields for the answer."""
    if not isinstance(changes, dict):
        raise ValueError("expected a JSON object")  # noqa: TRY004 - answered as 400
    extra: dict[str, Any] = {}
    for key, value in changes.items():
        if key in SWITCHES and isinstance(value, SWITCHES[key]):
            setattr(state, key, value)
        else:
            extra.update(_action(state, key, value))
    return extra


async def fake_control(request: web.Request) -> web.Response:
    """POST /_fake/control: set switches and run actions from a JSON object."""
    state = state_of(request)
    try:
        extra = _apply_control(state, await request.json())
    except ValueError as exc:
        return web.json_response({"error": "bad_control", "message": str(exc)}, status=400)
    return web.json_response({**state.snapshot(), **extra})


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every Cloudbeds-side request and its incoming X-Request-ID."""
    if not request.path.startswith("/_fake/"):
        state = state_of(request)
        state.requests_seen.append((request.method, request.raw_path))
        if "X-Request-ID" in request.headers:
            state.incoming_request_ids.append(request.headers["X-Request-ID"])
    return await handler(request)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Give every response, errors included, the fake's own X-Request-ID."""
    response.headers["X-Request-ID"] = f"fake-{secrets.token_hex(8)}"


def _routes() -> list[web.AbstractRouteDef]:
    """The route table; each Cloudbeds path under /api/v1.1, v1.2 and v1.3."""
    base = f"/api/{VERSION}"
    return [
        web.post(f"{base}/access_token", oauth.access_token),
        web.get(f"{base}/oauth", oauth.authorize),
        web.get(f"{base}/oauth/metadata", api.oauth_metadata),
        web.get(f"{base}/getHotels", api.get_hotels),
        web.get(f"{base}/getReservations", api.get_reservations),
        web.post(f"{base}/postReservation", api.post_reservation),
        web.post(f"{base}/postGuestDocument", api.post_guest_document),
        web.post(f"{base}/postAppState", api.post_app_state),
        web.get(f"{base}/fake/gzip", extras.fake_gzip),
        web.get(f"{base}/fake/large", extras.fake_large),
        web.route("*", f"{base}/fake/echo", extras.fake_echo),
        web.route("*", f"{base}/fake/echo/{{tail:.*}}", extras.fake_echo),
        web.get("/_fake/state", fake_state),
        web.post("/_fake/control", fake_control),
    ]


def create_fake_app(state: FakeCloudbeds | None = None) -> web.Application:
    """Build the fake Cloudbeds app around `state` (a fresh one if None)."""
    app = web.Application(middlewares=[record], client_max_size=MAX_BODY)
    app[FAKE_STATE] = state if state is not None else FakeCloudbeds()
    app.add_routes(_routes())
    app.on_response_prepare.append(_add_request_id)
    return app
