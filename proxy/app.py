"""The app factory: wires settings, store, credentials, limiter and forwarding together.

`create_app(settings, store=…, clock=…, metrics=…)` so tests pass fakes. Everything that
lives as long as the app is made in `cleanup_ctx` and closed there, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from proxy import admin, endpoints
from proxy.callers import Callers
from proxy.clock import Clock, system_clock
from proxy.config import CredentialSettings, Kind, Settings
from proxy.connections import Connections
from proxy.coordinator import OAuthCredential
from proxy.credentials import ApiKeyCredential, Credential, KeepAlive
from proxy.crypto import TokenCipher
from proxy.delivery import Delivery
from proxy.errors import StoreUnavailable
from proxy.forwarding import Forwarder
from proxy.gcra import RateLimit, split
from proxy.logs import register_secret
from proxy.metrics import Metrics
from proxy.middleware import request_middleware, server_log
from proxy.pacing import Pacer
from proxy.ratelimit import Limiter
from proxy.redis_store import RedisStore
from proxy.registry import MakeCredential, Registry
from proxy.runtime import PUBLIC, RUNTIME, Runtime
from proxy.sqlite_store import SqliteStore
from proxy.store import TokenStore
from proxy.upstream import GuardedConnector, Upstream

log = structlog.get_logger("proxy.app")


SETTINGS = web.AppKey("settings", Settings)


def make_store(settings: Settings) -> TokenStore:
    """Redis when CBPROXY_REDIS_URL is set, else the SQLite file CBPROXY_STATE_FILE."""
    cipher = TokenCipher.from_keys(settings.encryption_keys) if settings.encryption_keys else None
    if settings.redis_url is None:
        return SqliteStore(settings.state_file, cipher=cipher)
    return RedisStore.from_url(
        settings.redis_url,
        prefix=settings.redis_prefix,
        cipher=cipher,
        replica_wait=settings.replica_wait,
        pool_timeout=settings.redis_pool_timeout,
    )


def create_app(
    settings: Settings,
    *,
    store: TokenStore | None = None,
    clock: Clock = system_clock,
    metrics: Metrics | None = None,
) -> web.Application:
    # Bodies up to replay_body_bytes are read whole (to replay them after a 401); the rest
    # stream and are limited by max_body_bytes in the forwarder.
    # aiohttp's keep-alive timer runs from a connection's opening and from the end of each
    # answer until the next request head is complete: it is the head timeout and the
    # bound on idle keep-alive connections at once, so a slowloris holds a socket at most
    # CBPROXY_HEAD_TIMEOUT. Set on the app, it holds for every runner that serves it.
    app = web.Application(
        middlewares=[request_middleware],
        client_max_size=max(settings.replay_body_bytes, 1024**2),
        handler_args=_handler_args(settings),
    )
    app[SETTINGS] = settings
    app.router.add_route("*", "/_proxy/healthz", endpoints.healthz)
    app.router.add_route("*", "/_proxy/readyz", endpoints.readyz)
    app.router.add_route("*", "/_proxy/metrics", endpoints.metrics)
    app.router.add_route("*", "/_proxy/status", endpoints.status)
    app.router.add_route("*", "/_proxy/tokens", endpoints.tokens)
    # With CBPROXY_PUBLIC_PORT the install and callback paths are served only there (that
    # port faces the internet and forwards nothing); otherwise here, beside the API.
    public = _public_app(settings) if settings.public_port is not None else None
    if public is None:
        _add_install_routes(app.router)
    admin.add_routes(app.router)
    app.router.add_route("*", "/_proxy/{tail:(?s:.*)}", endpoints.not_found)
    # Every other path, newlines and all, is forwarded (after the target checks).
    every_path = EveryPath()
    app.router.register_resource(every_path)
    every_path.add_route("*", forward)

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        async with _runtime(settings, store or make_store(settings), clock, metrics) as runtime:
            app[RUNTIME] = runtime
            if public is None:
                yield
                return
            public[RUNTIME] = runtime
            runner = web.AppRunner(public, access_log=None, shutdown_timeout=2)
            await runner.setup()
            host = settings.public_host or settings.host
            await web.TCPSite(runner, host, settings.public_port).start()
            log.info("proxy.public_listener", host=host, port=settings.public_port)
            try:
                yield
            finally:
                await runner.cleanup()

    async def mark_stopping(app: web.Application) -> None:
        # on_shutdown runs as the listener closes, before the grace wait for requests.
        runtime = app.get(RUNTIME)
        if runtime is not None:
            runtime.stop_deadline = asyncio.get_running_loop().time() + settings.shutdown_grace
        log.info("proxy.stopping", grace=settings.shutdown_grace)

    app.cleanup_ctx.append(runtime_ctx)
    app.on_shutdown.append(mark_stopping)
    return app


def _add_install_routes(router: web.UrlDispatcher) -> None:
    router.add_route("*", "/_proxy/oauth/start", endpoints.oauth_start)
    router.add_route("*", "/_proxy/oauth/callback", endpoints.oauth_callback)
    router.add_route("GET", "/_proxy/apps/{app}/install", endpoints.app_install)
    router.add_route("GET", "/_proxy/apps/{app}/callback", endpoints.app_callback)


def _handler_args(settings: Settings) -> dict[str, Any]:
    """Server limits for both listeners: a request head (and an idle keep-alive) gets
    CBPROXY_HEAD_TIMEOUT; a body the proxy will not read (an error answered first) is
    drained before the close for the same bound, so the caller gets the answer, not a
    reset; parse errors are quiet warnings."""
    return {
        "keepalive_timeout": settings.head_timeout,
        "lingering_time": settings.head_timeout,
        "logger": server_log,
    }


def _public_app(settings: Settings) -> web.Application:
    """The internet-facing listener: installs and callbacks, and 404 for everything else."""
    public = web.Application(middlewares=[request_middleware], handler_args=_handler_args(settings))
    public[SETTINGS], public[PUBLIC] = settings, True
    _add_install_routes(public.router)
    public.router.add_route("*", "/{tail:(?s:.*)}", endpoints.not_found)
    return public


@contextlib.asynccontextmanager
async def _runtime(
    settings: Settings, store: TokenStore, clock: Clock, metrics: Metrics | None
) -> AsyncIterator[Runtime]:
    metrics = metrics or Metrics()
    if isinstance(store, RedisStore):
        store.observe_pool(metrics.pool_wait)
    for secret in settings.secrets():
        register_secret(secret, configured=True)
    # Guarded: a pooled connection never carries one answer to another request (see
    # proxy/upstream.py).
    connector = GuardedConnector(limit=200, keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    limiter = make_limiter(settings, store, metrics, clock)
    make = credential_factory(
        settings, store, session=session, limiter=limiter, metrics=metrics, clock=clock
    )
    registry = Registry(settings, store, make, metrics, clock)
    # The forwarder's calls go through a client of their own (see proxy/upstream.py).
    # `connect` bounds the wait for a pooled connection too, so a full pool ends in a 504
    # rather than a queue without end.
    forwarding = Upstream(
        settings.upstream_url,
        limit=200,
        keepalive=30.0,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # One more than the budget: a head just over it is refused by check_answer_head
        # with the same code as one far over it.
        max_headers=settings.max_response_headers + 1,
    )
    forwarder = Forwarder(
        settings, forwarding, registry, limiter, metrics, callers=Callers(settings.callers)
    )
    delivery = _delivery(settings, store, session, metrics, clock)
    connections = Connections(
        settings,
        store,
        session,
        registry,
        limiter,
        clock=clock,
        on_events=delivery.wake if delivery is not None else lambda: None,
    )
    runtime = Runtime(
        settings, store, metrics, clock, session, registry, limiter, forwarder, connections
    )
    runtime.delivery = delivery
    tasks: set[asyncio.Task[None]] = set()
    try:
        # Only the configured credentials before the listener opens: the stored connections
        # load in the feed's task (its first step), while requests are already served.
        await registry.start()
        tasks.add(asyncio.create_task(registry.follow(), name="changes"))
        if store.shared:
            tasks.add(asyncio.create_task(limiter.run_heartbeat(), name="heartbeat"))
        tasks.add(asyncio.create_task(_poll(runtime), name="poll"))
        if delivery is not None:
            tasks.add(asyncio.create_task(delivery.run(), name="events"))
        log.info(
            "proxy.started",
            configured=len(settings.credentials),
            apps=[a.name for a in settings.apps],
            store=type(store).__name__,
        )
        yield runtime
    finally:
        await _cancel_all(tasks)
        # A refresh in flight may finish in what is left of the grace period, then it is
        # cancelled; either way its `finally` releases the lock before the store closes.
        now = asyncio.get_running_loop().time()
        await registry.stop((runtime.stop_deadline or now) - now)
        await limiter.close()
        with contextlib.suppress(StoreUnavailable):
            await registry.flush_used()
        await forwarding.close()
        await session.close()
        await store.close()


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait for them; a task that took the cancel and went on is
    cancelled again (redis-py can swallow a cancel that lands while it opens a connection,
    and the feed's task talks to Redis from its first moment)."""
    pending = set(tasks)
    for _ in range(10):  # bounded: a task that ignores ten cancels is left to the loop's end
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        if not pending:
            break
    else:
        log.error("proxy.tasks.not_cancelled", tasks=sorted(t.get_name() for t in pending))
    await asyncio.gather(*(tasks - pending), return_exceptions=True)


