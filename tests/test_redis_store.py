"""RedisStore: fakeredis for the logic, the real Redis for atomicity, pub/sub and outages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import fakeredis
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from fakeredis import aioredis as fake_aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable, StoreUnavailable
from proxy.redis_store import RedisStore, RedisTarget, parse_redis_url
from proxy.store import RefreshLock, TokenStore
from proxy.tokens import State, TokenRecord
from tests.redis_server import RedisServer

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
ACCESS = "acc-9f8e7d6c5b4a39281706"
REFRESH = "ref-0a1b2c3d4e5f60718293"


def record(generation: int, *, access: str = ACCESS, refresh: str = REFRESH) -> TokenRecord:
    return TokenRecord(
        access_token=access,
        expires_at=1_700_000_000.0 + generation,
        refresh_token=refresh,
        generation=generation,
        refreshed_at=1_699_990_000.0,
        properties=("12345", "67890"),
    )


def every_operation(store: RedisStore) -> list[Callable[[], Awaitable[object]]]:
    """One call of each store operation that talks to Redis."""
    return [
        store.ping,
        lambda: store.load("default"),
        lambda: store.put("default", record(2)),
        lambda: store.lock("default", 30).acquire(),
    ]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `check` until it holds; for effects that happen in another process."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


# --- URL parsing (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:pw@cache.example:6380/2", "REDIS://h/0"],
)
def test_parse_standalone_keeps_the_url(url: str) -> None:
    assert parse_redis_url(url) == RedisTarget(kind="standalone", url=url)


@pytest.mark.parametrize(
    ("url", "rewritten"),
    [
        ("redis+cluster://:pw@node1:7000", "redis://:pw@node1:7000"),
        ("rediss+cluster://node1:7000/0", "rediss://node1:7000/0"),
    ],
)
def test_parse_cluster_rewrites_the_scheme(url: str, rewritten: str) -> None:
    assert parse_redis_url(url) == RedisTarget(kind="cluster", url=rewritten)


def test_parse_sentinel_with_password_hosts_service_and_db() -> None:
    target = parse_redis_url("redis+sentinel://:p%40ss@s1:26379,s2:26380,s3/mymaster/3")
    assert target == RedisTarget(
        kind="sentinel",
        sentinels=(("s1", 26379), ("s2", 26380), ("s3", 26379)),
        service="mymaster",
        db=3,
        password="p@ss",
    )
    assert "p@ss" not in repr(target)


def test_parse_sentinel_minimal_and_ipv6() -> None:
    assert parse_redis_url("redis+sentinel://[::1]:5000/svc") == RedisTarget(
        kind="sentinel", sentinels=(("::1", 5000),), service="svc"
    )
    user = parse_redis_url("redis+sentinel://alice:pw@h:1/svc/")
    assert (user.username, user.password, user.db) == ("alice", "pw", 0)


@pytest.mark.parametrize(
    "url",
    [
        "http://:hunter2@host/0",
        "hunter2-no-scheme",
        "redis+sentinel://:hunter2@/svc",
        "redis+sentinel://:hunter2@h:26379",
        "redis+sentinel://:hunter2@h:26379/svc/notadb",
        "redis+sentinel://:hunter2@h:port/svc",
        "redis+sentinel://:hunter2@h:1/svc/0/extra",
    ],
)
def test_parse_errors_never_show_the_url(url: str) -> None:
    with pytest.raises(ValueError, match="CBPROXY_REDIS_URL") as caught:
        parse_redis_url(url)
    assert "hunter2" not in str(caught.value)


async def test_from_url_builds_each_kind_of_client_without_connecting() -> None:
    plain = RedisStore.from_url("redis://:pw@127.0.0.1:1/4", socket_timeout=0.5)
    tls = RedisStore.from_url("rediss://127.0.0.1:1/0")
    sentinel = RedisStore.from_url("redis+sentinel://:pw@127.0.0.1:1/svc/2")
    cluster = RedisStore.from_url("redis+cluster://127.0.0.1:1")
    try:
        assert isinstance(plain.client, aioredis.Redis)
        kwargs = plain.client.connection_pool.connection_kwargs
        assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (4, "pw", 0.5)
        assert isinstance(tls.client, aioredis.Redis)
        assert tls.client.connection_pool.connection_class is SSLConnection
        assert isinstance(sentinel.client, aioredis.Redis)
        pool = sentinel.client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert (pool.service_name, pool.connection_kwargs["db"]) == ("svc", 2)
        assert isinstance(cluster.client, RedisCluster)
    finally:
        for store in (plain, tls, sentinel, cluster):
            await store.close()


# --- unit tests on fakeredis ----------------------------------------------------------


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def fake_client(server: fakeredis.FakeServer) -> AsyncIterator[fake_aioredis.FakeRedis]:
    client = fake_aioredis.FakeRedis(server=server)
    yield client
    await client.aclose()


def fake_store(client: fake_aioredis.FakeRedis, cipher: TokenCipher | None = None) -> RedisStore:
    return RedisStore(client, prefix="t", cipher=cipher)


async def test_key_layout_shares_one_hash_tag_for_the_registry(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    store = fake_store(fake_client)
    assert store.record_key("default") == "t:{conns}:rec:default"
    assert store.key("default", "lock") == "t:{cred:default}:lock"
    assert store.shared is True
    as_protocol: TokenStore = store  # mypy checks RedisStore against the protocol
    lock: RefreshLock = as_protocol.lock("default", 1)
    assert lock is not None
    await store.put("default", record(1))
    stored = await fake_client.hgetall("t:{conns}:rec:default")
    assert stored[b"generation"] == b"1"
    assert json.loads(stored[b"data"]) == record(1).to_json()
    assert await fake_client.zrange("t:{conns}:ids", 0, -1) == [b"default"]
    assert await fake_client.xlen("t:{conns}:feed") == 1


async def test_a_record_in_the_older_layout_is_read(fake_client: fake_aioredis.FakeRedis) -> None:
    store = fake_store(fake_client)
    data = json.dumps(record(4).to_json())
    await fake_client.hset("t:{cred:default}:record", mapping={"generation": 4, "data": data})
    assert await store.load("default") == record(4)
    assert await store.put("default", record(5))  # written in the new layout from then on
    assert await store.load("default") == record(5)


async def test_load_returns_what_put_stored(fake_client: fake_aioredis.FakeRedis) -> None:
    store = fake_store(fake_client)
    assert await store.load("default") is None
    assert await store.put("default", record(3)) is True
    assert await store.load("default") == record(3)
    assert await store.load("other") is None


async def test_put_refuses_an_older_or_equal_generation(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    store = fake_store(fake_client)
    assert await store.put("default", record(5))
    assert await store.put("default", record(5, access="same-gen")) is False
    assert await store.put("default", record(4, access="older")) is False
    assert (await store.load("default")) == record(5)
    assert await store.put("default", record(6, access="newer"))
    loaded = await store.load("default")
    assert loaded is not None
    assert loaded.access_token == "newer"


async def test_reauthorization_state_and_missing_tokens_round_trip(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    store = fake_store(fake_client, TokenCipher.from_keys([KEY_A]))
    rec = TokenRecord(
        access_token=None,
        expires_at=0.0,
        refresh_token=None,
        generation=2,
        state=State.REAUTHORIZATION_REQUIRED,
    )
    await store.put("default", rec)
    assert await store.load("default") == rec


async def test_put_feeds_the_name_and_changes_follow_from_a_position(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    store = fake_store(fake_client)
    start = await store.position()
    await store.put("default", record(1))
    assert await store.put("default", record(1)) is False  # refused: not in the feed
    await store.put("other", record(1))
    changes = store.changes(start)
    first = await asyncio.wait_for(anext(changes), 5)
    second = await asyncio.wait_for(anext(changes), 5)
    await changes.aclose()
    assert [first[1], second[1]] == ["default", "other"]
    # A follower that resumes from a position sees only what came after it.
    await store.put("third", record(1))
    resumed = store.changes(second[0])
    assert (await asyncio.wait_for(anext(resumed), 5))[1] == "third"
    await resumed.aclose()


async def test_a_follower_whose_position_was_trimmed_rereads(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    store = fake_store(fake_client)
    await store.put("a", record(1))
    position = await store.position()
    await store.put("b", record(1))
    await fake_client.xtrim("t:{conns}:feed", maxlen=1, approximate=False)  # "a"'s entry is gone
    changes = store.changes(position)
    assert await asyncio.wait_for(anext(changes), 5) == (position, None)
    await changes.aclose()


async def _data(client: aioredis.Redis, key: str) -> bytes:
    raw = await client.hget(key, "data")
    assert isinstance(raw, bytes)
    return raw


async def _numsub(client: aioredis.Redis, channel: str, count: int) -> bool:
    numsub = await client.pubsub_numsub(channel)
    return int(numsub[0][1]) >= count


async def test_encrypted_record_hides_tokens_and_marks_itself(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    store = fake_store(fake_client, TokenCipher.from_keys([KEY_A]))
    await store.put("default", record(1))
    raw = await _data(fake_client, store.record_key("default"))
    assert ACCESS.encode() not in raw
    assert REFRESH.encode() not in raw
    assert json.loads(raw)["enc"] == 1
    assert await store.load("default") == record(1)


async def test_encrypted_record_without_a_key_is_unreadable(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    await fake_store(fake_client, TokenCipher.from_keys([KEY_A])).put("default", record(1))
    with pytest.raises(RecordUnreadable, match="CBPROXY_ENCRYPTION_KEY is not set"):
        await fake_store(fake_client).load("default")


async def test_plaintext_record_reads_with_a_key_then_is_rewritten_encrypted(
    fake_client: fake_aioredis.FakeRedis,
) -> None:
    await fake_store(fake_client).put("default", record(1))
    encrypting = fake_store(fake_client, TokenCipher.from_keys([KEY_A]))
    assert await encrypting.load("default") == record(1)
    await encrypting.put("default", record(2))
    raw = await _data(fake_client, encrypting.record_key("default"))
    assert ACCESS.encode() not in raw
    assert await encrypting.load("default") == record(2)


@pytest.mark.parametrize(
    "data", [b"{not json", b"[]", b'"text"', b'{"generation": 1}', b'{"state": "odd"}']
)
async def test_corrupt_record_is_unreadable(
    fake_client: fake_aioredis.FakeRedis, data: bytes
) -> None:
    store = fake_store(fake_client)
    await fake_client.hset(store.record_key("default"), mapping={"generation": 1, "data": data})
    with pytest.raises(RecordUnreadable, match="'default'"):
        await store.load("default")


async def test_lock_on_fakeredis(fake_client: fake_aioredis.FakeRedis) -> None:
    store = fake_store(fake_client)
    first, second = store.lock("default", 30), store.lock("default", 30)
    assert await first.acquire()
    assert not await second.acquire()
    await second.release()  # not the owner: a no-op, no exception
    assert await fake_client.exists(store.key("default", "lock"))
    assert await first.extend(60)
    assert not await second.extend(60)
    await first.release()
    await first.release()  # twice: still no exception
    assert await second.acquire()
    await second.release()


async def test_connection_errors_become_store_unavailable(
    server: fakeredis.FakeServer, fake_client: fake_aioredis.FakeRedis
) -> None:
    store = fake_store(fake_client, TokenCipher.from_keys([KEY_A]))
    await store.put("default", record(1))
    held = store.lock("default", 30)
    assert await held.acquire()
    server.connected = False
    await held.release()  # Redis gone: the TTL frees the lock, release must not raise
    for call in every_operation(store):
        with pytest.raises(StoreUnavailable) as caught:
            await call()
        assert type(caught.value) is StoreUnavailable
        assert str(caught.value) == (
            "Redis unreachable (ConnectionError); requests keep using the token in memory"
        )
    await store.lock("default", 30).release()  # never raises
    with pytest.raises(StoreUnavailable):
        await anext(store.changes("0-0"))
    server.connected = True
    assert await store.load("default") == record(1)
    assert await fake_client.exists(store.key("default", "lock"))


# --- integration tests on the real Redis ----------------------------------------------


@pytest.fixture
async def make_store(
    redis_url: str, key_prefix: str, real_redis: aioredis.Redis
) -> AsyncIterator[Callable[..., RedisStore]]:
    """Stores on the real Redis under this test's prefix; all closed at the end."""
    stores: list[RedisStore] = []

    def make(keys: str | None = None) -> RedisStore:
        cipher = TokenCipher.from_value(keys) if keys else None
        store = RedisStore.from_url(redis_url, prefix=key_prefix, cipher=cipher)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def all_values(client: aioredis.Redis, prefix: str) -> list[bytes]:
    """Every byte Redis holds under `prefix`: DUMP of each key, and HGETALL of hashes."""
    values: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}*"):
        dumped = await client.dump(key)
        assert isinstance(dumped, bytes)
        values += [key, dumped]
        if await client.type(key) == b"hash":
            hash_items = await client.hgetall(key)
            for field, value in hash_items.items():
                assert isinstance(field, bytes)
                assert isinstance(value, bytes)
                values += [field, value]
    return values


