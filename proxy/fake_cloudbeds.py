"""A fake Cloudbeds API: a real aiohttp app with the real wire formats and failure switches.

Shared by the tests (in process, state inspected directly), the demo command and the
benchmarks (as its own process, driven through `/_fake/state` and `/_fake/control`).

Rules it follows, from the Cloudbeds docs (see shared/DESIGN.md for sources):
- token endpoint: form body with client_id/client_secret; bad client 401 invalid_client,
  bad refresh token 400 invalid_grant, bad code 401 server_error (Cloudbeds' documented shape);
- an authorization code lives 10 minutes and is single use;
- API calls need `Authorization: Bearer <token>` or `x-api-key`; otherwise 401
  `{"error": "access_denied", "message": ...}`;
- every response carries the fake's own `X-Request-ID`.
Requests under `/_fake/` (the control surface) are not recorded in `requests_seen`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import gzip
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import BodyPartReader, web

from proxy.clock import Clock, system_clock

CODE_LIFETIME = 600.0
ECHO_BODY_LIMIT = 1024 * 1024
MAX_BODY = 200 * 1024 * 1024
CHUNK = 64 * 1024
VERSION = r"{version:v1\.[123]}"
_PATTERN = bytes(range(256)) * (CHUNK // 256)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class FakeCloudbeds:
    """State, failure switches and counters of one fake Cloudbeds; tests mutate it freely."""

    clock: Clock = system_clock
    client_id: str = "fake-client-id"
    client_secret: str = "fake-client-secret"
    refresh_token: str = "fake-refresh-token"
    api_key: str = "cbat_fake_api_key"
    expires_in: int = 3600
    redirect_uri: str = "https://localhost/callback"
    properties: tuple[str, ...] = ("1001",)
    rotate_refresh_tokens: bool = False
    # switches
    token_failures: int = 0
    token_delay: float = 0.0
    reject_refresh: bool = False
    api_delay: float = 0.0
    rate_limit_next: int = 0
    rate_limit_retry_after: int = 3
    # counters
    token_calls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    api_calls: int = 0
    expired_token_calls: int = 0
    rejected_calls: int = 0
    requests_seen: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    incoming_request_ids: list[str] = dataclasses.field(default_factory=list)
    per_second: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    # private state
    _access_tokens: dict[str, float] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )
    _revoked: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _refresh_tokens: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _codes: dict[str, float] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        """Make the starting refresh token valid."""
        self._refresh_tokens.add(self.refresh_token)

    def issue_code(self) -> str:
        """Return a new authorization code, valid 10 minutes by `clock`, single use."""
        code = f"fake-code-{secrets.token_hex(8)}"
        self._codes[code] = self.clock() + CODE_LIFETIME
        return code

    def add_refresh_token(self, token: str) -> None:
        """Make one more refresh token valid."""
        self._refresh_tokens.add(token)

    def revoke_all(self) -> None:
        """Make every access token issued so far answer 401 access_denied."""
        self._revoked.update(self._access_tokens)

    def mint_access_token(self) -> str:
        """Issue an access token without a token call (expires at clock() + expires_in)."""
        token = f"fake-access-{secrets.token_urlsafe(16)}"
        self._access_tokens[token] = self.clock() + self.expires_in
        return token

    def valid_access_tokens(self) -> list[str]:
        """Access tokens the API accepts right now."""
        return [t for t in self._access_tokens if self.token_status(t) == "valid"]

    def valid_refresh_tokens(self) -> set[str]:
        """Refresh tokens the token endpoint accepts (ignoring `reject_refresh`)."""
        return set(self._refresh_tokens)

    def token_status(self, token: str) -> str:
        """One of `valid`, `expired` (issued, now past expiry), `revoked`, `unknown`."""
        expires_at = self._access_tokens.get(token)
        if expires_at is None:
            return "unknown"
        if self.clock() >= expires_at:
            return "expired"
        return "revoked" if token in self._revoked else "valid"

    def snapshot(self) -> dict[str, Any]:
        """Switches and counters as JSON-ready data (for `/_fake/state`)."""
        data = {k: getattr(self, k) for k in _SWITCHES}
        data.update(
            token_calls=dict(self.token_calls),
            api_calls=self.api_calls,
            expired_token_calls=self.expired_token_calls,
            rejected_calls=self.rejected_calls,
            requests_seen=[list(r) for r in self.requests_seen],
            incoming_request_ids=list(self.incoming_request_ids),
            per_second={str(k): v for k, v in self.per_second.items()},
            valid_access_tokens=len(self.valid_access_tokens()),
        )
        return data


_SWITCHES: dict[str, type | tuple[type, ...]] = {
    "expires_in": int,
    "token_failures": int,
    "token_delay": (int, float),
    "reject_refresh": bool,
    "rotate_refresh_tokens": bool,
    "api_delay": (int, float),
    "rate_limit_next": int,
    "rate_limit_retry_after": int,
}

FAKE_STATE = web.AppKey("FAKE_STATE", FakeCloudbeds)


def _state(request: web.Request) -> FakeCloudbeds:
    """The FakeCloudbeds behind this request's app."""
    return request.app[FAKE_STATE]


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    """An OAuth-style error body as the token endpoint sends it."""
    return web.json_response({"error": error, "error_description": description}, status=status)


