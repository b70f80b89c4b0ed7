"""The stored connections load after the listener opens; requests are routed meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp

from proxy.app import create_app
from proxy.config import AppSettings
from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.store import MemoryStore, Page
from proxy.tokens import Kind, TokenRecord
from tests.support import serve, settings_for, wait_ready

HOTELS = "/api/v1.3/getHotels"
APP = AppSettings("partner", "cid", "secret", "https://x/cb", delivery=Kind.API_KEY)


class HeldLoadStore(MemoryStore):
    """A store whose pages wait for `release`: the test hook that keeps the load running."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def page(self, **kwargs: Any) -> Page:
        await self.release.wait()
        return await super().page(**kwargs)


async def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + path, headers=headers or {}) as response,
    ):
        return response.status, await response.json()


async def test_a_stored_connection_is_served_while_the_load_still_runs(
    fake_cloudbeds: tuple[FakeCloudbeds, str],
) -> None:
    fake, fake_url = fake_cloudbeds
    fake.add_api_key("cbat_stored_key_7")
    store = HeldLoadStore()
    record = TokenRecord(
        "cbat_stored_key_7", 0.0, None, 1, app="partner", kind=Kind.API_KEY, properties=("7",)
    )
    await store.put("partner.property.7", record)
    settings = dataclasses.replace(settings_for(fake_url), apps=(APP,))
    runner, url = await serve(create_app(settings, store=store))
    try:
        await wait_ready(url)  # ready: the configured credential works, the load still runs
        status, body = await get(url, "/_proxy/status")
        assert status == 200
        assert body["load"]["state"] == "loading"
        assert body["connections"] == {}
        assert "/_proxy/admin/connections" in body["listing"]

        by_id = {"X-Cloudbeds-Connection": "partner.property.7"}
        assert (await get(url, HOTELS, by_id))[0] == 200
        assert (await get(url, HOTELS, {"X-PROPERTY-ID": "7"}))[0] == 200
        status, body = await get(url, HOTELS, {"X-PROPERTY-ID": "8"})
        assert (status, body["error"]) == (404, "unknown_property")
        assert (await get(url, "/_proxy/status"))[1]["load"]["state"] == "loading"

        store.release.set()
        async with asyncio.timeout(10):
            while (body := (await get(url, "/_proxy/status"))[1])["load"]["state"] != "done":
                await asyncio.sleep(0.02)
        assert body["connections"] == {"partner": {"ok": 1}}
        readyz = (await get(url, "/_proxy/readyz"))[1]
        assert readyz["load"]["state"] == "done"
        assert readyz["connections"] == {"partner": {"ok": 1}}
        assert (await get(url, HOTELS, by_id))[0] == 200
    finally:
        store.release.set()
        await runner.cleanup()
