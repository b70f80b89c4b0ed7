"""The fake's state: credentials and what each covers, switches and counters.

Pure bookkeeping, no HTTP: the handlers in `oauth`, `api` and `app` read and change it;
apps, codes and installs are in `installs`.
A credential (code, access token, refresh token, API key) maps to the `Grant` it was issued
for: one app (client id) and the properties it covers, or an association and its properties.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import secrets
from typing import Any

from aiohttp import web

from proxy.clock import Clock, system_clock
from proxy.fake_cloudbeds.installs import FIRST_FRESH_PROPERTY, App, Grant, Installs


@dataclasses.dataclass
class FakeCloudbeds(Installs):
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
    no_resources: bool = False
    wrong_property_status: int = 200
    # counters
    token_calls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    api_calls: int = 0
    expired_token_calls: int = 0
    rejected_calls: int = 0
    wrong_property_calls: int = 0
    requests_seen: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    incoming_request_ids: list[str] = dataclasses.field(default_factory=list)
    per_second: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    token_calls_by_client: collections.defaultdict[str, collections.Counter[str]] = (
        dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    )
    api_calls_by_client: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    per_second_by_client: collections.defaultdict[str, collections.Counter[int]] = (
        dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    )
    api_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    app_state_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # private state
    apps: dict[str, App] = dataclasses.field(default_factory=dict, init=False)
    _access_tokens: dict[str, float] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )
    _revoked: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _refresh_tokens: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _api_keys: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _disconnected: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)
    _codes: dict[str, float] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _grants: dict[str, Grant] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _migrated: dict[str, str] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _installs: collections.defaultdict[str, collections.deque[Grant]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.deque), init=False, repr=False
    )
    _call_times: collections.defaultdict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list), init=False, repr=False
    )
    _token_times: collections.defaultdict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list), init=False, repr=False
    )
    _next_property: int = dataclasses.field(default=FIRST_FRESH_PROPERTY, init=False, repr=False)

    def __post_init__(self) -> None:
        """Make the starting refresh token and API key valid, for the default app."""
        self.add_refresh_token(self.refresh_token)
        self.add_api_key(self.api_key)

    # --- credentials --------------------------------------------------------------------

    def add_refresh_token(self, token: str, grant: Grant | None = None) -> None:
        """Make one more refresh token valid (for the default app and properties if no grant)."""
        self._refresh_tokens.add(token)
        self._grants[token] = grant or self.grant()

    def add_api_key(self, key: str, grant: Grant | None = None) -> None:
        """Make one more API key valid (for the default app and properties if no grant)."""
        self._api_keys.add(key)
        self._grants[key] = grant or self.grant()

    def mint_access_token(self, grant: Grant | None = None) -> str:
        """Issue an access token without a token call (expires at clock() + expires_in)."""
        token = f"fake-access-{secrets.token_urlsafe(16)}"
        self._access_tokens[token] = self.clock() + self.expires_in
        self._grants[token] = grant or self.grant()
        return token

    def mint_refresh_token(self, grant: Grant) -> str:
        """Issue a new refresh token for `grant`."""
        token = f"fake-refresh-{secrets.token_hex(8)}"
        self.add_refresh_token(token, grant)
        return token

    def mint_api_key(self, grant: Grant) -> str:
        """Issue a new API key for `grant`."""
        key = f"cbat_{secrets.token_urlsafe(24)}"
        self.add_api_key(key, grant)
        return key

    def grant_of(self, credential: str) -> Grant | None:
        """The Grant a credential was issued for, valid or not; None if never issued."""
        return self._grants.get(credential)

    def kind_of(self, credential: str) -> str | None:
        """`access_token`, `refresh_token`, `api_key` or `code` if the fake issued it, else None."""
        for kind, issued in (
            ("access_token", self._access_tokens),
            ("refresh_token", self._refresh_tokens),
            ("api_key", self._api_keys),
            ("code", self._codes),
        ):
            if credential in issued:
                return kind
        return None

    @staticmethod
    def credential_id(credential: str) -> str:
        """A stable non-secret fingerprint of a credential, as `api_log` records it."""
        return hashlib.sha256(credential.encode()).hexdigest()[:12]

    def revoke_all(self) -> None:
        """Make every access token issued so far answer 401 access_denied."""
        self._revoked.update(self._access_tokens)

    def valid_access_tokens(self) -> list[str]:
        """Access tokens the API accepts right now."""
        return [t for t in self._access_tokens if self.token_status(t) == "valid"]

    def valid_refresh_tokens(self) -> set[str]:
        """Refresh tokens the token endpoint accepts (ignoring `reject_refresh`)."""
        return self._refresh_tokens - self._disconnected

    def valid_api_keys(self) -> set[str]:
        """API keys the API accepts right now."""
        return self._api_keys - self._revoked

    def refresh_status(self, token: str) -> str:
        """One of `valid`, `disconnected` (its app left the property), `unknown`."""
        if token in self._disconnected:
            return "disconnected"
        return "valid" if token in self._refresh_tokens else "unknown"

    def token_status(self, token: str) -> str:
        """One of `valid`, `expired` (issued, now past expiry), `revoked`, `unknown`."""
        expires_at = self._access_tokens.get(token)
        if expires_at is None:
            return "unknown"
        if self.clock() >= expires_at:
            return "expired"
        return "revoked" if token in self._revoked else "valid"

    def rotate(self, token: str) -> str:
        """Replace a refresh token by a new one for the same grant (under rotation)."""
        grant = self._grants[token]
        self._refresh_tokens.discard(token)
        new = self.mint_refresh_token(grant)
        if token in self._migrated:
            self._migrated[new] = self._migrated.pop(token)
        return new

    def migrate(self, refresh_token: str) -> str:
        """An API key covering what `refresh_token` covers; a later refresh revokes it."""
        key = self.mint_api_key(self._grants[refresh_token])
        self._migrated[refresh_token] = key
        return key

    def refreshed(self, refresh_token: str) -> None:
        """A refresh succeeded: the API key migrated from this refresh token stops working."""
        key = self._migrated.pop(refresh_token, None)
        if key is not None:
            self._revoked.add(key)

    def disconnect(self, client_id: str, property_id: str) -> int:
        """The app leaves the property: every credential of it that covers it stops working.

        Returns how many credentials stopped. Later installs get new credentials that work.
        """
        hit = [
            c
            for c, g in self._grants.items()
            if g.client_id == client_id and property_id in self.covered(g)
        ]
        for credential in hit:
            if credential in self._refresh_tokens:
                self._disconnected.add(credential)
            else:
                self._revoked.add(credential)
            self._codes.pop(credential, None)
        return len(hit)

    # --- rate counting ------------------------------------------------------------------

    def count_call(self, client_id: str, *, token: bool = False) -> None:
        """Count one token or API call against a client id's rate budget, now."""
        now = self.clock()
        self.per_second_by_client[client_id][int(now)] += 1
        bisect.insort(self._call_times[client_id], now)
        if token:
            bisect.insort(self._token_times[client_id], now)

    def max_in_window(self, client_id: str, window: float = 1.0, *, tokens: bool = False) -> int:
        """The most calls (or only token calls) of this client id in any half-open interval
        [t, t + window): its busiest sliding second."""
        calls = self._token_times if tokens else self._call_times
        times, best, start = calls.get(client_id, []), 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def snapshot(self) -> dict[str, Any]:
        """Switches and counters as JSON-ready data (for `/_fake/state`)."""
        data: dict[str, Any] = {k: getattr(self, k) for k in SWITCHES}
        clients = sorted(set(self._call_times) | set(self.token_calls_by_client))
        data.update(
            token_calls=dict(self.token_calls),
            api_calls=self.api_calls,
            expired_token_calls=self.expired_token_calls,
            rejected_calls=self.rejected_calls,
            wrong_property_calls=self.wrong_property_calls,
            requests_seen=[list(r) for r in self.requests_seen],
            incoming_request_ids=list(self.incoming_request_ids),
            per_second={str(k): v for k, v in self.per_second.items()},
            valid_access_tokens=len(self.valid_access_tokens()),
            apps=[self.client_id, *self.apps],
            token_calls_by_client={k: dict(v) for k, v in self.token_calls_by_client.items()},
            api_calls_by_client=dict(self.api_calls_by_client),
            per_second_by_client={
                c: {str(s): n for s, n in v.items()} for c, v in self.per_second_by_client.items()
            },
            max_in_window={c: self.max_in_window(c) for c in clients},
            max_token_calls_in_window={c: self.max_in_window(c, tokens=True) for c in clients},
            api_log=list(self.api_log),
            app_state_calls=list(self.app_state_calls),
        )
        return data


SWITCHES: dict[str, type | tuple[type, ...]] = {
    "expires_in": int,
    "token_failures": int,
    "token_delay": (int, float),
    "reject_refresh": bool,
    "rotate_refresh_tokens": bool,
    "api_delay": (int, float),
    "rate_limit_next": int,
    "rate_limit_retry_after": int,
    "no_resources": bool,
    "wrong_property_status": int,
}

FAKE_STATE = web.AppKey("FAKE_STATE", FakeCloudbeds)


def state_of(request: web.Request) -> FakeCloudbeds:
    """The FakeCloudbeds behind this request's app."""
    return request.app[FAKE_STATE]
