"""What the running app holds, and the key it lives under: shared by the app factory and
the handlers, so neither imports the other."""

from __future__ import annotations

import dataclasses

import aiohttp
from aiohttp import web

from proxy.clock import Clock
from proxy.config import Settings
from proxy.connections import Connections
from proxy.delivery import Delivery
from proxy.forwarding import Forwarder
from proxy.metrics import Metrics
from proxy.ratelimit import Limiter
from proxy.registry import Registry
from proxy.store import TokenStore


@dataclasses.dataclass
class Runtime:
    """What the running app holds; built at start-up, closed at cleanup."""

    settings: Settings
    store: TokenStore
    metrics: Metrics
    clock: Clock
    session: aiohttp.ClientSession
    registry: Registry
    limiter: Limiter
    forwarder: Forwarder
    connections: Connections
    delivery: Delivery | None = None
    """Set when CBPROXY_EVENTS_URL is: the task that POSTs connection events."""
    stop_deadline: float | None = None
    """Loop time by which shutdown should be done: set on shutdown, from the grace period."""


RUNTIME = web.AppKey("runtime", Runtime)
PUBLIC = web.AppKey("public", bool)
"""Set on the internet-facing app, which forwards nothing (so checks no forward target)."""
