"""The proxy's own errors. Each maps to one HTTP status and one stable code.

    ProxyError
    ├── BadRequest (400 bad_request)
    │   ├── ForbiddenTarget (400 forbidden_target)       SSRF attempts, odd paths
    │   ├── ConnectionRequired (400 connection_required) no route and no default
    │   ├── InvalidConnection (400 invalid_connection)   bad admin input
    │   ├── UnknownApp (400 unknown_app)
    │   ├── InvalidState (400 invalid_state)             an install state not issued here
    │   ├── AuthorizationFailed (400 authorization_failed)
    │   ├── BodyIncomplete (400 body_incomplete)      body stalled or its framing broke
    │   └── InvalidHeaderBytes (400 invalid_header_bytes)  header bytes that are not UTF-8
    ├── CallerUnauthorized (401 caller_unauthorized)
    ├── AdminUnauthorized (401 admin_unauthorized)
    ├── CredentialEndpointBlocked (403 credential_endpoint_blocked)
    ├── ConnectionForbidden (403 connection_forbidden)
    ├── AdminDisabled (403 admin_disabled)
    ├── NotFound (404 not_found)
    │   ├── UnknownConnection (404 unknown_connection)
    │   └── UnknownProperty (404 unknown_property)
    ├── AmbiguousProperty (409 ambiguous_property)
    ├── ConnectionDisconnected (410 connection_disconnected)
    ├── BodyTooLarge (413 body_too_large)
    ├── RateLimited (429 rate_limited)
    ├── UpstreamUnreachable (502 upstream_unreachable)
    ├── UpstreamInvalidResponse (502 upstream_invalid_response)  unreadable or oversized head
    ├── NoUsableToken (503 no_usable_token)
    │   └── ReauthorizationRequired (503 reauthorization_required)
    ├── StoreUnavailable (503 store_unavailable)
    │   ├── StoreBusy (503 store_busy)               it answers, but not in time: a pool
    │   │                                            wait or a command timed out
    │   └── WriteNotReplicated (503 write_not_replicated)  the master took it, no replica did
    ├── RecordUnreadable (503 record_unreadable)      wrong encryption key, corruption
    └── UpstreamTimeout (504 upstream_timeout)

    TokenEndpointError                                    not an HTTP error: refresh outcome
    ├── TokenRejected           4xx from the token endpoint: permanent, needs a human
    └── TokenEndpointUnavailable 5xx, timeout, bad answer: transient, retry with backoff
        └── TokenEndpointUnrecognised  a 4xx without an OAuth error body: transient, but
                                       backs off long and alerts

Messages say what happened and what to do; they never contain a secret.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    code = "internal_error"
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(ProxyError):
    status, code = 400, "bad_request"


class ForbiddenTarget(BadRequest):
    code = "forbidden_target"


class ConnectionRequired(BadRequest):
    code = "connection_required"


class InvalidConnection(BadRequest):
    code = "invalid_connection"


class UnknownApp(BadRequest):
    code = "unknown_app"


class InvalidState(BadRequest):
    code = "invalid_state"


class AuthorizationFailed(BadRequest):
    code = "authorization_failed"


class CallerUnauthorized(ProxyError):
    status, code = 401, "caller_unauthorized"


class AdminUnauthorized(ProxyError):
    status, code = 401, "admin_unauthorized"


class ConnectionForbidden(ProxyError):
    status, code = 403, "connection_forbidden"


class AdminDisabled(ProxyError):
    status, code = 403, "admin_disabled"


class NotFound(ProxyError):
    status, code = 404, "not_found"


class UnknownConnection(NotFound):
    code = "unknown_connection"


class UnknownProperty(NotFound):
    code = "unknown_property"


class AmbiguousProperty(ProxyError):
    status, code = 409, "ambiguous_property"


class ConnectionDisconnected(ProxyError):
    status, code = 410, "connection_disconnected"


class BodyIncomplete(BadRequest):
    code = "body_incomplete"


class InvalidHeaderBytes(BadRequest):
    code = "invalid_header_bytes"


class CredentialEndpointBlocked(ProxyError):
    status, code = 403, "credential_endpoint_blocked"


class BodyTooLarge(ProxyError):
    status, code = 413, "body_too_large"


class RateLimited(ProxyError):
    status, code = 429, "rate_limited"


class UpstreamUnreachable(ProxyError):
    status, code = 502, "upstream_unreachable"


class UpstreamInvalidResponse(ProxyError):
    status, code = 502, "upstream_invalid_response"


class NoUsableToken(ProxyError):
    status, code = 503, "no_usable_token"
    retry_after = 5.0


class ReauthorizationRequired(NoUsableToken):
    code = "reauthorization_required"
    retry_after = 60.0


class StoreUnavailable(ProxyError):
    status, code = 503, "store_unavailable"
    retry_after = 5.0


class StoreBusy(StoreUnavailable):
    """The store is there but slow: no pooled connection came free in time, or a command
    outlived its socket timeout.

    A kind of StoreUnavailable, so every caller that keeps serving from memory and writes
    back later does so here too; but not an outage: nothing that exists to survive a
    missing store (a refresh without the lock, readiness failing) follows from it. The
    caller tries again shortly.
    """

    code = "store_busy"
    retry_after = 1.0


class UpstreamTimeout(ProxyError):
    status, code = 504, "upstream_timeout"


class TokenEndpointError(Exception):
    """The token endpoint did not give a token. `reason` is safe to log."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TokenRejected(TokenEndpointError):
    """A 4xx: the refresh token or client is bad. Retrying cannot help."""


class TokenEndpointUnavailable(TokenEndpointError):
    """A 5xx, a timeout, or an unreadable answer. Retry later."""


class TokenEndpointUnrecognised(TokenEndpointUnavailable):
    """A 4xx that is not an OAuth error (an HTML page, an empty body): most likely a load
    balancer's or gateway's, not Cloudbeds' verdict on the refresh token."""


class RecordUnreadable(ProxyError):
    """A stored record that cannot be decrypted or parsed (wrong key, corruption).

    Not a kind of `StoreUnavailable`: the store answers, and what it holds is a
    configuration error, not an outage. Taken for an outage, a replica would re-seed,
    refresh on its own and overwrite the record: a forked token lineage. The connection
    is left alone (no token call, no write) until the record reads again.
    """

    status, code = 503, "record_unreadable"
    retry_after = 60.0


class WriteNotReplicated(StoreUnavailable):
    """Redis took a record write but no replica acknowledged it within the bound (`WAIT`).

    A kind of StoreUnavailable on purpose: a master that fails over before its replica has
    the write loses it, and the refresh token in it is then nowhere but in this process.
    Every caller that keeps a record unsaved and writes it again when the store is down does
    the same here; the write may have landed, and the compare-and-set refuses it the second
    time round, once a replica holds what the master holds.
    """

    code = "write_not_replicated"