@pytest.mark.redis
async def test_real_cas_refuses_older_or_equal(make_store: Callable[..., RedisStore]) -> None:
    store = make_store()
    assert await store.put("default", record(2))
    assert not await store.put("default", record(2, access="equal"))
    assert not await store.put("default", record(1, access="older"))
    assert await store.load("default") == record(2)
    assert await store.put("default", record(3))


@pytest.mark.redis
async def test_real_concurrent_puts_of_one_generation_one_wins(
    make_store: Callable[..., RedisStore],
) -> None:
    stores = [make_store() for _ in range(8)]
    puts = [
        store.put("default", record(7, access=f"writer-{i}")) for i, store in enumerate(stores * 4)
    ]
    results = await asyncio.gather(*puts)
    assert results.count(True) == 1
    winner = results.index(True)
    loaded = await stores[0].load("default")
    assert loaded is not None
    assert loaded.access_token == f"writer-{winner}"


@pytest.mark.redis
async def test_real_feed_delivers_names_to_other_replicas(
    make_store: Callable[..., RedisStore],
) -> None:
    writer, reader = make_store(), make_store()
    changes = reader.changes(await reader.position())
    pending = asyncio.ensure_future(anext(changes))
    await writer.put("group-a", record(1))
    assert (await asyncio.wait_for(pending, 5))[1] == "group-a"
    await writer.put("group-b", record(1))
    assert (await asyncio.wait_for(anext(changes), 5))[1] == "group-b"
    await changes.aclose()


