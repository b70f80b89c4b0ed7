"""Events end to end: two real `serve` processes on one real Redis, a real receiver.

The fake Cloudbeds and the receiver run in this process on real ports; the proxies are
reached only through their HTTP ports (the admin API) and the store's lease key. Each
change of a connection must reach the receiver once, signed, in order; when the replica
holding the outbox lease dies while an event is being retried, the other delivers it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.fake_cloudbeds import FakeCloudbeds
from tests.event_receiver import Receiver
from tests.support import ProxyProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SECRET = "e2e-events-secret-41c9"
ADMIN = "e2e-admin-token-0d7a"
CONNECTION = "test.property.1001"
CONFIG = """\
[apps.test]
client_id = "fake-client-id"
client_secret = "fake-client-secret"
redirect_uri = "https://localhost/callback"
post_app_state_on_delete = false
"""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver(SECRET).start()
    yield receiver
    await receiver.close()


@pytest.fixture
async def replicas(
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    real_redis: aioredis.Redis,
    fake_cloudbeds: tuple[FakeCloudbeds, str],
    receiver: Receiver,
) -> AsyncIterator[list[ProxyProcess]]:
    _, fake_url = fake_cloudbeds
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG)
    env = {
        "CBPROXY_UPSTREAM_URL": fake_url,
        "CBPROXY_TOKEN_URL": f"{fake_url}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{fake_url}/api/v1.3/oauth",
        "CBPROXY_REDIS_URL": redis_url,
        "CBPROXY_REDIS_PREFIX": key_prefix,
        "CBPROXY_ADMIN_TOKEN": ADMIN,
        "CBPROXY_EVENTS_URL": receiver.url,
        "CBPROXY_EVENTS_SECRET": SECRET,
    }
    procs = [
        ProxyProcess(env, tmp_path / f"replica-{n}.log", args=("--config", str(config)))
        for n in range(2)
    ]
    try:
        # Off the loop: the fake and the receiver answer on it while the proxies start.
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(p.astop() for p in procs))


async def admin(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with session.request(method, url, json=body, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def until(check: Any, timeout: float = 30.0) -> Any:
    """Poll an async check until it returns something truthy (a condition, not a timer)."""
    async with asyncio.timeout(timeout):
        while not (found := await check()):
            await asyncio.sleep(0.05)
    return found


def delivered_by(proc: ProxyProcess, event_id: str) -> bool:
    """True when `proc`'s log says it delivered the event."""
    lines = [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
    return any(
        line.get("event") == "events.delivered" and line.get("event_id") == event_id
        for line in lines
    )


async def test_each_change_reaches_the_receiver_once_and_survives_the_holder_dying(
    replicas: list[ProxyProcess],
    receiver: Receiver,
    fake_cloudbeds: tuple[FakeCloudbeds, str],
    real_redis: aioredis.Redis,
    key_prefix: str,
) -> None:
    fake, _ = fake_cloudbeds
    one, two = replicas
    path = f"/_proxy/admin/connections/{CONNECTION}"
    async with aiohttp.ClientSession() as session:
        body = {"app": "test", "refresh_token": "fake-refresh-token"}
        status, answer = await admin(session, "PUT", one.url + path, body)
        assert status == 201, answer
        await receiver.wait_for(lambda: len(receiver.of_type("connection.created")) == 1)

        async def has_token() -> bool:
            status, answer = await admin(session, "GET", two.url + path)
            return status == 200 and (answer["connection"]["expires_at"] or 0) > 0

        await until(has_token)  # one replica's refresh loop got the first token
        fake.reject_refresh = True
        await admin(session, "POST", one.url + path + "/refresh")
        await receiver.wait_for(
            lambda: len(receiver.of_type("connection.reauthorization_required")) == 1
        )
        status, answer = await admin(session, "DELETE", two.url + path)
        assert status == 204, answer
        await receiver.wait_for(lambda: len(receiver.of_type("connection.disconnected")) == 1)

        # With both replicas up, each change arrived once: no duplicates, even by id.
        accepted = list(receiver.accepted)
        assert receiver.rejected == [], "every POST carried a valid signature"
        assert [e["type"] for e in accepted] == [
            "connection.created",
            "connection.reauthorization_required",
            "connection.disconnected",
        ]
        assert len({e["id"] for e in accepted}) == 3
        assert [e["connection"]["state"] for e in accepted] == [
            "ok",
            "reauthorization_required",
            "disconnected",
        ]

        # The receiver fails; a re-import (a recovery) is retried by the lease holder...
        receiver.failing = True
        fake.reject_refresh = False
        status, answer = await admin(session, "PUT", two.url + path, body)
        assert status == 200, answer
        await receiver.wait_for(
            lambda: sum(e["type"] == "connection.recovered" for e in receiver.attempts) >= 2
        )
        (recovered,) = {e["id"] for e in receiver.attempts if e["type"] == "connection.recovered"}
        holder_id = await real_redis.get(f"{key_prefix}:{{conns}}:outbox:lease")
        assert holder_id is not None
        pid = int(holder_id.decode().split(":")[-2])
        holder, survivor = (one, two) if one.process and one.process.pid == pid else (two, one)
        assert holder.process is not None and holder.process.pid == pid

        # ...and dies mid-retry; the other replica takes the lease over and delivers it.
        holder.signal(signal.SIGKILL)
        holder.wait(10)
        receiver.failing = False
        await receiver.wait_for(
            lambda: any(e["id"] == recovered for e in receiver.accepted), timeout=60
        )
    assert await until(lambda: asyncio.to_thread(delivered_by, survivor, recovered))
    assert receiver.rejected == []
    by_type = collections.Counter(e["type"] for e in receiver.accepted)
    assert by_type == {
        "connection.created": 1,
        "connection.reauthorization_required": 1,
        "connection.disconnected": 1,
        "connection.recovered": 1,
    }
