"""Prometheus metrics, all in one registry that the app factory passes around.

Labels are credential names, app names (`app:NAME` for the connections of an app),
methods, status classes, states and error codes: never a secret, never a path (paths carry
reservation and guest ids), never a connection id (their number grows with installs).
Event metrics carry only an outcome label, never an event id.

Nothing here grows with the number of connections: `cbproxy_connections{app, state}` is
read from counts the registry keeps as credentials change (no loop over connections per
scrape), and one connection's detail is the admin API's (`GET /_proxy/admin/connections/ID`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ConnectionCounts = Callable[[], Mapping[tuple[str, str], int]]


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Request methods counted under their own name."""


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._answered: dict[tuple[str, str], Counter] = {}
        self.requests = Counter(
            "cbproxy_requests", "Requests answered", ["method", "status_class"], registry=r
        )
        self.upstream_latency = Histogram(
            "cbproxy_upstream_latency_seconds",
            "Time from sending upstream to response headers",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.proxy_errors = Counter(
            "cbproxy_proxy_errors", "Errors the proxy answered itself", ["code"], registry=r
        )
        self.token_expires_in = Gauge(
            "cbproxy_token_expires_in_seconds",
            "Seconds until the credential's access token expires (0 when none)",
            ["credential"],
            registry=r,
        )
        self.credential_state = Gauge(
            "cbproxy_credential_state",
            "1 for the credential's current state, 0 for the others",
            ["credential", "state"],
            registry=r,
        )
        self.refreshes = Counter(
            "cbproxy_token_refreshes",
            "Calls to the token endpoint by outcome (ok, transient, rejected)",
            ["credential", "outcome"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            "cbproxy_token_refresh_duration_seconds",
            "Duration of token endpoint calls",
            ["credential"],
            registry=r,
        )
        self.lock_waits = Counter(
            "cbproxy_lock_waits",
            "Refreshes this replica left to the replica holding the lock",
            ["credential"],
            registry=r,
        )
        self.lock_losses = Counter(
            "cbproxy_lock_losses",
            "Refresh results refused because a newer generation was stored",
            ["credential"],
            registry=r,
        )
        self.replays = Counter(
            "cbproxy_401_replays",
            "Requests replayed after a 401 and a refresh, by outcome (replayed, not_replayed)",
            ["credential", "outcome"],
            registry=r,
        )
        self.redis_errors = Counter(
            "cbproxy_redis_errors", "Failed store operations", ["operation"], registry=r
        )
        self.redis_pool_wait = Histogram(
            "cbproxy_redis_pool_wait_seconds",
            "Time a Redis command waited for a pooled connection (connecting included)",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
        )
        self.redis_pool_timeouts = Counter(
            "cbproxy_redis_pool_timeouts",
            "Redis commands that found no pooled connection within CBPROXY_REDIS_POOL_TIMEOUT",
            registry=r,
        )
        self.ratelimit_admitted = Counter(
            "cbproxy_ratelimit_admitted", "Requests admitted at once", ["credential"], registry=r
        )
        self.ratelimit_delayed = Histogram(
            "cbproxy_ratelimit_delay_seconds",
            "Wait imposed on requests that were shaped",
            ["credential"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
        )
        self.ratelimit_refused = Counter(
            "cbproxy_ratelimit_refused", "Requests refused with 429", ["credential"], registry=r
        )
        self.ratelimit_paused = Gauge(
            "cbproxy_ratelimit_paused",
            "1 while Cloudbeds asked this credential to pause",
            ["credential"],
            registry=r,
        )
        self.event_deliveries = Counter(
            "cbproxy_event_deliveries",
            "Event delivery attempts by outcome (delivered, failed, dropped)",
            ["outcome"],
            registry=r,
        )
        self.events_pending = Gauge(
            "cbproxy_events_pending",
            "Undelivered events in the outbox as the delivering replica last read it "
            "(0 on the others; at most one read's batch)",
            registry=r,
        )

    def pool_wait(self, seconds: float, timed_out: bool) -> None:
        """One wait for a pooled Redis connection (the store's pool observer)."""
        self.redis_pool_wait.observe(seconds)
        if timed_out:
            self.redis_pool_timeouts.inc()

    def answered(self, method: str, status_class: str) -> None:
        """Count one request answered: the child series is bound once per label pair.

        `labels()` looks its child up under a lock each time; the pairs are few (methods
        by status classes, the same set the series already are), so each is kept. A method
        outside the usual ones counts as "other": aiohttp's C parser refuses unknown methods,
        its pure-Python one does not, and a caller must not be able to add series.
        """
        child = self._answered.get((method, status_class))
        if child is None:
            label = method if method in _METHODS else "other"
            child = self.requests.labels(label, status_class)
            if label == method:
                self._answered[method, status_class] = child
        child.inc()

    def count_connections(self, counts: ConnectionCounts) -> None:
        """`cbproxy_connections{app, state}`, computed from `counts` at each scrape."""
        self.registry.register(_ConnectionsCollector(counts))


class _ConnectionsCollector(Collector):
    def __init__(self, counts: ConnectionCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "cbproxy_connections", "Connections by app and state", labels=["app", "state"]
        )
        for (app, state), count in sorted(self._counts().items()):
            family.add_metric([app, state], count)
        yield family