@pytest.mark.redis
async def test_real_lock_is_exclusive_and_safe(
    make_store: Callable[..., RedisStore], real_redis: aioredis.Redis
) -> None:
    one, two = make_store(), make_store()
    holder = one.lock("default", 30)
    assert await holder.acquire()
    intruder = two.lock("default", 30)
    assert not await intruder.acquire()
    await intruder.release()  # a non-owner's release must not free the lock
    assert await real_redis.exists(one.key("default", "lock"))
    assert not await two.lock("default", 30).acquire()
    await holder.release()
    assert await intruder.acquire()
    await intruder.release()


@pytest.mark.redis
async def test_real_lock_ttl_frees_it(
    make_store: Callable[..., RedisStore], real_redis: aioredis.Redis
) -> None:
    store = make_store()
    stale = store.lock("default", 0.1)
    assert await stale.acquire()
    # The TTL runs on Redis' clock, which a test cannot fake; wait for the key to go.
    await eventually(lambda: _gone(real_redis, store.key("default", "lock")))
    fresh = store.lock("default", 30)
    assert await fresh.acquire()
    await stale.release()  # expired owner: must not delete the new holder's lock
    assert await real_redis.exists(store.key("default", "lock"))
    await fresh.release()


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return not await client.exists(key)


@pytest.mark.redis
async def test_real_no_token_in_plaintext_anywhere(
    make_store: Callable[..., RedisStore], real_redis: aioredis.Redis, key_prefix: str
) -> None:
    store = make_store(KEY_A)
    await store.put("default", record(1))
    await store.put("second", record(1, access=ACCESS + "-2", refresh=REFRESH + "-2"))
    lock = store.lock("default", 30)
    assert await lock.acquire()
    values = await all_values(real_redis, key_prefix)
    assert len(values) > 4
    for value in values:
        assert ACCESS.encode() not in value
        assert REFRESH.encode() not in value
    await lock.release()
    assert await store.load("second") == record(1, access=ACCESS + "-2", refresh=REFRESH + "-2")


