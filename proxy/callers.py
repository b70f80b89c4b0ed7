"""Caller tokens: which services may use the forwarded API, and which connections.

Rules (DESIGN.md, "Callers"):
- With no `[callers.NAME]` configured, nothing is checked (the proxy trusts its network).
- Otherwise every forwarded request carries a caller token the way the official SDKs carry
  a credential: `Authorization: Bearer <token>` (`access_token`) or `x-api-key: <token>`
  (`api_key`); else 401 `caller_unauthorized`. A caller may use only the connections its
  `connections` or `apps` patterns match; else 403 `connection_forbidden`.
- Tokens are compared as SHA-256 digests in a dictionary: the time a lookup takes says
  nothing about the token. A caller token never goes upstream (the credential replaces
  both headers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from proxy.config import CallerSettings
from proxy.credentials import Credential
from proxy.errors import CallerUnauthorized, ConnectionForbidden


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Callers:
    def __init__(self, callers: Sequence[CallerSettings]) -> None:
        self._by_digest = {_digest(c.token): c for c in callers}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def identify(self, headers: Mapping[str, str]) -> CallerSettings | None:
        """The caller presenting a token; None when callers are not configured."""
        if not self._by_digest:
            return None
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = headers.get("x-api-key", "")
        caller = self._by_digest.get(_digest(token.strip())) if token.strip() else None
        if caller is None:
            raise CallerUnauthorized(
                "this proxy needs a caller token: send it as Authorization: Bearer <token> "
                "(an SDK's access_token) or x-api-key (an SDK's api_key)"
            )
        return caller

    @staticmethod
    def check(caller: CallerSettings, credential: Credential) -> None:
        if not caller.may_use(credential.name, credential.settings.app):
            raise ConnectionForbidden(
                f"caller {caller.name!r} may not use connection {credential.name!r}; "
                f"add it to [callers.{caller.name}] connections or apps"
            )
