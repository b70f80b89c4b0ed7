"""Replicas and failover: a record write is done once a Redis replica has it.

A master acknowledges a write before its replicas have it; a failover then brings back the
record from before a refresh, whose refresh token Cloudbeds has rotated away. The store
waits for a replica (`WAIT`) and says when none took a write (`WriteNotReplicated`); the
coordinator keeps that record unsaved and writes it again; a grant wins over what a failover
brought back (`resolve`), and a refusal of the dead token marks nothing while this process
holds the later grant. Real `redis-server` processes on free ports (never 6379), stopped
even when a test fails; the last test is a whole Sentinel failover under two `serve`
processes and the fake Cloudbeds rotating refresh tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from fakeredis import aioredis as fake_aioredis

from proxy.clock import system_clock
from proxy.config import ConfigError, load_settings
from proxy.coordinator import OAuthCredential
from proxy.errors import StoreUnavailable, WriteNotReplicated
from proxy.events import Event
from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.metrics import Metrics
from proxy.redis_store import RedisStore
from proxy.store import MemoryStore
from proxy.tokens import State, TokenRecord
from tests.redis_server import RedisSentinel, RedisServer
from tests.support import ProxyProcess, fake_env, free_port, settings_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

NAME = "default"
PREFIX = "failover-test"
Fake = tuple[FakeCloudbeds, str]


def record(generation: int, refresh_token: str = "ref-1") -> TokenRecord:
    return TokenRecord(
        access_token=f"acc-{generation}",
        expires_at=1_700_003_600.0,
        refresh_token=refresh_token,
        generation=generation,
        refreshed_at=1_700_000_000.0 + generation,
    )


# --- helpers ---------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    """Until `check()` holds; an AssertionError naming `what` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not reached within {timeout}s: {what}") from None


async def ask(port: int, *command: Any) -> Any:
    """One command to the server on `port`; connection errors propagate."""
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def replication(server: RedisServer) -> dict[str, Any]:
    client = aioredis.Redis.from_url(server.url, socket_timeout=2)
    try:
        return dict(await client.info("replication"))
    finally:
        await client.aclose()


async def in_sync(master: RedisServer, replica: RedisServer) -> None:
    """Until the replica is linked to `master`, has everything it wrote, and the master
    counts it online (only then does it acknowledge a WAIT)."""

    async def check() -> bool:
        ours, theirs = await replication(master), await replication(replica)
        online = [
            value
            for key, value in ours.items()
            if key.startswith("slave") and isinstance(value, dict)
            if value.get("port") == replica.port and value.get("state") == "online"
        ]
        return (
            bool(online)
            and theirs.get("master_port") == master.port
            and theirs.get("master_link_status") == "up"
            and theirs.get("slave_repl_offset") == ours.get("master_repl_offset")
        )

    await eventually(check, f"replica {replica.port} in sync with {master.port}")
    # After a full sync the master streams to the replica only from its first ACK (sent
    # once a second): a write acknowledged here means the next ones flow at once.
    client = aioredis.Redis.from_url(master.url, socket_timeout=10)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.set("failover-test:sync-probe", replica.port)
        pipe.execute_command("WAIT", 1, 5000)
        assert (await pipe.execute())[1] == 1, "the replica acknowledged nothing in 5 s"
    finally:
        await client.aclose()


async def wait_calls(server: RedisServer) -> int:
    """How many WAIT commands the server has run."""
    client = aioredis.Redis.from_url(server.url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def stored_on(server: RedisServer, name: str = NAME) -> TokenRecord | None:
    """The record as `server` holds it (a replica answers reads too)."""
    store = RedisStore(aioredis.Redis.from_url(server.url, socket_timeout=2), prefix=PREFIX)
    try:
        return await store.load(name)
    finally:
        await store.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RedisServer, RedisServer]]:
    """A master and its replica, in sync."""
    master = RedisServer()
    replica = RedisServer(replica_of=master)
    try:
        master.start()
        replica.start()
        await in_sync(master, replica)
        yield master, replica
    finally:
        replica.stop()
        master.stop()


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., RedisStore]]:
    """RedisStores on a server's URL, all closed at the end."""
    made: list[RedisStore] = []

    def make(server: RedisServer, *, replica_wait: float = 0.3) -> RedisStore:
        client = aioredis.Redis.from_url(server.url, socket_timeout=2)
        made.append(RedisStore(client, prefix=PREFIX, replica_wait=replica_wait))
        return made[-1]

    yield make
    for store in made:
        with contextlib.suppress(StoreUnavailable):
            await store.close()


