"""The metrics page: parses as Prometheus text and moves as tokens are refreshed and rejected.

The proxy and the fake Cloudbeds share one fake clock, and refreshes are forced by a
401 (`revoke_all()`), so every refresh happens exactly when the test asks for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.clock import FakeClock
from proxy.store import MemoryStore
from tests.support import serve, settings_for, wait_ready

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HOTELS = "/api/v1.3/getHotels"

FAMILIES = {
    "cbproxy_requests": "counter",
    "cbproxy_upstream_latency_seconds": "histogram",
    "cbproxy_proxy_errors": "counter",
    "cbproxy_token_expires_in_seconds": "gauge",
    "cbproxy_credential_state": "gauge",
    "cbproxy_token_refreshes": "counter",
    "cbproxy_token_refresh_duration_seconds": "histogram",
    "cbproxy_lock_waits": "counter",
    "cbproxy_lock_losses": "counter",
    "cbproxy_401_replays": "counter",
    "cbproxy_redis_errors": "counter",
}


class Page:
    """One scrape of /_proxy/metrics, parsed with Prometheus' own text parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist yet (a counter not yet hit)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def label_values(self) -> set[str]:
        return {value for _, labels in self.samples for _, value in labels}


async def scrape(url: str) -> Page:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/_proxy/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Page(await response.text())


async def get(url: str, path: str = HOTELS) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        return response.status, await response.json()


from tests.conftest import Clocked  # noqa: E402


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    runners: list[Any] = []

    async def start(fake_url: str, clock: FakeClock, **kwargs: Any) -> str:
        runner, url = await serve(create_app(settings_for(fake_url), clock=clock, **kwargs))
        runners.append(runner)
        await wait_ready(url)
        return url

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


async def test_every_metric_is_on_the_page_with_its_type(clocked: Clocked, start: Any) -> None:
    clock, _, fake_url = clocked
    page = await scrape(await start(fake_url, clock))
    for name, kind in FAMILIES.items():
        assert page.types.get(name) == kind, f"{name}: {page.types.get(name)}"
    assert page.value("cbproxy_token_refreshes_total", credential="default", outcome="ok") == 1
    assert page.value("cbproxy_credential_state", credential="default", state="ok") == 1


async def test_values_move_as_tokens_are_refreshed_failed_and_rejected(
    clocked: Clocked, start: Any
) -> None:
    clock, fake, fake_url = clocked
    proxy = await start(fake_url, clock)
    assert (await get(proxy))[0] == 200
    page = await scrape(proxy)
    refreshes = "cbproxy_token_refreshes_total"
    assert page.value(refreshes, credential="default", outcome="ok") == 1
    assert page.value("cbproxy_requests_total", method="GET", status_class="2xx") >= 1
    assert page.value("cbproxy_upstream_latency_seconds_count") == 1
    # Computed at scrape time from the clock: no refresh, no request in between.
    assert page.value("cbproxy_token_expires_in_seconds", credential="default") == 3600
    clock.advance(100)
    page = await scrape(proxy)
    assert page.value("cbproxy_token_expires_in_seconds", credential="default") == 3500

    # ok: Cloudbeds forgets the token, the proxy refreshes and replays the request.
    fake.revoke_all()
    assert (await get(proxy))[0] == 200
    page = await scrape(proxy)
    assert page.value(refreshes, credential="default", outcome="ok") == 2
    assert page.value("cbproxy_401_replays_total", credential="default", outcome="replayed") == 1
    assert page.value("cbproxy_token_expires_in_seconds", credential="default") == 3600
    assert fake.token_calls["refresh_token"] == 2

    # transient: the token endpoint answers 500; the caller gets Cloudbeds' 401.
    clock.advance(901)  # a token from a forced refresh is forced again only after 15 minutes
    fake.revoke_all()
    fake.token_failures = 1
    assert (await get(proxy))[0] == 401
    page = await scrape(proxy)
    assert page.value(refreshes, credential="default", outcome="transient") == 1
    assert page.value("cbproxy_requests_total", method="GET", status_class="4xx") == 1
    assert page.value("cbproxy_credential_state", credential="default", state="ok") == 1

    # rejected: invalid_grant; the credential needs a human.
    clock.advance(10)
    fake.reject_refresh = True
    assert (await get(proxy))[0] == 401
    page = await scrape(proxy)
    assert page.value(refreshes, credential="default", outcome="rejected") == 1
    assert page.value("cbproxy_credential_state", credential="default", state="ok") == 0
    state = {"credential": "default", "state": "reauthorization_required"}
    assert page.value("cbproxy_credential_state", **state) == 1
    assert page.value("cbproxy_token_refresh_duration_seconds_count", credential="default") == 4
    assert fake.token_calls["refresh_token"] == 4

    # Once the access token expires the proxy answers itself, and says why.
    clock.advance(4000)
    errors_5xx = page.value("cbproxy_requests_total", method="GET", status_class="5xx")
    status, body = await get(proxy)
    assert (status, body["error"]) == (503, "reauthorization_required")
    page = await scrape(proxy)
    assert page.value("cbproxy_proxy_errors_total", code="reauthorization_required") == 1
    # The proxy's own endpoints count too (wait_ready saw a 503 from readyz).
    assert page.value("cbproxy_requests_total", method="GET", status_class="5xx") == errors_5xx + 1
    assert page.value("cbproxy_token_expires_in_seconds", credential="default") == 0

    # Labels: credential names, methods, classes, codes; never a secret or a path.
    secrets = {fake.client_secret, fake.refresh_token, *fake._access_tokens}
    for value in page.label_values():
        assert "/" not in value
        assert value not in secrets
    for secret in secrets:
        assert secret not in page.text