@pytest.mark.redis
async def test_real_key_rotation(make_store: Callable[..., RedisStore]) -> None:
    await make_store(KEY_A).put("default", record(1))
    rotating = make_store(f"{KEY_B},{KEY_A}")
    assert await rotating.load("default") == record(1)
    assert await rotating.put("default", record(2))
    assert await make_store(KEY_B).load("default") == record(2)
    with pytest.raises(RecordUnreadable):
        await make_store(KEY_A).load("default")


@pytest.mark.redis
async def test_real_wrong_key_is_unreadable_not_a_crash(
    make_store: Callable[..., RedisStore],
) -> None:
    await make_store(KEY_A).put("default", record(1))
    wrong = make_store(KEY_B)
    with pytest.raises(RecordUnreadable, match="wrong CBPROXY_ENCRYPTION_KEY"):
        await wrong.load("default")
    await wrong.ping()  # the store itself still works
    assert await wrong.put("default", record(2))  # a newer record (re-seed) recovers
    assert await wrong.load("default") == record(2)


@pytest.mark.redis
@pytest.mark.slow
async def test_private_server_killed_then_restarted() -> None:
    password = "pw-Zq81-secret"
    server = RedisServer(password=password)
    server.start()
    store = RedisStore.from_url(server.url, prefix="outage", socket_timeout=0.5)
    changes = store.changes("0-0")
    try:
        await store.ping()
        pending = asyncio.ensure_future(anext(changes))
        assert await store.put("default", record(1))
        assert (await asyncio.wait_for(pending, 5))[1] == "default"
        pending = asyncio.ensure_future(anext(changes))

        server.kill()
        for call in every_operation(store):
            with pytest.raises(StoreUnavailable) as caught:
                await call()
            message = str(caught.value)
            assert password not in message
            assert server.url not in message
            assert str(server.port) not in message
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(pending, 30)
        assert password not in str(caught.value)

        server.restart()
        await store.ping()
        assert await store.load("default") is None  # nothing persisted
        assert await store.put("default", record(2))
        assert await store.load("default") == record(2)
    finally:
        await changes.aclose()
        await store.close()
        server.stop()