# --- the store: WAIT -----------------------------------------------------------------


async def test_a_write_is_done_once_the_replica_has_it(
    pair: tuple[RedisServer, RedisServer], stores: Callable[..., RedisStore]
) -> None:
    master, replica = pair
    store = stores(master)
    waits = await wait_calls(master)
    assert await store.put(NAME, record(1))
    assert store.replicas
    assert await wait_calls(master) == waits + 1
    assert await stored_on(replica) == record(1)


async def test_a_write_no_replica_took_raises_and_is_written_again(
    pair: tuple[RedisServer, RedisServer], stores: Callable[..., RedisStore]
) -> None:
    master, replica = pair
    store = stores(master)
    assert await store.put(NAME, record(1))
    replica.pause()
    try:
        with pytest.raises(WriteNotReplicated) as caught:
            await store.put(NAME, record(2))
        # A kind of StoreUnavailable (callers keep the record and write it again), and
        # the master did take it.
        assert isinstance(caught.value, StoreUnavailable)
        assert caught.value.code == "write_not_replicated"
        assert "acc-2" not in str(caught.value)
        assert "ref-1" not in str(caught.value)
        assert await stored_on(master) == record(2)
        # Written again while the replica still has nothing: refused (the master has it),
        # and still not done.
        with pytest.raises(WriteNotReplicated):
            await store.put(NAME, record(2))
    finally:
        replica.resume()
    await in_sync(master, replica)
    # Written again once the replica is back: refused, and done.
    assert not await store.put(NAME, record(2))
    assert await stored_on(replica) == record(2)


async def test_a_write_with_the_replica_link_cut_raises(
    pair: tuple[RedisServer, RedisServer], stores: Callable[..., RedisStore]
) -> None:
    """The master drops the link: it has no replica connected when the write comes."""
    master, replica = pair
    store = stores(master)
    assert await store.put(NAME, record(1))
    await ask(replica.port, "REPLICAOF", "127.0.0.1", free_port())
    async with asyncio.timeout(10):
        while (await replication(master)).get("connected_slaves"):
            await asyncio.sleep(0.05)
    with pytest.raises(WriteNotReplicated):
        await store.put(NAME, record(2))
    assert await stored_on(replica) == record(1)