def _token_body(state: FakeCloudbeds, refresh_token: str) -> dict[str, Any]:
    """A successful token response in Cloudbeds' shape."""
    return {
        "access_token": state.mint_access_token(),
        "token_type": "Bearer",
        "expires_in": state.expires_in,
        "refresh_token": refresh_token,
        "resources": [{"type": "property", "id": pid} for pid in state.properties],
    }


def _refresh_grant(state: FakeCloudbeds, form: dict[str, str]) -> web.Response:
    """Answer the refresh_token grant."""
    token = form.get("refresh_token", "")
    if state.reject_refresh or token not in state._refresh_tokens:
        return _oauth_error(400, "invalid_grant", "Invalid refresh token")
    if state.rotate_refresh_tokens:
        state._refresh_tokens.discard(token)
        token = f"fake-refresh-{secrets.token_hex(8)}"
        state.add_refresh_token(token)
    return web.json_response(_token_body(state, token))


def _code_grant(state: FakeCloudbeds, form: dict[str, str]) -> web.Response:
    """Answer the authorization_code grant; a code is consumed by any attempt."""
    expires_at = state._codes.pop(form.get("code", ""), None)
    if expires_at is None or state.clock() >= expires_at:
        return _oauth_error(401, "server_error", "Invalid, used or expired authorization code")
    if form.get("redirect_uri") != state.redirect_uri:
        return _oauth_error(401, "server_error", "redirect_uri does not match")
    token = f"fake-refresh-{secrets.token_hex(8)}"
    state.add_refresh_token(token)
    return web.json_response(_token_body(state, token))


async def access_token(request: web.Request) -> web.Response:
    """POST .../access_token: the OAuth token endpoint."""
    state = _state(request)
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    grant = form.get("grant_type", "")
    state.token_calls[grant] += 1
    if state.token_delay:
        await asyncio.sleep(state.token_delay)
    if state.token_failures > 0:
        state.token_failures -= 1
        return web.json_response({"success": False, "message": "fake transient error"}, status=500)
    if (form.get("client_id"), form.get("client_secret")) != (state.client_id, state.client_secret):
        return _oauth_error(401, "invalid_client", "Invalid client_id or client_secret")
    if grant == "refresh_token":
        return _refresh_grant(state, form)
    if grant == "authorization_code":
        return _code_grant(state, form)
    return _oauth_error(400, "unsupported_grant_type", f"Unsupported grant_type {grant!r}")


async def authorize(request: web.Request) -> web.Response:
    """GET .../oauth: an authorize page that approves at once and redirects with a code."""
    state, query = _state(request), request.query
    if query.get("client_id") != state.client_id or query.get("redirect_uri") != state.redirect_uri:
        return _oauth_error(400, "invalid_request", "Unknown client_id or redirect_uri")
    params = {"code": state.issue_code()}
    if "state" in query:
        params["state"] = query["state"]
    sep = "&" if "?" in state.redirect_uri else "?"
    raise web.HTTPFound(f"{state.redirect_uri}{sep}{urlencode(params)}")


