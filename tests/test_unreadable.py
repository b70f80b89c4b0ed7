"""A record the store holds but this replica cannot read: a configuration error, no outage."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet

from proxy.crypto import TokenCipher
from proxy.redis_store import RedisStore
from proxy.tokens import TokenRecord
from tests.support import settings_for

pytestmark = pytest.mark.redis
KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.mark.parametrize("damage", ["other_key", "garbage"])
async def test_an_unreadable_record_is_never_reseeded_nor_overwritten(
    fake_cloudbeds: Any,
    start_proxy: Any,
    redis_url: str,
    key_prefix: str,
    real_redis: aioredis.Redis,
    captured_logs: io.StringIO,
    damage: str,
) -> None:
    state, fake_url = fake_cloudbeds
    writer = RedisStore.from_url(
        redis_url, prefix=key_prefix, cipher=TokenCipher.from_keys([KEY_A])
    )
    await writer.put("default", TokenRecord("stored-access", 1e12, "stored-refresh", 7))
    await writer.close()
    key = f"{key_prefix}:{{conns}}:rec:default"
    if damage == "garbage":
        await real_redis.hset(key, "data", "{not json")
    before = await real_redis.hgetall(key)
    settings = settings_for(
        fake_url,
        CBPROXY_REDIS_URL=redis_url,
        CBPROXY_REDIS_PREFIX=key_prefix,
        CBPROXY_ENCRYPTION_KEY=KEY_B,
        CBPROXY_POLL_INTERVAL="0.1",
    )
    proxy = await start_proxy(settings, ready=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy}/_proxy/readyz") as response:
            assert response.status == 503
            check = (await response.json())["checks"]["credential:default"]
        assert check["ok"] is False
        assert check["detail"].startswith("store_unreadable")
        async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
            assert response.status == 503
            assert response.headers["X-Cloudbeds-Proxy-Error"] == "record_unreadable"
            body = await response.json()
        assert "stored-" not in json.dumps(body)
        async with session.get(f"{proxy}/_proxy/tokens") as response:
            assert (await response.json())["default"]["state"] == "store_unreadable"
    assert sum(state.token_calls.values()) == 0  # no re-seed, no refresh of its own
    assert state.api_calls == 0
    assert await real_redis.hgetall(key) == before  # never overwritten
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line]
    errors = [line for line in lines if line.get("event") == "store.record_unreadable"]
    assert len(errors) == 1
    assert errors[0]["credential"] == "default"
    assert "stored-" not in captured_logs.getvalue()
