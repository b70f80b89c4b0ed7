"""Pure rules for what may be forwarded, and how headers change on the way.

Rules:
- The request target must be origin-form (`/path?query`) and is forwarded byte for byte.
  Absolute-form, `//host`, `..` or `.` segments, backslashes and control characters,
  raw or percent-encoded, are refused: the proxy only ever talks to its upstream.
- Paths that mint credentials (`…/access_token`, the authorize page `…/oauth`) are
  refused, so no caller can get or see a token through the proxy.
- Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and what it lists, `Keep-Alive`,
  `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are dropped both ways.
- Upstream, `Host` is the upstream's, the caller's `Authorization` and `x-api-key` (a
  caller token, when callers are configured) are replaced by the credential, the routing
  headers `X-Cloudbeds-Connection`, `X-Cloudbeds-Credential` and `X-Cloudbeds-App`
  (addressed to the proxy) and
  `Expect` (the proxy already answered it; forwarded, the client would wait for a
  `100 Continue` that may never come) are dropped, and `X-Request-ID` carries the
  request's id: the caller's, or a new one when it sent none or an unusable one.
- Header bytes pass unchanged or not at all: bytes that are not UTF-8 are refused (the
  HTTP library underneath writes header text as UTF-8 and would re-encode them).
- An upstream answer's head has a budget (a count and a total size; Cloudbeds sends a
  few KiB): past it the answer is refused, not relayed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

from multidict import CIMultiDict

from proxy.errors import (
    CredentialEndpointBlocked,
    ForbiddenTarget,
    InvalidHeaderBytes,
    UpstreamInvalidResponse,
)

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
CONNECTION_SELECTORS = ("X-Cloudbeds-Connection", "X-Cloudbeds-Credential")
APP_SELECTOR = "X-Cloudbeds-App"
ROUTING_HEADERS = frozenset(h.lower() for h in (*CONNECTION_SELECTORS, APP_SELECTOR))
REQUEST_ID = "X-Request-ID"
_DROPPED_UPSTREAM = CREDENTIAL_HEADERS | ROUTING_HEADERS | {"host", "expect"}
# `#`: a fragment never reaches a server, so a client did not send it; yarl would cut it
# off after the checks below, hiding what follows it (`/access_token#`).
_RAW_CONTROL = re.compile(r"[\x00-\x20\x7f\\#]")
_ENCODED_CONTROL = re.compile(r"%(?:[01][0-9a-f]|7f|5c)", re.IGNORECASE)
_MINTING_SEGMENTS = frozenset({"access_token", "oauth"})


def check_target(method: str, raw_target: str) -> None:
    """Raise unless `raw_target` is a safe origin-form target for the upstream."""
    if method.upper() == "CONNECT":
        raise ForbiddenTarget("CONNECT is not supported: the proxy only forwards to Cloudbeds")
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise ForbiddenTarget(
            "the request target must be a path such as /api/v1.3/getHotels; "
            "the proxy only forwards to its configured upstream"
        )
    path = raw_target.split("?", 1)[0]
    # Raw, they are never valid in a target; encoded, they are data in a query (a note
    # with a line break) but never part of a path.
    if _RAW_CONTROL.search(raw_target) or _ENCODED_CONTROL.search(path):
        raise ForbiddenTarget("the request target holds a control character, a backslash or a '#'")
    # A `%2F` is split too: a server that decodes it before routing would see `a/../b`.
    # (A path without `%` is its own decoding: split once.)
    if "%" in path:
        segments = [part for s in path.split("/")[1:] for part in unquote(s).split("/")]
    else:
        segments = path.split("/")[1:]
    if "." in segments or ".." in segments:
        raise ForbiddenTarget("the path holds a '.' or '..' segment; send the resolved path")
    named = [s for s in segments if s]
    if named and named[-1].lower() in _MINTING_SEGMENTS:
        raise CredentialEndpointBlocked(
            "the proxy manages Cloudbeds tokens itself; callers cannot reach the token "
            "endpoint or the authorize page through it (see /_proxy/oauth/start)"
        )


def _dropped_by_connection(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    listed = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(listed)


def _is_hop_by_hop(name: str, dropped: frozenset[str]) -> bool:
    lowered = name.lower()
    return lowered in dropped or lowered.startswith("proxy-")


def _kept(raw: list[tuple[str, str]], direction: int) -> list[int]:
    """The positions of the headers that go on: upstream (0) or back to the caller (1)."""
    dropped = _dropped_by_connection(raw)
    return [
        i
        for i, (name, _) in enumerate(raw)
        if not _is_hop_by_hop(name, dropped)
        and (direction or name.lower() not in _DROPPED_UPSTREAM)
    ]


def upstream_headers(
    raw: Iterable[tuple[str, str]], credential: tuple[str, str], request_id: str
) -> CIMultiDict[str]:
    """The headers to send upstream: the caller's, minus hop-by-hop, plus the credential."""
    raw = list(raw)
    out = CIMultiDict([raw[i] for i in _kept(raw, 0)])
    out[credential[0]] = credential[1]
    out[REQUEST_ID] = request_id
    return out