def _denied(state: FakeCloudbeds, message: str) -> web.Response:
    """Count and answer a 401 in Cloudbeds' shape."""
    state.rejected_calls += 1
    return web.json_response({"error": "access_denied", "message": message}, status=401)


def _check_auth(state: FakeCloudbeds, request: web.Request) -> web.Response | None:
    """None if the request carries a usable credential, else the 401 to send."""
    if request.headers.get("x-api-key") == state.api_key:
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return _denied(state, "No access token or API key provided")
    status = state.token_status(token.strip())
    if status == "expired":
        state.expired_token_calls += 1
    if status != "valid":
        return _denied(state, f"Access token is {status}")
    return None


def api(handler: Handler) -> Handler:
    """Wrap an API handler with api_delay, counters, rate limiting and authentication."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = _state(request)
        if state.api_delay:
            await asyncio.sleep(state.api_delay)
        state.api_calls += 1
        state.per_second[int(state.clock())] += 1
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            headers = {"Retry-After": str(state.rate_limit_retry_after)}
            body = {"success": False, "message": "rate limited"}
            return web.json_response(body, status=429, headers=headers)
        denied = _check_auth(state, request)
        return denied if denied is not None else await handler(request)

    return wrapped


@api
async def get_hotels(request: web.Request) -> web.StreamResponse:
    """GET .../getHotels in the real shape (deserialises with the official SDK)."""
    hotels = [_hotel(pid) for pid in _state(request).properties]
    return web.json_response({"success": True, "data": hotels, "count": len(hotels), "total": 1})


def _hotel(property_id: str) -> dict[str, Any]:
    """One getHotels entry."""
    return {
        "propertyID": property_id,
        "organizationID": "1",
        "propertyName": "Fake Hotel",
        "propertyImage": "https://example.com/fake-hotel.jpg",
        "propertyDescription": "A hotel that only exists in tests.",
        "propertyTimezone": "America/New_York",
        "propertyCurrency": [
            {"currencyCode": "USD", "currencySymbol": "$", "currencyPosition": "before"}
        ],
    }


@api
async def get_reservations(request: web.Request) -> web.StreamResponse:
    """GET .../getReservations: one confirmed reservation per property."""
    data = [
        {
            "propertyID": pid,
            "reservationID": f"FAKE{pid}",
            "dateCreated": "2024-01-01 12:00:00",
            "dateModified": "2024-01-02 12:00:00",
            "status": "confirmed",
            "guestID": "42",
            "guestName": "Ada Lovelace",
            "startDate": "2024-02-01",
            "endDate": "2024-02-03",
            "adults": "2",
            "children": "0",
            "balance": 0,
            "sourceName": "Website",
            "sourceID": "s-1",
        }
        for pid in _state(request).properties
    ]
    return web.json_response(
        {"success": True, "data": data, "count": len(data), "total": len(data)}
    )


@api
async def post_reservation(request: web.Request) -> web.StreamResponse:
    """POST .../postReservation (form-encoded) answering the real success shape."""
    form = await request.post()
    field = {k: v for k, v in form.items() if isinstance(v, str)}.get
    body = {
        "success": True,
        "reservationID": f"FAKE{secrets.randbelow(10**9)}",
        "status": "confirmed",
        "guestID": "42",
        "guestFirstName": field("guestFirstName", ""),
        "guestLastName": field("guestLastName", ""),
        "guestGender": field("guestGender", "N/A"),
        "guestEmail": field("guestEmail", ""),
        "startDate": field("startDate", "2024-02-01"),
        "endDate": field("endDate", "2024-02-03"),
        "dateCreated": "2024-01-01 12:00:00",
        "grandTotal": 200,
        "unassigned": [],
    }
    return web.json_response(body)


@api
async def post_guest_document(request: web.Request) -> web.StreamResponse:
    """POST .../postGuestDocument: hash the multipart file part while streaming it."""
    reader = await request.multipart()
    result: dict[str, Any] = {}
    while (part := await reader.next()) is not None:
        if isinstance(part, BodyPartReader) and part.filename is not None:
            result = await _digest_part(part)
        elif isinstance(part, BodyPartReader):
            await part.release()
    if not result:
        return web.json_response({"success": False, "message": "file is required"})
    return web.json_response({"success": True, "data": result})


async def _digest_part(part: BodyPartReader) -> dict[str, Any]:
    """Size and sha256 of one multipart part, read in chunks."""
    digest, size = hashlib.sha256(), 0
    while chunk := await part.read_chunk(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest(), "filename": part.filename}


@api
async def oauth_metadata(request: web.Request) -> web.StreamResponse:
    """GET .../oauth/metadata: plain data behind authentication."""
    state = _state(request)
    resources = [{"type": "property", "id": pid} for pid in state.properties]
    return web.json_response({"success": True, "data": {"resources": resources}})


@api
async def fake_gzip(request: web.Request) -> web.StreamResponse:
    """GET .../fake/gzip: a JSON body the fake compressed itself."""
    payload = json.dumps({"success": True, "data": {"compressed": True}}).encode()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=gzip.compress(payload), headers=headers)


def large_body(size: int) -> bytes:
    """What `.../fake/large?bytes=size` sends: byte i is i % 256."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@api
