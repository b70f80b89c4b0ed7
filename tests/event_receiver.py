"""A real events receiver for tests: an aiohttp app that verifies and records deliveries.

It checks every POST the way the README tells receivers to (`proxy.events.verify` on the
raw body, the JSON content type), records what it accepted in arrival order, and has
switches: answer the next N deliveries with an error, fail all of them, or hold them
unanswered until released (so the sender's timeout fires).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.clock import Clock, system_clock
from proxy.events import SIGNATURE_HEADER, verify
from tests.support import serve


@dataclasses.dataclass
class Receiver:
    secret: str
    clock: Clock = system_clock
    # switches
    fail_next: int = 0
    """Answer the next N well-signed deliveries with `fail_status`."""
    failing: bool = False
    """Answer every well-signed delivery with `fail_status` while set."""
    fail_status: int = 500
    ok_status: int = 204
    hang: bool = False
    """Hold deliveries unanswered while set (until `release`)."""
    # records
    accepted: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Bodies answered with `ok_status`, in arrival order."""
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Every well-signed body, answered or not, in arrival order."""
    rejected: list[str] = dataclasses.field(default_factory=list)
    """Why a POST was refused (bad signature, wrong content type)."""
    url: str = ""
    _changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)
    _released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner, base = await serve(app)
        self.url = f"{base}/events"
        return self

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        """Let every held delivery finish (with an error)."""
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        if request.content_type != "application/json":
            return await self._refuse(f"content type {request.content_type}")
        if not verify(self.secret, body, header, self.clock()):
            return await self._refuse(f"bad signature {header[:20]}...")
        event = json.loads(body)
        await self._record(self.attempts, event)
        if self.hang:
            await self._released.wait()
            return web.Response(status=503)
        if self.failing or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            return web.Response(status=self.fail_status)
        await self._record(self.accepted, event)
        return web.Response(status=self.ok_status)

    async def _refuse(self, why: str) -> web.Response:
        self.rejected.append(why)
        async with self._changed:
            self._changed.notify_all()
        return web.Response(status=400)

    async def _record(self, where: list[dict[str, Any]], event: dict[str, Any]) -> None:
        where.append(event)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Until `predicate()` holds after a POST arrived; fails after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.accepted if e["type"] == type_]