async def test_lock_waits_and_lock_losses_are_counted(clocked: Clocked, start: Any) -> None:
    clock, fake, fake_url = clocked
    store = MemoryStore()
    proxy = await start(fake_url, clock, store=store)

    # Another replica holds the lock: this one leaves the refresh to it.
    other = store.lock("default", 30)
    assert await other.acquire()
    clock.advance(10)
    fake.revoke_all()
    assert (await get(proxy))[0] == 401
    await other.release()
    page = await scrape(proxy)
    assert page.value("cbproxy_lock_waits_total", credential="default") == 1
    assert fake.token_calls["refresh_token"] == 1

    # A newer generation lands while this replica's token call is in flight: it loses.
    fake.token_delay = 0.5
    request = asyncio.create_task(get(proxy))
    while fake.token_calls["refresh_token"] < 2:
        await asyncio.sleep(0.01)
    stored = await store.load("default")
    assert stored is not None
    newer = stored.successor(
        access_token=fake.mint_access_token(), expires_at=clock() + 3600, refreshed_at=clock()
    )
    assert await store.put("default", newer)
    assert (await request)[0] == 200  # replayed with the newer replica's token
    page = await scrape(proxy)
    assert page.value("cbproxy_lock_losses_total", credential="default") == 1
    assert page.value("cbproxy_lock_waits_total", credential="default") == 1
    assert page.value("cbproxy_401_replays_total", credential="default", outcome="replayed") == 1


async def test_the_page_does_not_grow_with_the_number_of_connections() -> None:
    from prometheus_client import generate_latest

    from proxy.config import AppSettings, Settings
    from proxy.credentials import ApiKeyCredential
    from proxy.metrics import Metrics
    from proxy.registry import Registry
    from proxy.tokens import Kind, TokenRecord

    app = AppSettings("partner", "cid", "secret", "https://x/cb", delivery=Kind.API_KEY)

    async def page_with(n: int) -> bytes:
        store, metrics = MemoryStore(), Metrics()
        settings = Settings(credentials=(), apps=(app,))

        def make(cred: Any) -> ApiKeyCredential:
            return ApiKeyCredential(cred, store)

        registry = Registry(settings, store, make, metrics, FakeClock())
        for i in range(n):
            record = TokenRecord(
                f"cbat_{i}", 0.0, None, 1, app="partner", kind=Kind.API_KEY, properties=(str(i),)
            )
            await registry.apply(f"partner.property.{i}", record)
        body = generate_latest(metrics.registry)
        await registry.stop(0)
        # `_created` samples are timestamps, whose printed length varies by a digit or two.
        return b"\n".join(x for x in body.splitlines() if b"_created " not in x)

    small, large = await page_with(10), await page_with(1000)
    assert b'cbproxy_connections{app="partner",state="ok"} 1000.0' in large
    assert len(small.splitlines()) == len(large.splitlines())  # the same series
    assert len(large) - len(small) <= 4  # the count's digits, nothing more


def test_a_method_outside_the_usual_ones_counts_as_other() -> None:
    """aiohttp's pure-Python parser takes any method: the series must not grow with them."""
    from prometheus_client import generate_latest

    from proxy.metrics import Metrics

    metrics = Metrics()
    for n in range(50):
        metrics.answered(f"MADEUP{n}", "4xx")
    metrics.answered("GET", "2xx")
    page = generate_latest(metrics.registry).decode()
    assert 'cbproxy_requests_total{method="other",status_class="4xx"} 50.0' in page
    assert 'cbproxy_requests_total{method="GET",status_class="2xx"} 1.0' in page
    assert "MADEUP" not in page