async def fake_large(request: web.Request) -> web.StreamResponse:
    """GET .../fake/large?bytes=N: N deterministic bytes, streamed in chunks."""
    try:
        size = int(request.query.get("bytes", "0"))
    except ValueError:
        size = -1
    if not 0 <= size <= 4 * 1024**3:
        return web.json_response({"success": False, "message": "bad bytes"}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    try:
        for start in range(0, size, CHUNK):
            await response.write(_PATTERN[: min(CHUNK, size - start)])
    except ConnectionError:  # the reader went away, as readers do
        return response
    await response.write_eof()
    return response


@api
async def fake_echo(request: web.Request) -> web.StreamResponse:
    """Any method .../fake/echo[/...]: what arrived, exactly, with the body streamed."""
    digest, size, kept = hashlib.sha256(), 0, bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if size < ECHO_BODY_LIMIT:
            kept += chunk
    body = base64.b64encode(kept).decode() if size < ECHO_BODY_LIMIT else None
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": headers,
            "body_length": size,
            "body_sha256": digest.hexdigest(),
            "body_base64": body,
        }
    )


async def fake_state(request: web.Request) -> web.Response:
    """GET /_fake/state: switches and counters."""
    return web.json_response(_state(request).snapshot())


def _apply_control(state: FakeCloudbeds, changes: object) -> dict[str, Any]:
    """Apply a control object; returns extra fields for the answer. Raises ValueError."""
    if not isinstance(changes, dict):
        raise ValueError("expected a JSON object")  # noqa: TRY004 - answered as 400
    extra: dict[str, Any] = {}
    for key, value in changes.items():
        if key in _SWITCHES and isinstance(value, _SWITCHES[key]):
            setattr(state, key, value)
        elif key == "revoke_all" and value is True:
            state.revoke_all()
        elif key == "add_refresh_token" and isinstance(value, str):
            state.add_refresh_token(value)
        elif key == "issue_code" and value is True:
            extra["code"] = state.issue_code()
        else:
            raise ValueError(f"unknown control {key!r} or bad value {value!r}")
    return extra


async def fake_control(request: web.Request) -> web.Response:
    """POST /_fake/control: set switches and run actions from a JSON object."""
    state = _state(request)
    try:
        extra = _apply_control(state, await request.json())
    except ValueError as exc:
        return web.json_response({"error": "bad_control", "message": str(exc)}, status=400)
    return web.json_response({**state.snapshot(), **extra})


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every Cloudbeds-side request and its incoming X-Request-ID."""
    if not request.path.startswith("/_fake/"):
        state = _state(request)
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
        web.post(f"{base}/access_token", access_token),
        web.get(f"{base}/oauth", authorize),
        web.get(f"{base}/oauth/metadata", oauth_metadata),
        web.get(f"{base}/getHotels", get_hotels),
        web.get(f"{base}/getReservations", get_reservations),
        web.post(f"{base}/postReservation", post_reservation),
        web.post(f"{base}/postGuestDocument", post_guest_document),
        web.get(f"{base}/fake/gzip", fake_gzip),
        web.get(f"{base}/fake/large", fake_large),
        web.route("*", f"{base}/fake/echo", fake_echo),
        web.route("*", f"{base}/fake/echo/{{tail:.*}}", fake_echo),
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
