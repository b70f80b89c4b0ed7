"""The fake's Cloudbeds API: authentication, property checks, the API log, and the handlers."""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import hashlib
import secrets
from typing import Any

from aiohttp import BodyPartReader, web

from proxy.fake_cloudbeds.installs import Grant
from proxy.fake_cloudbeds.state import FakeCloudbeds, state_of

CHUNK = 64 * 1024
WRONG_PROPERTY = "None of the included property id's match the access_token user's property id"

Handler = collections.abc.Callable[[web.Request], collections.abc.Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who an API call authenticated as: the credential presented and what it covers."""

    credential: str
    kind: str
    grant: Grant


CALLER = web.RequestKey("CALLER", Caller)


def _presented(state: FakeCloudbeds, request: web.Request) -> tuple[str, str] | None:
    """(credential, kind) the request presents, if the fake ever issued it; valid keys first."""
    key = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if key in state.valid_api_keys():
        return key, "api_key"
    if state.kind_of(token) == "access_token":
        return token, "access_token"
    if state.kind_of(key) == "api_key":
        return key, "api_key"
    return None


def asked_properties(request: web.Request) -> list[str]:
    """Property ids a request names: `X-PROPERTY-ID`, then `propertyID`/`propertyIDs` query."""
    raw = [request.headers.get("X-PROPERTY-ID", "")]
    raw += [request.query.get("propertyID", ""), request.query.get("propertyIDs", "")]
    return [p.strip() for value in raw for p in value.split(",") if p.strip()]


def _denied(state: FakeCloudbeds, message: str) -> web.Response:
    """Count and answer a 401 in Cloudbeds' shape."""
    state.rejected_calls += 1
    return web.json_response({"error": "access_denied", "message": message}, status=401)


def _check_auth(state: FakeCloudbeds, request: web.Request) -> web.Response | None:
    """None if the request carries a usable credential, else the 401 to send."""
    if request.headers.get("x-api-key", "") in state.valid_api_keys():
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        if "x-api-key" in request.headers:
            return _denied(state, "The resource owner or authorization server denied the request.")
        return _denied(state, "No access token or API key provided")
    status = state.token_status(token.strip())
    if status == "expired":
        state.expired_token_calls += 1
    if status != "valid":
        return _denied(state, f"Access token is {status}")
    return None


def wrong_property(state: FakeCloudbeds) -> web.Response:
    """Count and answer a call for a property the credential does not cover."""
    state.wrong_property_calls += 1
    body = {"success": False, "message": WRONG_PROPERTY}
    return web.json_response(body, status=state.wrong_property_status)


def _log(state: FakeCloudbeds, request: web.Request, caller: Caller | None) -> dict[str, Any]:
    """Append and return this call's `api_log` entry (its `status` is filled in later)."""
    grant = caller.grant if caller is not None else None
    entry: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "client_id": grant.client_id if grant else None,
        "connection": state.label(grant) if grant else None,
        "credential": state.credential_id(caller.credential) if caller else None,
        "kind": caller.kind if caller else None,
        "properties": list(state.covered(grant)) if grant else [],
        "association": grant.association if grant else None,
        "asked": asked_properties(request),
        "status": None,
    }
    state.api_log.append(entry)
    return entry


def _wrap(handler: Handler, *, check_property: bool) -> Handler:
    """Add api_delay, counters, the API log, rate limiting, authentication, property checks."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = state_of(request)
        if state.api_delay:
            await asyncio.sleep(state.api_delay)
        presented = _presented(state, request)
        caller = None
        if presented is not None:
            grant = state.grant_of(presented[0]) or state.grant()
            caller = Caller(presented[0], presented[1], grant)
            state.api_calls_by_client[grant.client_id] += 1
            state.count_call(grant.client_id)
        state.api_calls += 1
        state.per_second[int(state.clock())] += 1
        entry = _log(state, request, caller)
        response = await _answer(state, request, caller, handler, check_property=check_property)
        entry["status"] = response.status
        return response

    return wrapped


async def _answer(
    state: FakeCloudbeds,
    request: web.Request,
    caller: Caller | None,
    handler: Handler,
    *,
    check_property: bool,
) -> web.StreamResponse:
    """Rate limit, authenticate, check properties, then run the handler."""
    if state.rate_limit_next > 0:
        state.rate_limit_next -= 1
        headers = {"Retry-After": str(state.rate_limit_retry_after)}
        body = {"success": False, "message": "rate limited"}
        return web.json_response(body, status=429, headers=headers)
    denied = _check_auth(state, request)
    if denied is not None:
        return denied
    assert caller is not None  # a usable credential is an issued one
    covered = state.covered(caller.grant)
    if check_property and any(p not in covered for p in asked_properties(request)):
        return wrong_property(state)
    request[CALLER] = caller
    return await handler(request)


def api(handler: Handler) -> Handler:
    """A Cloudbeds API handler: authenticated, and only for the properties it covers."""
    return _wrap(handler, check_property=True)


def fake_api(handler: Handler) -> Handler:
    """A fake-only handler: authenticated, any property (fidelity tests send any header)."""
    return _wrap(handler, check_property=False)


def covered(request: web.Request) -> tuple[str, ...]:
    """The property ids the calling credential covers."""
    return state_of(request).covered(request[CALLER].grant)


@api
async def get_hotels(request: web.Request) -> web.StreamResponse:
    """GET .../getHotels: the properties the presenting credential covers."""
    hotels = [_hotel(pid) for pid in covered(request)]
    return web.json_response({"success": True, "data": hotels, "count": len(hotels), "total": 1})


def _hotel(property_id: str) -> dict[str, Any]:
    """One getHotels entry in the real shape (deserialises with the official SDK)."""
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
    """GET .../getReservations: one confirmed reservation per property asked (or covered)."""
    pids = asked_properties(request) or list(covered(request))
    data = [_reservation(pid) for pid in pids]
    return web.json_response(
        {"success": True, "data": data, "count": len(data), "total": len(data)}
    )


def _reservation(property_id: str) -> dict[str, Any]:
    """One getReservations entry."""
    return {
        "propertyID": property_id,
        "reservationID": f"FAKE{property_id}",
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
async def post_app_state(request: web.Request) -> web.StreamResponse:
    """POST .../postAppState: `app_state=disabled` disconnects the app from the property."""
    state, caller = state_of(request), request[CALLER]
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    property_id, app_state = form.get("propertyID", ""), form.get("app_state", "")
    state.app_state_calls.append(
        {
            "client_id": caller.grant.client_id,
            "property_id": property_id,
            "app_state": app_state,
            "credential": state.credential_id(caller.credential),
        }
    )
    if app_state not in {"enabled", "disabled"}:
        body = {"success": False, "message": "app_state must be enabled or disabled"}
        return web.json_response(body, status=400)
    if property_id not in covered(request):
        return wrong_property(state)
    if app_state == "disabled":
        state.disconnect(caller.grant.client_id, property_id)
    return web.json_response({"success": True})


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
    """GET .../oauth/metadata: plain data behind authentication (what the credential covers)."""
    resources = [{"type": "property", "id": pid} for pid in covered(request)]
    return web.json_response({"success": True, "data": {"resources": resources}})
