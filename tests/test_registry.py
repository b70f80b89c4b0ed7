"""The registry in process: one credential per connection, whatever arrives at once."""

from __future__ import annotations

import asyncio
import contextlib

from proxy.clock import FakeClock
from proxy.config import AppSettings, Settings
from proxy.credentials import ApiKeyCredential, Credential
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.registry import Registry
from proxy.store import MemoryStore
from proxy.tokens import Kind, TokenRecord

APP = AppSettings("partner", "cid", "secret", "https://x/cb", delivery=Kind.API_KEY)


class SlowStore(MemoryStore):
    """Reads take a turn of the loop, as every real store's do."""

    async def load(self, name: str) -> TokenRecord | None:
        await asyncio.sleep(0.01)
        return await super().load(name)


def registry(store: SlowStore) -> tuple[Registry, list[Credential]]:
    made: list[Credential] = []

    def make(settings: object) -> Credential:
        credential = ApiKeyCredential(settings, store)  # type: ignore[arg-type]
        made.append(credential)
        return credential

    settings = Settings(credentials=(), apps=(APP,))
    return Registry(settings, store, make, Metrics(), FakeClock()), made


def key(generation: int, props: tuple[str, ...] = ("1",)) -> TokenRecord:
    return TokenRecord(
        "cbat_key", 0.0, None, generation, app="partner", kind=Kind.API_KEY, properties=props
    )


async def test_a_write_and_its_feed_entry_arriving_together_make_one_credential() -> None:
    store = SlowStore()
    reg, made = registry(store)
    await store.put("partner.property.1", key(1))
    await asyncio.gather(reg.apply("partner.property.1", key(1)), reg.changed("partner.property.1"))
    assert len(made) == 1
    assert reg.route({"X-PROPERTY-ID": "1"}, {}) is made[0]
    await reg.stop(0)
    assert all(task.done() for task in reg._tasks.values())


async def test_a_replaced_credential_never_leaves_a_dangling_route() -> None:
    store = SlowStore()
    reg, made = registry(store)
    await reg.apply("partner.property.1", key(1))
    # Imported again under the other kind: made anew, and routing finds the new one.
    oauth = TokenRecord("tok", 1e12, "r", 2, app="partner", properties=("1",))
    replaced = asyncio.ensure_future(reg.apply("partner.property.1", oauth))
    await asyncio.sleep(0)
    with contextlib.suppress(ProxyError):  # a routing error at worst, never a KeyError
        reg.route({"X-PROPERTY-ID": "1"}, {})
    await replaced
    assert reg.connections["partner.property.1"] is not made[0]
    await reg.stop(0)
