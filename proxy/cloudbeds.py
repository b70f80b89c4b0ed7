"""The Cloudbeds token endpoint, sans-I/O: build the request, decode the answer.

`POST {token_url}`, form-encoded, `client_id` and `client_secret` in the body, no auth
header (Cloudbeds OpenAPI spec, `cloudbeds-pms-v1-3`). Grants: `refresh_token` and
`authorization_code` (+ `redirect_uri`, `code`). Success is
`{access_token, token_type, expires_in, refresh_token, resources: [{type, id}]}`.
Any 4xx is permanent (the refresh token or client needs a human), except 408 and 429, which
say "later" by definition; a 5xx, a timeout or an answer we cannot read (no access token,
no positive, finite `expires_in`) is transient. `send_token_request` is the only I/O here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from proxy.errors import TokenEndpointUnavailable, TokenRejected

_TRANSIENT_4XX = frozenset({408, 429})
_SECRET_FIELDS = ("client_secret", "refresh_token", "code")


@dataclasses.dataclass(frozen=True)
class TokenResponse:
    access_token: str = dataclasses.field(repr=False)
    expires_in: float
    refresh_token: str | None = dataclasses.field(repr=False)
    properties: tuple[str, ...]
    associations: tuple[str, ...] = ()


def refresh_form(client_id: str, client_secret: str, refresh_token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "client_id": client_id,
        "client_secret": client_secret,
        "refresh_token": refresh_token,
    }


def code_form(client_id: str, client_secret: str, redirect_uri: str, code: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "client_id": client_id,
        "client_secret": client_secret,
        "redirect_uri": redirect_uri,
        "code": code,
    }


API_KEY_GRANT = "urn:ietf:params:oauth:grant-type:api-key"


def api_key_form(
    client_id: str, client_secret: str, redirect_uri: str, code: str
) -> dict[str, str]:
    """A code exchanged for a static API key (an app with `delivery = "api_key"`)."""
    return {**code_form(client_id, client_secret, redirect_uri, code), "grant_type": API_KEY_GRANT}


def exchange_form(client_id: str, client_secret: str, refresh_token: str) -> dict[str, str]:
    """An OAuth connection's refresh token exchanged for an API key (one way)."""
    return {
        **refresh_form(client_id, client_secret, refresh_token),
        "grant_type": "refresh_token_exchange",
    }


def app_state_form(property_id: str, state: str) -> dict[str, str]:
    """`POST /api/v1.3/postAppState`: tell Cloudbeds the app is `disabled` for a property."""
    return {"propertyID": property_id, "app_state": state}


def decode_api_key_response(status: int, body: bytes, *, secrets: Iterable[str] = ()) -> str:
    """The `cbat_` key of an API-key grant (`{"access_token": "cbat_..."}`), or the error."""
    if status != 200:
        decode_token_response(status, body, secrets=secrets)  # raises the right error
    key = _json_object(body).get("access_token")
    if not isinstance(key, str) or not key:
        raise TokenEndpointUnavailable("token endpoint answered 200 without an API key")
    return key


def hotel_ids(status: int, body: bytes) -> tuple[str, ...]:
    """Property ids from a `getHotels` answer (`{"success": true, "data": [{"propertyID"}]}`)."""
    data = _json_object(body)
    hotels = data.get("data")
    if status != 200 or data.get("success") is not True or not isinstance(hotels, list):
        return ()
    ids = (h.get("propertyID") for h in hotels if isinstance(h, dict))
    return tuple(str(i) for i in ids if isinstance(i, str | int) and not isinstance(i, bool))


def decode_token_response(
    status: int, body: bytes, *, secrets: Iterable[str] = ()
) -> TokenResponse:
    """Turn the endpoint's answer into a TokenResponse or raise a TokenEndpointError.

    `secrets` (what the request sent) are masked in the error text, should Cloudbeds echo one.
    """
    data = _json_object(body)
    if 400 <= status < 500 and status not in _TRANSIENT_4XX:
        error = str(data.get("error", "unknown_error"))[:100]
        description = str(data.get("error_description") or data.get("message") or "")[:200]
        reason = f"{error}: {description}".rstrip(": ")
        for secret in secrets:
            if secret:
                reason = reason.replace(secret, "[redacted]")
        raise TokenRejected(reason, status=status)
    if status != 200:
        raise TokenEndpointUnavailable(f"token endpoint answered HTTP {status}", status=status)
    access_token, expires_in = data.get("access_token"), data.get("expires_in")
    if not isinstance(access_token, str) or not access_token:
        raise TokenEndpointUnavailable("token endpoint answered 200 without an access_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | str):
        raise TokenEndpointUnavailable("token endpoint answered without a usable expires_in")
    try:
        lifetime = float(expires_in)
    except ValueError:
        raise TokenEndpointUnavailable("token endpoint answered a non-numeric expires_in") from None
    if not math.isfinite(lifetime) or lifetime <= 0:
        # A token that is born expired would be refreshed in a tight loop; never trust it.
        raise TokenEndpointUnavailable("token endpoint answered a non-positive expires_in")
    refresh = data.get("refresh_token")
    return TokenResponse(
        access_token=access_token,
        expires_in=lifetime,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        properties=_resources(data.get("resources"), "property"),
        associations=_resources(data.get("resources"), "association"),
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _resources(resources: Any, kind: str) -> tuple[str, ...]:
    if not isinstance(resources, list):
        return ()
    return tuple(
        str(r["id"])
        for r in resources
        if isinstance(r, dict) and r.get("type") == kind and "id" in r
    )


async def send_token_request(
    session: aiohttp.ClientSession, url: str, form: Mapping[str, str], timeout: float
) -> TokenResponse:
    """POST the form to the token endpoint and decode a token pair."""
    status, body = await post_form(session, url, form, timeout)
    return decode_token_response(status, body, secrets=sent_secrets(form))


async def send_api_key_request(
    session: aiohttp.ClientSession, url: str, form: Mapping[str, str], timeout: float
) -> str:
    """POST the form to the token endpoint and decode an API key."""
    status, body = await post_form(session, url, form, timeout)
    return decode_api_key_response(status, body, secrets=sent_secrets(form))


def sent_secrets(form: Mapping[str, str]) -> list[str]:
    return [form[k] for k in _SECRET_FIELDS if k in form]


async def post_form(
    session: aiohttp.ClientSession, url: str, form: Mapping[str, str], timeout: float
) -> tuple[int, bytes]:
    """POST a form to the token endpoint; aiohttp errors become TokenEndpointUnavailable."""
    return await call(session, "POST", url, timeout=timeout, form=form)


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout: float,
    form: Mapping[str, str] | None = None,
    header: tuple[str, str] | None = None,
) -> tuple[int, bytes]:
    """One call to Cloudbeds made by the proxy itself (token endpoint, getHotels,
    postAppState): (status, body). aiohttp errors become TokenEndpointUnavailable."""
    headers = dict([header]) if header else None
    try:
        async with session.request(
            method,
            url,
            data=dict(form) if form is not None else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            return response.status, await response.read()
    except TimeoutError:
        raise TokenEndpointUnavailable(f"Cloudbeds timed out after {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        # str(exc) may hold the URL but never the form; name only the error class.
        raise TokenEndpointUnavailable(f"Cloudbeds unreachable ({type(exc).__name__})") from None