async def test_a_lone_redis_never_waits(
    private_redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(private_redis)
    await store.ping()
    assert await store.put(NAME, record(1))
    assert not await store.put(NAME, record(1))
    assert await store.put(NAME, record(2))
    assert not store.replicas
    assert await wait_calls(private_redis) == 0


async def test_ping_learns_a_replica_that_joins_later(
    private_redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    store = stores(private_redis)
    assert await store.put(NAME, record(1))
    assert not store.replicas
    with RedisServer(replica_of=private_redis) as replica:
        await in_sync(private_redis, replica)
        await store.ping()
        assert store.replicas
        waits = await wait_calls(private_redis)
        assert await store.put(NAME, record(2))
        assert await wait_calls(private_redis) == waits + 1
        assert await stored_on(replica) == record(2)


async def test_a_server_that_refuses_info_writes_without_waiting() -> None:
    """fakeredis knows neither INFO nor WAIT, as a Redis whose ACL refuses them."""
    store = RedisStore(fake_aioredis.FakeRedis(), prefix=PREFIX)
    assert await store.put(NAME, record(1))
    await store.ping()
    assert not store.replicas
    assert await store.load(NAME) == record(1)


def test_the_wait_is_bounded() -> None:
    url = "redis://127.0.0.1:1/0"
    assert RedisStore.from_url(url).replica_wait == 1.0
    assert RedisStore.from_url(url, replica_wait=0.2).replica_wait == 0.2
    # At most half the socket timeout, so the answer always comes before it.
    assert RedisStore.from_url(url, socket_timeout=0.5, replica_wait=1.0).replica_wait == 0.25
    with pytest.raises(ValueError, match="greater than 0"):
        RedisStore(fake_aioredis.FakeRedis(), replica_wait=0)
    base = fake_env("http://127.0.0.1:1")
    assert load_settings(base).replica_wait == 1.0
    assert load_settings({**base, "CBPROXY_REPLICA_WAIT": "0.25"}).replica_wait == 0.25
    for bad in ("0", "-1", "1.5", "nan"):
        with pytest.raises(ConfigError, match="CBPROXY_REPLICA_WAIT"):
            load_settings({**base, "CBPROXY_REPLICA_WAIT": bad})


# --- the coordinator: a grant no replica took stays unsaved ------------------------


@contextlib.asynccontextmanager
async def credential_on(store: Any, fake_url: str) -> AsyncIterator[OAuthCredential]:
    settings = settings_for(fake_url)
    async with aiohttp.ClientSession() as session:
        yield OAuthCredential(
            settings.credentials[0],
            settings,
            store=store,
            session=session,
            metrics=Metrics(),
            clock=system_clock,
        )


async def test_a_refresh_no_replica_took_stays_unsaved_until_one_has_it(
    pair: tuple[RedisServer, RedisServer],
    stores: Callable[..., RedisStore],
    fake_cloudbeds: Fake,
) -> None:
    master, replica = pair
    state, fake_url = fake_cloudbeds
    state.rotate_refresh_tokens = True
    store = stores(master)
    async with credential_on(store, fake_url) as credential:
        await credential.start()
        first = await credential.refresh_now()
        assert first is not None
        assert first.access_token is not None
        assert not credential.unsaved
        replica.pause()
        try:
            grant = await credential.refresh_now()
            assert grant is not None
            assert grant.generation == first.generation + 1
            assert credential.unsaved  # the master has it, no replica does
            assert await stored_on(master) == grant
            await credential.reload()  # the poll's write-back: still no replica
            assert credential.unsaved
        finally:
            replica.resume()
        await in_sync(master, replica)
        await credential.reload()
        assert not credential.unsaved
        assert credential.record == grant
        assert await stored_on(replica) == grant
        assert grant.refresh_token in state.valid_refresh_tokens()


# --- the coordinator: what a failover brought back --------------------------------


class FailingOver(MemoryStore):
    """A MemoryStore whose writes land but, while `unreplicated`, raise WriteNotReplicated;
    `fail_over` puts back a record from before, as a promoted replica does."""

    unreplicated = False

    async def put(self, name: str, record: TokenRecord, *, events: Sequence[Event] = ()) -> bool:
        written = await super().put(name, record, events=events)
        if self.unreplicated:
            raise WriteNotReplicated("Redis took the write but no replica did (test)")
        return written

    def fail_over(self, name: str, record: TokenRecord) -> None:
        self._records[name] = record


async def grant_the_store_loses(
    credential: OAuthCredential, store: FailingOver
) -> tuple[TokenRecord, TokenRecord]:
    """(the record before, the grant after): a refresh the master took and no replica did,
    then a failover back to the record before, whose refresh token is now dead."""
    await credential.start()
    before = await credential.refresh_now()
    store.unreplicated = True
    grant = await credential.refresh_now()
    assert before is not None
    assert grant is not None
    assert credential.unsaved
    store.fail_over(NAME, before)
    return before, grant


async def test_a_grant_wins_over_a_refusal_written_on_what_a_failover_brought_back(
    fake_cloudbeds: Fake,
) -> None:
    state, fake_url = fake_cloudbeds
    state.rotate_refresh_tokens = True
    store = FailingOver()
    async with credential_on(store, fake_url) as credential:
        before, grant = await grant_the_store_loses(credential, store)
        # Another replica refreshed from the record the failover brought back: Cloudbeds
        # refused its dead token; then an edit was made on top (a generation past the grant).
        refusal = before.successor(state=State.REAUTHORIZATION_REQUIRED)
        edited = refusal.successor(metadata={"note": "edited"})
        assert edited.generation > grant.generation
        store.fail_over(NAME, edited)
        store.unreplicated = False
        await credential.reload()  # the poll writes the grant back
        assert not credential.unsaved
        stored = await store.load(NAME)
        assert stored is not None
        assert stored.state is State.OK
        assert stored.refresh_token == grant.refresh_token
        assert stored.generation == edited.generation + 1
        assert credential.record == stored
        assert grant.refresh_token in state.valid_refresh_tokens()


async def test_a_refusal_of_a_token_older_than_a_grant_held_here_marks_nothing(
    fake_cloudbeds: Fake,
) -> None:
    state, fake_url = fake_cloudbeds
    state.rotate_refresh_tokens = True
    store = FailingOver()
    async with credential_on(store, fake_url) as credential:
        before, grant = await grant_the_store_loses(credential, store)
        # Written on the record the failover brought back, past the grant's generation, and
        # adopted here (the change feed): this process now refreshes from its dead token.
        edited = before.successor(metadata={"note": "edited"}).successor()
        store.fail_over(NAME, edited)
        credential.adopt(edited)
        rejected = state.token_calls["refresh_token"]
        await credential.refresh_now()
        assert state.token_calls["refresh_token"] == rejected + 1  # Cloudbeds refused it
        assert credential.record is not None
        assert credential.record.state is State.OK
        assert credential.record.refresh_token == grant.refresh_token
        assert credential.unsaved
        # Nothing was written that says reauthorization_required; the grant goes back.
        assert (await store.load(NAME)) == edited
        store.unreplicated = False
        await credential.reload()
        stored = await store.load(NAME)
        assert stored is not None
        assert stored.state is State.OK
        assert stored.refresh_token == grant.refresh_token
        assert not credential.unsaved


# --- a whole failover under Sentinel ------------------------------------------------


@dataclasses.dataclass
class Watch:
    """Polls every proxy in `procs` for the state it shows; keeps every state it saw."""

    procs: list[ProxyProcess]
    seen: set[str] = dataclasses.field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                for proc in list(self.procs):
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        async with session.get(proc.url + "/_proxy/tokens") as response:
                            body = await response.json(content_type=None)
                            self.seen.add(str(body.get(NAME, {}).get("state")))
                await asyncio.sleep(0.05)


async def tokens(proc: ProxyProcess) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proc.url + "/_proxy/tokens") as response,
    ):
        body: dict[str, Any] = (await response.json(content_type=None))[NAME]
        return body


