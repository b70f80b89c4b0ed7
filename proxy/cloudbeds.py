"""The Cloudbeds token endpoint, sans-I/O: build the request, decode the answer.

`POST {token_url}`, form-encoded, `client_id` and `client_secret` in the body, no auth
header (Cloudbeds OpenAPI spec, `cloudbeds-pms-v1-3`). Grants: `refresh_token` and
`authorization_code` (+ `redirect_uri`, `code`). Success is
`{access_token, token_type, expires_in, refresh_token, resources: [{type, id}]}`.
A 4xx with an OAuth error body (`{"error": "invalid_request", ...}`, what Cloudbeds answers
a revoked refresh token) is permanent: the refresh token or client needs a human. A 4xx
without one (an HTML page, an empty body: a load balancer's, not Cloudbeds' verdict) is
`TokenEndpointUnrecognised`, transient with a long backoff and an alert; 408 and 429 say
"later" by definition. A 5xx, a timeout or an answer we cannot read (no usable access
token, an `expires_in` outside (0, one year], a malformed field) is transient. Every field
is validated here, once. `send_token_request` is the only I/O here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from proxy.errors import (
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenEndpointUnrecognised,
    TokenRejected,
)

_TRANSIENT_4XX = frozenset({408, 429})
_MAX_LIFETIME = 366 * 24 * 3600
_MAX_TOKEN_CHARS = 4096
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A property or group id: it becomes part of a connection id, a key and a URL path."""
_MAX_RESOURCES = 10_000
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
    key = _token(_json_object(body).get("access_token"))
    if key is None:
        raise TokenEndpointUnavailable("token endpoint answered 200 without a usable API key")
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

    Every field is checked here, once: what leaves is a token that fits in a header, a
    lifetime in (0, one year], property ids that are short text. `secrets` (what the
    request sent) are masked in the error text, should Cloudbeds echo one.
    """
    data = _json_object(body)
    if 400 <= status < 500 and status not in _TRANSIENT_4XX:
        raise _refusal(status, data, secrets)
    if status != 200:
        raise TokenEndpointUnavailable(f"token endpoint answered HTTP {status}", status=status)
    access_token = _token(data.get("access_token"))
    if access_token is None:
        raise TokenEndpointUnavailable("token endpoint answered 200 without a usable access_token")
    token_type = data.get("token_type")
    if token_type is not None and (
        not isinstance(token_type, str) or token_type.lower() != "bearer"
    ):
        raise TokenEndpointUnavailable("token endpoint answered a token_type other than Bearer")
    refresh = data.get("refresh_token")
    refresh_token = _token(refresh)
    if refresh not in (None, "") and refresh_token is None:
        raise TokenEndpointUnavailable("token endpoint answered an unusable refresh_token")
    return TokenResponse(
        access_token=access_token,
        expires_in=_lifetime(data.get("expires_in")),
        refresh_token=refresh_token,
        properties=_resources(data.get("resources"), "property"),
        associations=_resources(data.get("resources"), "association"),
    )


def _refusal(status: int, data: dict[str, Any], secrets: Iterable[str]) -> TokenEndpointError:
    """A 4xx with an OAuth error body is Cloudbeds' verdict; one without is not."""
    error = data.get("error")
    if not isinstance(error, str) or not _printable(error):
        # An HTML page or an empty body: a load balancer or gateway spoke, not the OAuth
        # server. Locking the credential until a human acts would be worse than waiting.
        return TokenEndpointUnrecognised(
            f"token endpoint answered HTTP {status} without an OAuth error body", status=status
        )
    description = data.get("error_description") or data.get("message")
    text = _printable(description) if isinstance(description, str) else ""
    reason = f"{_printable(error)[:100]}: {text[:200]}".rstrip(": ")
    for secret in secrets:
        if secret:
            reason = reason.replace(secret, "[redacted]")
    return TokenRejected(reason, status=status)


def _printable(text: str) -> str:
    """The text with anything but printable characters dropped (it goes into log lines)."""
    return "".join(c for c in text if c.isprintable()).strip()


def _token(value: Any) -> str | None:
    """A token as it may go into a header: visible ASCII, at most _MAX_TOKEN_CHARS."""
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TOKEN_CHARS:
        return None
    return value if all("!" <= c <= "~" for c in value) else None


def _lifetime(value: Any) -> float:
    # An int is compared as an int: float() of a 400-digit one raises OverflowError.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TokenEndpointUnavailable("token endpoint answered without a usable expires_in")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise TokenEndpointUnavailable(
                "token endpoint answered a non-numeric expires_in"
            ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenEndpointUnavailable("token endpoint answered a non-finite expires_in")
    if not 0 < value <= _MAX_LIFETIME:
        # Born expired, it would be refreshed in a tight loop; beyond a year, it is not a
        # lifetime Cloudbeds gives (an hour; eight reported) and would overflow clocks.
        raise TokenEndpointUnavailable(
            f"token endpoint answered an expires_in outside (0, {_MAX_LIFETIME}] seconds"
        )
    return float(value)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        return {}
    return data if isinstance(data, dict) else {}


def _resources(resources: Any, kind: str) -> tuple[str, ...]:
    """Ids of the `resources` entries of `kind` (property or association), each checked."""
    if resources is None:
        return ()
    if not isinstance(resources, list) or len(resources) > _MAX_RESOURCES:
        raise TokenEndpointUnavailable("token endpoint answered unusable resources")
    ids = []
    for resource in resources:
        if not isinstance(resource, dict) or resource.get("type") != kind:
            continue
        ident = resource.get("id")
        if isinstance(ident, int) and not isinstance(ident, bool) and ident >= 0:
            ident = str(ident)
        if not isinstance(ident, str) or not _ID.fullmatch(ident):
            raise TokenEndpointUnavailable(
                f"token endpoint answered a resource ({kind}) without a usable id"
            )
        ids.append(ident)
    return tuple(ids)


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