def _delivery(
    settings: Settings,
    store: TokenStore,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    clock: Clock,
) -> Delivery | None:
    """The event delivery task's object, only when CBPROXY_EVENTS_URL is set."""
    if not settings.events_url:
        return None
    # load_settings refuses CBPROXY_EVENTS_URL without CBPROXY_EVENTS_SECRET.
    assert settings.events_secret
    return Delivery(
        store,
        session,
        url=settings.events_url,
        secret=settings.events_secret,
        metrics=metrics,
        clock=clock,
    )


def credential_factory(
    settings: Settings,
    store: TokenStore,
    *,
    session: aiohttp.ClientSession,
    limiter: Limiter,
    metrics: Metrics,
    clock: Clock,
) -> MakeCredential:
    """How a replica (or a one-shot CLI command) makes a connection's credential."""

    def gate(budget: str, connection: str, wait: float) -> Awaitable[object]:
        return limiter.admit(budget, connection, max_wait=wait)

    # An idle API key is kept alive with a cheap call (Cloudbeds expires one unused 30 days).
    keepalive = KeepAlive(
        session,
        f"{settings.upstream_url}/api/v1.3/getHotels",
        interval=settings.keepalive_interval,
        timeout=settings.token_timeout,
        lock_ttl=settings.lock_ttl,
        clock=clock,
        gate=gate,
    )

    # One pacer per app: its connections' ahead-of-time refreshes are spread on this replica.
    pacers: dict[str, Pacer] = {}

    def make(cred: CredentialSettings) -> Credential:
        if cred.kind is Kind.API_KEY:
            return ApiKeyCredential(cred, store, keepalive=keepalive)
        pacer = pacers.setdefault(cred.budget, Pacer(clock)) if cred.app is not None else None
        return OAuthCredential(
            cred,
            settings,
            store=store,
            session=session,
            metrics=metrics,
            clock=clock,
            # A refresh takes a slot of the app's token budget (its reserved share), and
            # may wait for it as long as its lock outlives the call.
            gate=gate,
            pacer=pacer,
        )

    return make