@pytest.mark.redis
async def test_real_load_many_reads_both_layouts_and_names_unreadable_records(
    make_store: Callable[..., RedisStore], real_redis: aioredis.Redis
) -> None:
    store = make_store(KEY_A)
    await store.put("a", record(1))
    await make_store(KEY_B).put("b", record(2))  # another key: unreadable here
    # The layout before connections, read when the new one has nothing.
    await real_redis.hset(store.key("old", "record"), "data", store._codec.encode(record(3)))
    found = await store.load_many(["a", "b", "old", "missing"])
    assert found["a"] == record(1)
    assert found["old"] == record(3)
    assert isinstance(found["b"], RecordUnreadable)
    assert "missing" not in found


def test_a_timeout_is_a_busy_store_and_a_refusal_an_unreachable_one() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from proxy.errors import StoreBusy
    from proxy.redis_store import PoolTimeout, _unavailable

    assert isinstance(_unavailable(PoolTimeout("no pooled connection")), StoreBusy)
    assert isinstance(_unavailable(RedisTimeoutError("Timeout reading from h:1")), StoreBusy)
    assert isinstance(_unavailable(TimeoutError()), StoreBusy)
    for down in (
        RedisTimeoutError("Timeout connecting to server"),
        RedisConnectionError("Error 111 connecting to h:1. Connection refused."),
        ConnectionResetError(),
    ):
        translated = _unavailable(down)
        assert isinstance(translated, StoreUnavailable)
        assert not isinstance(translated, StoreBusy)
    assert _unavailable(PoolTimeout("x")).code == "store_busy"


@pytest.mark.redis
async def test_real_a_pool_wait_that_times_out_is_store_busy_and_counted(
    redis_url: str, key_prefix: str
) -> None:
    from proxy.errors import StoreBusy

    store = RedisStore.from_url(redis_url, prefix=key_prefix, max_connections=1, pool_timeout=0.1)
    waits: list[tuple[float, bool]] = []
    store.observe_pool(lambda seconds, timed_out: waits.append((seconds, timed_out)))
    try:
        await store.ping()
        # The pool's one connection is held by a blocking read for a second.
        held = asyncio.ensure_future(store.client.blpop([key_prefix + ":nothing"], timeout=1))
        await asyncio.sleep(0.05)
        with pytest.raises(StoreBusy, match="CBPROXY_REDIS_POOL_TIMEOUT"):
            await store.load("a")
        await held
        assert any(timed_out for _, timed_out in waits)
        assert await store.load("a") is None  # free again: the store answers
    finally:
        await store.close()


async def test_an_unreachable_redis_is_not_busy() -> None:
    from proxy.errors import StoreBusy

    store = RedisStore.from_url("redis://127.0.0.1:1/0", socket_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.load("a")
        assert not isinstance(caught.value, StoreBusy)
    finally:
        await store.close()
