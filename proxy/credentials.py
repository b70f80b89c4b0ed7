"""What the request path needs from a credential, and the static API-key kind.

OAuth credentials, which refresh and share their token, live in `proxy.coordinator`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from proxy.config import CredentialSettings, Kind
from proxy.tokens import State


class Credential(Protocol):
    name: str
    settings: CredentialSettings

    @property
    def properties(self) -> tuple[str, ...]: ...

    async def header(self) -> tuple[str, str]:
        """The header that carries the credential; raises NoUsableToken when there is none."""

    async def rejected(self, header: tuple[str, str]) -> bool:
        """Cloudbeds answered 401 to `header`: True when a different, usable one is ready."""

    def ready(self) -> tuple[bool, str]: ...

    def status(self) -> dict[str, Any]: ...

    async def start(self) -> None:
        """Load (or seed) the credential's record before the first request."""

    async def run(self) -> None:
        """Background work until cancelled."""

    async def reload(self) -> None:
        """Re-read the store (a change was published, or the poll came round)."""

    async def stop(self, timeout: float) -> None:
        """At shutdown: finish or abandon work in flight within `timeout` seconds."""


class ApiKeyCredential:
    """A static `x-api-key`: never refreshed, always ready."""

    def __init__(self, settings: CredentialSettings) -> None:
        assert settings.api_key is not None
        self.name, self.settings = settings.name, settings
        self._header = ("x-api-key", settings.api_key)

    @property
    def properties(self) -> tuple[str, ...]:
        return self.settings.properties

    async def header(self) -> tuple[str, str]:
        return self._header

    async def rejected(self, header: tuple[str, str]) -> bool:
        return False

    def ready(self) -> tuple[bool, str]:
        return True, "api key"

    def status(self) -> dict[str, Any]:
        return {"kind": Kind.API_KEY.value, "state": State.OK.value}

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def reload(self) -> None:
        return None

    async def stop(self, timeout: float) -> None:
        return None