def make_limiter(settings: Settings, store: TokenStore, metrics: Metrics, clock: Clock) -> Limiter:
    """One budget per configured credential, and per app one for requests and one for
    token calls (`gcra.split`, unless its token share is 0), paused together."""
    limits = {
        c.budget: RateLimit(c.rate_limit, c.rate_burst, settings.rate_max_wait)
        for c in settings.credentials
    }
    linked: dict[str, tuple[str, ...]] = {}
    for app in settings.apps:
        limit = RateLimit(app.rate_limit, app.rate_burst, settings.rate_max_wait)
        if app.token_budget == app.budget or limit.off:
            limits[app.budget] = limits[app.token_budget] = limit
            continue
        limits[app.budget], limits[app.token_budget] = split(limit, app.token_share)
        linked[app.budget] = linked[app.token_budget] = (app.budget, app.token_budget)
    return Limiter(
        limits,
        shared=store if isinstance(store, RedisStore) else None,
        metrics=metrics,
        replica_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        clock=clock,
        heartbeat_interval=settings.heartbeat_interval,
        linked=linked,
    )


async def _poll(runtime: Runtime) -> None:
    """Write-backs after an outage, the last-used batch, and the store's comings and goings."""
    store_ok = True
    while True:
        try:
            await runtime.store.ping()
            await runtime.registry.flush_used()
            # Only what an outage left unwritten (the registry's `unsaved`, not a loop over
            # every connection): the change feed brings everything else.
            for credential in runtime.registry.unsaved():
                await credential.reload()
        except StoreUnavailable:
            if store_ok:
                log.warning("store.unavailable", action="serving tokens from memory")
            runtime.metrics.redis_errors.labels("poll").inc()
            store_ok = False
        except Exception:  # a bug must not end the write-backs for good
            log.exception("store.poll.crashed")
        else:
            if not store_ok:
                log.info("store.available")
                runtime.registry.resume()
            store_ok = True
        await asyncio.sleep(runtime.settings.poll_interval)


class EveryPath(web.PlainResource):
    """The forward route: matches every path, with no pattern to run and no path to decode
    (a `/{tail:.*}` route does both for each request, for a value nobody reads).

    Indexed under `/`, it is tried last, after every `/_proxy/` route, as the catch-all
    it replaces was.
    """

    def __init__(self) -> None:
        super().__init__("/")

    def _match(self, path: str) -> dict[str, str]:
        return {}

    def raw_match(self, path: str) -> bool:
        return False  # never reused for another route added under "/"


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].forwarder.handle(request)
