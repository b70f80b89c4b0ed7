"""Apps, grants, authorization codes and pending installs: one part of the fake's state.

`Installs` is mixed into `FakeCloudbeds`, which declares the fields these methods use.
Cloudbeds rules: a code lives 10 minutes, is single use and belongs to one app; the
authorize page approves at once; a Marketplace install ("Flow A") lands on the app's
redirect URI with a code and no state.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
from urllib.parse import urlencode

from proxy.clock import Clock

CODE_LIFETIME = 600.0
FIRST_FRESH_PROPERTY = 2001


@dataclasses.dataclass(frozen=True)
class App:
    """A technology partner's app as Cloudbeds registers it."""

    client_id: str
    client_secret: str
    redirect_uri: str


@dataclasses.dataclass(frozen=True)
class Grant:
    """What one authorisation covers; `properties=None` means the fake's `properties`."""

    client_id: str
    properties: tuple[str, ...] | None = None
    association: str | None = None


class Installs:
    """Apps, grants, codes and install queues (the fields live on FakeCloudbeds)."""

    clock: Clock
    client_id: str
    client_secret: str
    redirect_uri: str
    properties: tuple[str, ...]
    no_resources: bool
    apps: dict[str, App]
    _codes: dict[str, float]
    _grants: dict[str, Grant]
    _installs: collections.defaultdict[str, collections.deque[Grant]]
    _next_property: int

    # --- apps ---------------------------------------------------------------------------

    def add_app(self, client_id: str, client_secret: str, redirect_uri: str) -> App:
        """Register one more app (a client id Cloudbeds knows). Raises ValueError if taken."""
        if client_id == self.client_id or client_id in self.apps:
            raise ValueError(f"app {client_id!r} already exists")
        self.apps[client_id] = App(client_id, client_secret, redirect_uri)
        return self.apps[client_id]

    def app(self, client_id: str | None) -> App | None:
        """The app with this client id (the default one read from the fields), or None."""
        if client_id == self.client_id:
            return App(self.client_id, self.client_secret, self.redirect_uri)
        return self.apps.get(client_id or "")

    def grant(
        self,
        client_id: str | None = None,
        properties: list[str] | tuple[str, ...] | None = None,
        association: str | None = None,
    ) -> Grant:
        """A Grant for a known app (None: the default app). Raises ValueError if unknown."""
        client_id = self.client_id if client_id is None else client_id
        if self.app(client_id) is None:
            raise ValueError(f"unknown app {client_id!r}")
        props = None if properties is None else tuple(str(p) for p in properties)
        return Grant(client_id, props, association)

    def fresh_grant(self, client_id: str) -> Grant:
        """A Grant for a property id never handed out before (2001, 2002, ... per fake)."""
        self._next_property += 1
        return self.grant(client_id, [str(self._next_property - 1)])

    def covered(self, grant: Grant) -> tuple[str, ...]:
        """The property ids a grant covers."""
        return self.properties if grant.properties is None else grant.properties

    def resources(self, grant: Grant) -> list[dict[str, str]]:
        """The token answer's `resources` for a grant ([] under `no_resources`)."""
        if self.no_resources:
            return []
        if grant.association is not None:
            return [{"type": "association", "id": grant.association}]
        return [{"type": "property", "id": pid} for pid in self.covered(grant)]

    def label(self, grant: Grant) -> str:
        """A stable, non-secret name for what a grant covers: `client/property:1001,1002`."""
        if grant.association is not None:
            return f"{grant.client_id}/association:{grant.association}"
        return f"{grant.client_id}/property:{','.join(self.covered(grant))}"

    # --- codes and installs -------------------------------------------------------------

    def issue_code(
        self,
        client_id: str | None = None,
        properties: list[str] | tuple[str, ...] | None = None,
        association: str | None = None,
    ) -> str:
        """A new authorization code, valid 10 minutes by `clock`, single use."""
        return self.issue_code_for(self.grant(client_id, properties, association))

    def issue_code_for(self, grant: Grant) -> str:
        """A new 10-minute, single-use code bound to `grant`."""
        code = f"fake-code-{secrets.token_hex(8)}"
        self._codes[code] = self.clock() + CODE_LIFETIME
        self._grants[code] = grant
        return code

    def take_code(self, code: str) -> Grant | None:
        """Consume a code (any attempt does); its Grant if it was still valid."""
        expires_at = self._codes.pop(code, None)
        grant = self._grants.pop(code, None)
        if expires_at is None or self.clock() >= expires_at:
            return None
        return grant

    def queue_install(
        self,
        client_id: str,
        properties: list[str] | tuple[str, ...] | None = None,
        association: str | None = None,
    ) -> None:
        """Make the next approval on the authorize page for this app cover these properties."""
        self._installs[client_id].append(self.grant(client_id, properties, association))

    def next_install(self, client_id: str) -> Grant:
        """What the authorize page approves: the queue, else today's default, else fresh."""
        if self._installs[client_id]:
            return self._installs[client_id].popleft()
        if client_id == self.client_id:
            return self.grant()
        return self.fresh_grant(client_id)

    def marketplace_install(
        self,
        client_id: str,
        properties: list[str] | tuple[str, ...] | None = None,
        association: str | None = None,
    ) -> str:
        """The redirect URL of a Marketplace install: `redirect_uri?code=...`, no state."""
        if properties is None and association is None:
            grant = self.fresh_grant(client_id)
        else:
            grant = self.grant(client_id, properties, association)
        return self.redirect_url(grant, None)

    def redirect_url(self, grant: Grant, state: str | None) -> str:
        """The app's redirect URI with a new code for `grant` (and `state` if given)."""
        app = self.app(grant.client_id)
        assert app is not None  # a Grant is only made for a known app
        params = {"code": self.issue_code_for(grant)}
        if state is not None:
            params["state"] = state
        sep = "&" if "?" in app.redirect_uri else "?"
        return f"{app.redirect_uri}{sep}{urlencode(params)}"