async def admin_refresh(proc: ProxyProcess, admin_token: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {admin_token}"}
    url = f"{proc.url}/_proxy/admin/connections/{NAME}/refresh"
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def log_events(proc: ProxyProcess, *names: str) -> list[dict[str, Any]]:
    found = []
    for line in proc.log_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") in names:
                found.append(entry)
    return found


async def master_port(sentinel: RedisSentinel) -> int | None:
    with contextlib.suppress(OSError, aioredis.RedisError):
        answer = await ask(sentinel.port, "SENTINEL", "get-master-addr-by-name", sentinel.service)
        return int(answer[1]) if answer else None
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def sentinels_ready(sentinels: list[RedisSentinel], replica: RedisServer) -> bool:
    """Every sentinel knows the others (a quorum can vote) and the replica (one to promote)."""
    for sentinel in sentinels:
        try:
            await ask(sentinel.port, "SENTINEL", "CKQUORUM", sentinel.service)
            known = await ask(sentinel.port, "SENTINEL", "REPLICAS", sentinel.service)
        except (OSError, aioredis.RedisError):
            return False
        # One flat field-value mapping per instance (bytes keys on RESP2).
        fields = [{_text(k): _text(v) for k, v in dict(r).items()} for r in known]
        ports = [int(f["port"]) for f in fields if "s_down" not in f.get("flags", "")]
        peers = await ask(sentinel.port, "SENTINEL", "SENTINELS", sentinel.service)
        if replica.port not in ports or len(peers) < len(sentinels) - 1:
            return False
    return True


async def test_a_sentinel_failover_after_an_unreplicated_refresh_needs_no_human(
    fake_cloudbeds: Fake, tmp_path: Path
) -> None:
    """Master, replica, three sentinels; two `serve` processes; rotating refresh tokens.

    The replica's link is cut, one refresh lands on the master alone (Cloudbeds has rotated
    the old refresh token away), the master dies and Sentinel promotes the replica, which
    holds the record from before. The proxies that hold the grant are then replaced by new
    ones, which know only what the store holds: it must be the grant (or later), so that
    their refresh works and no replica ever shows `reauthorization_required`.
    """
    state, fake_url = fake_cloudbeds
    state.rotate_refresh_tokens = True
    admin_token = "admin-failover-7f3e1d"
    master = RedisServer()
    replica = RedisServer(replica_of=master)
    sentinels = [
        RedisSentinel(master, tmp_path, quorum=2, down_after_ms=1000, failover_timeout_ms=10000)
        for _ in range(3)
    ]
    procs: list[ProxyProcess] = []
    watch = Watch(procs)
    stop_watch = asyncio.Event()
    watcher: asyncio.Task[None] | None = None

    async def start_proxies(count: int) -> list[ProxyProcess]:
        env = {
            **fake_env(fake_url),
            "CBPROXY_REDIS_URL": sentinels[0].url.replace(
                f"127.0.0.1:{sentinels[0].port}",
                ",".join(f"127.0.0.1:{s.port}" for s in sentinels),
            ),
            "CBPROXY_REDIS_PREFIX": PREFIX,
            "CBPROXY_ADMIN_TOKEN": admin_token,
            "CBPROXY_POLL_INTERVAL": "0.5",
            "CBPROXY_TOKEN_TIMEOUT": "2",
            "CBPROXY_LOCK_TTL": "3",
            "CBPROXY_REPLICA_WAIT": "1",
            "PYTHONUNBUFFERED": "1",
        }
        made = [ProxyProcess(env, tmp_path / f"proxy{len(procs) + i}.log") for i in range(count)]
        procs.extend(made)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in made))
        return made

    async def all_ready(these: list[ProxyProcess]) -> bool:
        for proc in these:
            with contextlib.suppress(aiohttp.ClientError):
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(proc.url + "/_proxy/readyz") as response,
                ):
                    if response.status == 200:
                        continue
            return False
        return True

    try:
        master.start()
        replica.start()
        for sentinel in sentinels:
            sentinel.start()
        await in_sync(master, replica)
        await eventually(lambda: sentinels_ready(sentinels, replica), "sentinels ready", 30)

        first = await start_proxies(2)
        await eventually(lambda: all_ready(first), "the first proxies ready")
        watcher = asyncio.create_task(watch.run(stop_watch))
        await in_sync(master, replica)
        before = await stored_on(replica)
        assert before is not None
        assert before.refresh_token in state.valid_refresh_tokens()

        # Cut the replica's link (it follows a port nobody listens on), then refresh once.
        await ask(replica.port, "REPLICAOF", "127.0.0.1", free_port())
        status, body = await admin_refresh(first[0], admin_token)
        assert status == 200, body
        grant = await stored_on(master)
        assert grant is not None
        assert grant.generation == before.generation + 1
        assert before.refresh_token not in state.valid_refresh_tokens()  # rotated away
        assert grant.refresh_token in state.valid_refresh_tokens()

        async def both_have_the_grant() -> bool:
            return all([(await tokens(p))["generation"] == grant.generation for p in first])

        await eventually(both_have_the_grant, "both proxies on the grant")

        # The master dies; Sentinel promotes the replica, which has the record from before.
        master.kill()

        async def promoted() -> bool:
            ports = [await master_port(s) for s in sentinels]
            return all(port == replica.port for port in ports)

        await eventually(promoted, "Sentinel promoted the replica", 60)
        assert (await replication(replica))["role"] == "master"

        # The old master comes back empty and follows the new one (what Sentinel does on
        # its next look at it, up to 10 s later).
        master.start()
        await ask(master.port, "REPLICAOF", "127.0.0.1", replica.port)
        await in_sync(replica, master)

        async def all_saved() -> bool:
            return not any([(await tokens(p))["unsaved"] for p in first])

        await eventually(all_saved, "every proxy's writes done")
        await in_sync(replica, master)

        # Every proxy that held the grant is replaced: only the store has it now.
        await asyncio.gather(*(p.astop() for p in first))
        for proc in first:
            procs.remove(proc)
        fresh = await start_proxies(2)
        await eventually(lambda: all_ready(fresh), "the fresh proxies ready")
        status, body = await admin_refresh(fresh[1], admin_token)
        assert status == 200, body
        await eventually(lambda: all_ready(fresh), "the fresh proxies ready after a refresh")
        final = await stored_on(replica)
        assert final is not None
        assert final.state is State.OK
        assert final.generation > grant.generation
        assert final.refresh_token in state.valid_refresh_tokens()
    finally:
        stop_watch.set()
        if watcher is not None:
            await watcher
        await asyncio.gather(*(p.astop() for p in procs))
        for server in (*sentinels, replica, master):
            server.stop()

    assert State.REAUTHORIZATION_REQUIRED.value not in watch.seen, watch.seen
    assert watch.seen == {State.OK.value}
    for proc in (*first, *fresh):
        assert not log_events(proc, "token.refresh.rejected"), proc.log_text()[-3000:]
    # The grant was held back for want of a replica, as the failover needed.
    deferred = log_events(first[0], "token.write.deferred")
    assert any(e.get("reason") == "write_not_replicated" for e in deferred), deferred