def downstream_headers(raw: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream response's headers for the caller, minus hop-by-hop."""
    raw = list(raw)
    return CIMultiDict([raw[i] for i in _kept(raw, 1)])


RawHeaders = tuple[tuple[bytes, bytes], ...]
_Plan = tuple[tuple[int, ...], tuple[bytes, ...], tuple[tuple[int, str], ...]]
"""For one sequence of header names: the positions of its `Connection` headers, their
values, and the (position, name) of each header kept."""
_plans: tuple[dict[tuple[bytes, ...], _Plan], dict[tuple[bytes, ...], _Plan]] = ({}, {})
"""Plans by header names, upstream and downstream: callers and Cloudbeds send the same few
sets of names over and over, so the rules above run once per set, not once per request."""
_PLANS_MAX = 256
"""Names are the sender's choice: past this many sets, a new one is planned but not kept."""


def upstream_headers_of(
    raw: RawHeaders, credential: tuple[str, str], request_id: str
) -> CIMultiDict[str]:
    """`upstream_headers(decode_raw(raw), …)`, planned once per set of header names."""
    out = CIMultiDict([(name, raw[i][1].decode("utf-8")) for i, name in _plan(raw, 0)])
    out[credential[0]] = credential[1]
    out[REQUEST_ID] = request_id
    return out


def downstream_headers_of(raw: RawHeaders) -> CIMultiDict[str]:
    """`downstream_headers(decode_raw(raw))`, planned once per set of header names."""
    return CIMultiDict([(name, raw[i][1].decode("utf-8")) for i, name in _plan(raw, 1)])


def _plan(raw: RawHeaders, direction: int) -> tuple[tuple[int, str], ...]:
    """The (position, name) of each header of `raw` that goes on; refuses bytes not UTF-8."""
    values = b"\n".join([v for _, v in raw])  # valid UTF-8 joined iff each one is
    if not values.isascii():
        decode_raw(raw)  # raises InvalidHeaderBytes for the first header that is not UTF-8
    names = tuple([k for k, _ in raw])
    plans = _plans[direction]
    plan = plans.get(names)
    if plan is not None and tuple([raw[i][1] for i in plan[0]]) == plan[1]:
        return plan[2]
    text = decode_raw(raw)
    listed = [i for i, (name, _) in enumerate(text) if name.lower() == "connection"]
    kept = tuple([(i, text[i][0]) for i in _kept(text, direction)])
    plan = (tuple(listed), tuple([raw[i][1] for i in listed]), kept)
    if len(plans) < _PLANS_MAX or names in plans:
        plans[names] = plan
    return plan[2]


def decode_raw(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """aiohttp's raw headers as text, case and order kept; refuses bytes that are not UTF-8.

    aiohttp writes header text as UTF-8, so UTF-8 bytes go out as they came in; any other
    byte (latin-1 `e9`) would go out re-encoded (`c3a9`), so it is refused instead.
    """
    try:
        return [(k.decode("utf-8"), v.decode("utf-8")) for k, v in raw]
    except UnicodeDecodeError:
        raise InvalidHeaderBytes(
            "a header holds bytes that are not UTF-8 (latin-1, say); the proxy passes "
            "header bytes unchanged or not at all: send them as UTF-8 or percent-encoded"
        ) from None


def check_answer_head(raw: Iterable[tuple[bytes, bytes]], max_bytes: int, max_count: int) -> None:
    """Raise unless the upstream answer's headers fit the budget (count and total size)."""
    count = size = 0
    for name, value in raw:
        count += 1
        size += len(name) + len(value) + 4  # ": " and CRLF, as on the wire
    if count > max_count or size > max_bytes:
        raise UpstreamInvalidResponse(
            f"Cloudbeds answered {count} headers, {size} bytes: over the proxy's limit "
            f"(CBPROXY_MAX_RESPONSE_HEADERS={max_count}, "
            f"CBPROXY_MAX_RESPONSE_HEADER_BYTES={max_bytes}); retry later"
        )
