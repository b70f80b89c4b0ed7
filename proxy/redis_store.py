"""The store shared by a fleet of replicas: Redis, standalone, Sentinel or Cluster.

Key layout. Everything of the connection registry shares one Redis Cluster hash tag,
`{conns}`, so a write of a record, its indexes, its events and the change feed is one
atomic script even on a cluster (one slot; the traffic is a few writes a second):

    {prefix}:{conns}:rec:<id>       HASH  generation, data (RecordCodec), app, props
    {prefix}:{conns}:ids            ZSET  every connection id (score 0: paged by id)
    {prefix}:{conns}:app:<app>      ZSET  the app's connection ids
    {prefix}:{conns}:prop:<id>      SET   ids of the connections that cover a property
    {prefix}:{conns}:feed           STREAM one entry per write, field `id`
    {prefix}:{conns}:outbox         ZSET  event ids by sequence number
    {prefix}:{conns}:outbox:data    HASH  event id -> Event JSON
    {prefix}:{conns}:outbox:seq     STRING the last sequence number
    {prefix}:{conns}:outbox:lease   STRING the delivering replica, with a TTL
    {prefix}:{conns}:state:<state>  STRING an install state's data, 10 minutes
    {prefix}:{conns}:used           HASH  id -> when it was last used

Per connection, in the connection's own slot (single-key commands only):

    {prefix}:{cred:<id>}:lock       STRING the refresh lock's owner token, with a TTL
    {prefix}:{cred:<id>}:ratelimit  HASH  the rate limiter's state (proxy.ratelimit)
    {prefix}:{cred:<id>}:record     the layout before connections: read when a
                                    connection has no record yet, never written

Every redis exception is translated here, once, into `StoreUnavailable`, whose message
never carries the URL (it may hold a password) or a token. A store that answers late is
`StoreBusy` (a kind of StoreUnavailable): no pooled connection came free within
`pool_timeout` (CBPROXY_REDIS_POOL_TIMEOUT), or a command outlived the socket timeout. Only
a store that cannot be reached (refused, reset, unknown host, a connect that timed out) is
the plain StoreUnavailable that the outage rules (a refresh without the lock, readiness
failing) answer to.

Replicas. A master acknowledges a write before its replicas have it; if it dies then, the
replica Sentinel promotes holds the previous record, whose refresh token Cloudbeds may have
rotated away. So once this store has seen the master report a replica (`INFO replication`,
asked at the first write and at each `ping` until then), every record write is followed, on
the same connection, by `WAIT 1 <replica_wait>`; a write no replica acknowledged raises
`WriteNotReplicated` and the caller keeps the record unsaved and writes it again. A refused
write sets the stored generation to itself, so that the WAIT after it answers for the record
that is stored. Standalone Redis without replicas never waits; neither does Cluster, whose
client does not pin a write's connection (WAIT counts the writes of its own connection).
The knowledge is kept for the life of the process: a master left without replicas after a
failover answers WriteNotReplicated until one joins again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import unquote

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.lock import Lock
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable, StoreBusy, StoreUnavailable, WriteNotReplicated
from proxy.events import Event
from proxy.store import STATE_TTL, Batch, Page, RecordCodec, flatten, readable
from proxy.tokens import TokenRecord

log = structlog.get_logger(__name__)

RedisClient = aioredis.Redis | RedisCluster

# Write iff nothing is stored or the stored generation is older: a stale writer (say, a
# refresher whose lock expired) can never replace a newer token. In the same step: the
# app and property indexes, the events (outbox), and one change-feed entry.
# KEYS: record, ids, feed, outbox, outbox data, outbox seq.
# ARGV: generation, data, app, props (comma-separated), id, key base, feed length,
#       then event id and event JSON pairs.
_PUT_SCRIPT = """
local stored = redis.call('HGET', KEYS[1], 'generation')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  -- Unchanged, but a write all the same: it reaches the replication stream after the stored
  -- record, so a WAIT after a refusal answers for what the refusal names.
  redis.call('HSET', KEYS[1], 'generation', stored)
  return 0
end
local id, base = ARGV[5], ARGV[6]
local old_app = redis.call('HGET', KEYS[1], 'app')
if old_app and old_app ~= '' and old_app ~= ARGV[3] then
  redis.call('ZREM', base .. 'app:' .. old_app, id)
end
local old_props = redis.call('HGET', KEYS[1], 'props')
if old_props then
  for p in string.gmatch(old_props, '[^,]+') do redis.call('SREM', base .. 'prop:' .. p, id) end
end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'data', ARGV[2],
           'app', ARGV[3], 'props', ARGV[4])
redis.call('ZADD', KEYS[2], 0, id)
if ARGV[3] ~= '' then redis.call('ZADD', base .. 'app:' .. ARGV[3], 0, id) end
for p in string.gmatch(ARGV[4], '[^,]+') do redis.call('SADD', base .. 'prop:' .. p, id) end
for i = 8, #ARGV, 2 do
  local seq = redis.call('INCR', KEYS[6])
  redis.call('ZADD', KEYS[4], seq, ARGV[i])
  redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'id', id)
return 1
"""

# Take the outbox lease if it is free or already ours; renew it if ours.
_LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Replace an event's data only while it is still in the outbox (not delivered meanwhile).
_RETRY_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""

# The rate limiter's rules (`proxy.gcra.decide`), on Redis' clock. Numbers go back as
# strings: Redis truncates Lua numbers to integers. Returns {allowed, delay, paused_for,
# tat - now}.
_ADMIT_LUA = """
local EPSILON = 0.000001
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, burst, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tat', 'pause_until')
local tat = tonumber(state[1]) or 0
local pause_until = tonumber(state[2]) or 0
local new_tat = math.max(tat, now, pause_until) + interval
local delay = math.max(new_tat - burst * interval, pause_until, now) - now
if delay < EPSILON then delay = 0 end
local paused_for = math.max(pause_until - now, 0)
local function f(x) return string.format('%.6f', x) end
if delay > max_wait + EPSILON then
  return {0, f(delay), f(paused_for), f(math.max(tat - now, 0))}
end
redis.call('HSET', KEYS[1], 'tat', f(new_tat))
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(new_tat, pause_until) - now) * 1000) + 1000)
return {1, f(delay), f(paused_for), f(new_tat - now)}
"""

_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local pause_until = math.max(tonumber(redis.call('HGET', KEYS[1], 'pause_until')) or 0,
                             now + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'pause_until', string.format('%.6f', pause_until))
local ttl = math.ceil((pause_until - now) * 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return string.format('%.6f', pause_until - now)
"""

# Register this replica and count the live ones, on Redis' clock.
# ARGV: replica id, seconds after which a silent replica is dead.
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local dead_after = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - dead_after)
redis.call('PEXPIRE', KEYS[1], math.ceil(dead_after * 2000))
return redis.call('ZCARD', KEYS[1])
"""

# Redis failures that send the limiter to its local fallback. OSError covers sockets
# that fail below redis-py; TimeoutError is our own bound on the round trip.
_REDIS_FAILURES = (RedisError, OSError, TimeoutError)


FEED_LENGTH = 100_000
"""Feed entries kept (about): a follower further behind than this rereads everything."""
_FEED_BLOCK_MS = 1000
"""How long one read of the feed waits for news; below the socket timeout."""
_FEED_BATCH = 500
"""Feed entries one read returns at most: the records of a batch are read in one trip."""

REPLICA_WAIT = 1.0
"""Seconds a record write waits for a replica to acknowledge it (CBPROXY_REPLICA_WAIT)."""

_SCHEMES = "redis://, rediss://, redis+sentinel://, redis+cluster:// or rediss+cluster://"
_SENTINEL_PORT = 26379


@dataclasses.dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where CBPROXY_REDIS_URL points, parsed without any I/O."""

    kind: Literal["standalone", "sentinel", "cluster"]
    url: str | None = dataclasses.field(default=None, repr=False)
    """For standalone and cluster: the URL redis-py is given (cluster scheme rewritten)."""
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Classify and check a Redis URL; ValueError messages never include the URL."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"CBPROXY_REDIS_URL: not a URL; use {_SCHEMES}")
    if scheme in ("redis", "rediss"):
        return RedisTarget(kind="standalone", url=url)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return RedisTarget(kind="cluster", url=scheme.removesuffix("+cluster") + "://" + rest)
    if scheme == "redis+sentinel":
        return _parse_sentinel(rest)
    raise ValueError(f"CBPROXY_REDIS_URL: unsupported scheme {scheme!r}; use {_SCHEMES}")


def _parse_sentinel(rest: str) -> RedisTarget:
    """`[[user]:password@]host:port[,host:port]/service[/db]`; the password is the master's."""
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(part) for part in hosts.split(",") if part.strip())
    if not sentinels:
        raise ValueError("CBPROXY_REDIS_URL: a redis+sentinel:// URL needs host:port")
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(
            "CBPROXY_REDIS_URL: a redis+sentinel:// URL needs a path /service_name[/db]"
        )
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError("CBPROXY_REDIS_URL: the database in a sentinel URL must be a number")
    return RedisTarget(
        kind="sentinel",
        sentinels=sentinels,
        service=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError("CBPROXY_REDIS_URL: a sentinel address has no host")
    if port and not port.isdigit():
        raise ValueError("CBPROXY_REDIS_URL: a sentinel port must be a number")
    return host, int(port) if port else _SENTINEL_PORT


POOL_TIMEOUT = 2.0
"""Seconds a command waits for a free pooled connection (CBPROXY_REDIS_POOL_TIMEOUT)."""

PoolObserver = Callable[[float, bool], None]
"""Told (seconds waited for a pooled connection, whether the wait timed out)."""


class PoolTimeout(RedisError):
    """No pooled connection came free within the pool's timeout: Redis is busy, not gone."""


class _TimedPool(BlockingConnectionPool):
    """The bounded pool, its waits timed and a wait that timed out told apart.

    redis-py reports a pool wait that timed out as a ConnectionError, the class it also
    uses for a refused connection; here it is a `PoolTimeout`, so it translates to
    StoreBusy rather than to an outage.
    """

    observer: PoolObserver | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        timed_out = False
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if not isinstance(exc.__cause__, TimeoutError):  # a connect that failed
                raise
            timed_out = True
            raise PoolTimeout(f"no pooled connection within {self.timeout}s") from exc
        finally:
            if self.observer is not None:
                self.observer(time.monotonic() - started, timed_out)


def _busy(exc: BaseException) -> bool:
    """A store that answers late, as opposed to one that cannot be reached."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, RedisTimeoutError):
        # redis-py raises TimeoutError for a connect that timed out too: that one is a
        # store that cannot be reached (a firewall dropping packets), not a slow one.
        return not str(exc).startswith("Timeout connecting")
    # asyncio's and the socket's own timeouts on a command (socket.timeout is TimeoutError).
    return isinstance(exc, TimeoutError)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    # Only the exception's type: redis messages name hosts and may echo arguments.
    if _busy(exc):
        return StoreBusy(
            f"Redis is busy ({type(exc).__name__}: no answer in time); the call is tried "
            "again shortly and requests keep using the token in memory; if it lasts, "
            "raise CBPROXY_REDIS_POOL_TIMEOUT or look at Redis' latency"
        )
    unreachable = isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))
    what = "unreachable" if unreachable else "command failed"
    return StoreUnavailable(
        f"Redis {what} ({type(exc).__name__}); requests keep using the token in memory"
    )


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Translate redis and socket errors into StoreUnavailable, where they enter."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise _unavailable(exc) from exc


class RedisLock:
    """One acquisition of a credential's refresh lock (`SET NX PX`, compare-and-delete)."""

    def __init__(self, client: RedisClient, key: str, ttl: float) -> None:
        # A new Lock per acquisition and thread_local=False: the library's default keeps
        # the owner token in thread-local storage that every task on the loop shares.
        self._lock = Lock(client, key, timeout=ttl, blocking=False, thread_local=False)

    async def acquire(self) -> bool:
        with _redis_errors():
            return bool(await self._lock.acquire())

    async def release(self) -> None:
        """Release if still ours; a lock that expired or changed hands is left alone."""
        try:
            # The library's release is a Lua compare-and-delete on the owner token.
            await self._lock.release()
        except LockError:
            return
        except (RedisError, RedisClusterException, OSError) as exc:
            # Not raised: the lock frees itself when its TTL ends, and release() runs in
            # `finally` blocks where raising would hide the outcome of the refresh.
            log.warning("store.lock.release_failed", error=type(exc).__name__)

    async def extend(self, ttl: float) -> bool:
        """Reset the lock's TTL to `ttl` seconds; False when it is no longer ours."""
        with _redis_errors():
            try:
                return bool(await self._lock.extend(ttl, replace_ttl=True))
            except LockError:
                return False


class RedisStore:
    """`TokenStore` over Redis, shared by every replica that uses the same prefix."""

    shared = True

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "cbproxy",
        cipher: TokenCipher | None = None,
        replica_wait: float = REPLICA_WAIT,
    ) -> None:
        if replica_wait <= 0:  # WAIT with a timeout of 0 blocks for ever
            raise ValueError("replica_wait must be greater than 0")
        self.client = client
        self.replica_wait = replica_wait
        self.replicas = False
        """The master reported a replica once: every record write then waits for one."""
        self._asked_replicas = False
        self.prefix = prefix
        self.base = f"{prefix}:{{conns}}:"
        self._codec = RecordCodec(cipher)
        self._put = client.register_script(_PUT_SCRIPT)
        self._lease = client.register_script(_LEASE_SCRIPT)
        self._retry = client.register_script(_RETRY_SCRIPT)
        self._admit = client.register_script(_ADMIT_LUA)
        self._pause = client.register_script(_PAUSE_LUA)
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._sentinel: Sentinel | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "cbproxy",
        cipher: TokenCipher | None = None,
        socket_timeout: float = 2.0,
        max_connections: int = 64,
        pool_timeout: float = POOL_TIMEOUT,
        replica_wait: float = REPLICA_WAIT,
    ) -> RedisStore:
        """A store for CBPROXY_REDIS_URL. Connects lazily: call `ping()` to check.

        The pool is bounded and waits (up to `pool_timeout`) for a free connection: a busy
        store is a slow store, not a missing one, and a wait that runs out is StoreBusy.
        A write waits for a replica at most `replica_wait` seconds, and at most half
        `socket_timeout`.
        """
        target = parse_redis_url(url)
        # The answer to a WAIT may come `replica_wait` late: it must fit in the socket timeout.
        replica_wait = min(replica_wait, socket_timeout / 2)
        extra: dict[str, Any] = {"prefix": prefix, "cipher": cipher, "replica_wait": replica_wait}
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "socket_keepalive": True,
        }
        if target.kind == "sentinel":
            assert target.service is not None
            sentinel = Sentinel(list(target.sentinels), **options)  # type: ignore[no-untyped-call]
            client = sentinel.master_for(
                target.service,
                db=target.db,
                username=target.username,
                password=target.password,
            )
            store = cls(client, **extra)
            store._sentinel = sentinel
            return store
        assert target.url is not None
        if target.kind == "cluster":
            return cls(RedisCluster.from_url(target.url, **options), **extra)
        pool = _TimedPool.from_url(
            target.url, max_connections=max_connections, timeout=pool_timeout, **options
        )
        return cls(aioredis.Redis.from_pool(pool), **extra)

    def observe_pool(self, observer: PoolObserver) -> None:
        """Tell `observer` of every wait for a pooled connection (standalone Redis only)."""
        pool = getattr(self.client, "connection_pool", None)
        if isinstance(pool, _TimedPool):
            pool.observer = observer

    def key(self, name: str, suffix: str) -> str:
        """`{prefix}:{cred:<name>}:<suffix>`: one connection's own slot (lock, limiter)."""
        return f"{self.prefix}:{{cred:{name}}}:{suffix}"

    def record_key(self, name: str) -> str:
        return self.base + "rec:" + name

    async def load(self, name: str) -> TokenRecord | None:
        with _redis_errors():
            raw = await self.client.hget(self.record_key(name), "data")
            if raw is None:
                raw = await self.client.hget(self.key(name, "record"), "data")
        return None if raw is None else self._codec.decode(name, raw)

    async def load_many(self, names: Sequence[str]) -> dict[str, TokenRecord | RecordUnreadable]:
        """Many records in one round trip (a pipeline of HGETs); the old layout only for
        the ids that have no record in the new one (a second round trip, if any)."""
        unique = list(dict.fromkeys(names))
        with _redis_errors():
            raws = dict(zip(unique, await self._hget_many(unique), strict=True))
            missing = [n for n, raw in raws.items() if raw is None]
            if missing:
                pipe = self.client.pipeline(transaction=False)
                for name in missing:
                    pipe.hget(self.key(name, "record"), "data")
                raws.update(zip(missing, await pipe.execute(), strict=True))
        return {
            n: self._codec.decode_or_error(n, raw) for n, raw in raws.items() if raw is not None
        }

    async def put(self, name: str, record: TokenRecord, *, events: Sequence[Event] = ()) -> bool:
        b = self.base
        args: list[Any] = [
            record.generation,
            self._codec.encode(record),
            record.app or "",
            ",".join(record.properties),
            name,
            b,
            FEED_LENGTH,
        ]
        for event in events:
            args += [event.id, event.to_json()]
        keys = [self.record_key(name), b + "ids", b + "feed", b + "outbox", b + "outbox:data"]
        keys.append(b + "outbox:seq")
        with _redis_errors():
            if not self._asked_replicas:
                await self._learn_replicas()
            if not self.replicas:
                return bool(await self._put(keys=keys, args=args))
            # One pipeline, one connection: WAIT counts the writes of the connection it runs on.
            pipe = self.client.pipeline(transaction=False)
            # redis-py's Script takes a pipeline (it loads the script first); its stub says not.
            await self._put(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
            pipe.execute_command("WAIT", 1, max(1, round(self.replica_wait * 1000)))
            written, acknowledged = await pipe.execute()
        if int(acknowledged) < 1:
            log.warning("store.write.not_replicated", connection=name, wait=self.replica_wait)
            raise WriteNotReplicated(
                f"Redis took the write of {name!r} but no replica acknowledged it within "
                f"{self.replica_wait:g}s; it is kept in memory and written again"
            )
        return bool(written)

    async def _learn_replicas(self) -> None:
        """Ask the master whether it has replicas; once it had one, writes wait for one."""
        if self.replicas or isinstance(self.client, RedisCluster):
            self._asked_replicas = True
            return
        try:
            info = await self.client.info("replication")
        except ResponseError:
            # INFO refused (an ACL, a managed service): the store says nothing of replicas,
            # and writes count as done when Redis acknowledges them, as on a lone server.
            if not self._asked_replicas:
                log.warning("store.replicas.unknown", reason="INFO replication refused")
            self._asked_replicas = True
            return
        self._asked_replicas = True
        if int(info.get("connected_slaves", 0)) > 0:
            self.replicas = True
            log.info("store.replicas.seen", replicas=int(info["connected_slaves"]))

    async def page(
        self, *, app: str | None = None, cursor: str | None = None, limit: int = 100
    ) -> Page:
        index = self.base + (f"app:{app}" if app is not None else "ids")
        start = "-" if cursor is None else "(" + cursor
        with _redis_errors():
            names = [
                n.decode() if isinstance(n, bytes) else str(n)
                for n in await self.client.zrangebylex(index, start, "+", start=0, num=limit + 1)
            ]
            chosen = names[:limit]
            raws = await self._hget_many(chosen)
        pairs = zip(chosen, raws, strict=True)
        records = [(n, self._codec.decode_or_error(n, raw)) for n, raw in pairs if raw is not None]
        return records, (chosen[-1] if len(names) > limit else None)

    async def _hget_many(self, names: Sequence[str]) -> list[Any]:
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hget(self.record_key(name), "data")
        return list(await pipe.execute())

    async def covering(self, prop: str) -> list[str]:
        with _redis_errors():
            members = await self.client.smembers(self.base + "prop:" + prop)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def lock(self, name: str, ttl: float) -> RedisLock:
        return RedisLock(self.client, self.key(name, "lock"), ttl)

    async def position(self) -> str:
        with _redis_errors():
            entries = await self.client.xrevrange(self.base + "feed", count=1)
        return _text(entries[0][0]) if entries else "0-0"

    def changes(self, since: str) -> AsyncIterator[tuple[str, str | None]]:
        """(position, id) for each write after `since`; raises StoreUnavailable on a break."""
        return flatten(self.change_batches(since))

    async def change_batches(self, since: str) -> AsyncGenerator[Batch, None]:
        """The writes after `since`, one XREAD (up to `_FEED_BATCH` entries) at a time."""
        feed, last = self.base + "feed", since
        with _redis_errors():
            if last != "0-0" and not await self.client.xrange(feed, last, last):
                oldest = await self.client.xrange(feed, count=1)
                if oldest and _stream_id(_text(oldest[0][0])) > _stream_id(last):
                    yield [(last, None)]  # our position was trimmed away: entries were lost
        while True:
            with _redis_errors():
                answer: Any = await self.client.xread(
                    {feed: last}, count=_FEED_BATCH, block=_FEED_BLOCK_MS
                )
            for _, entries in answer or ():
                batch: Batch = []
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    batch.append((last, _text(fields.get(b"id", fields.get("id", b"")))))
                if batch:
                    yield batch

    async def save_state(self, state: str, data: Mapping[str, str]) -> None:
        with _redis_errors():
            await self.client.set(
                self.base + "state:" + state, json.dumps(dict(data)), px=int(STATE_TTL * 1000)
            )

    async def take_state(self, state: str) -> dict[str, str] | None:
        with _redis_errors():
            raw = await self.client.getdel(self.base + "state:" + state)
        return None if raw is None else dict(json.loads(raw))

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        with _redis_errors():
            return bool(
                await self._lease(keys=[self.base + "outbox:lease"], args=[owner, int(ttl * 1000)])
            )

    async def outbox_pending(self, limit: int) -> list[Event]:
        if limit <= 0:  # ZRANGE 0 -1 would be the whole outbox
            return []
        with _redis_errors():
            ids: list[Any] = list(await self.client.zrange(self.base + "outbox", 0, limit - 1))
            raws = await self.client.hmget(self.base + "outbox:data", ids) if ids else []
        return readable(zip((_text(i) for i in ids), raws, strict=True))

    async def outbox_done(self, event_id: str) -> None:
        with _redis_errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self.base + "outbox", event_id)
            pipe.hdel(self.base + "outbox:data", event_id)
            await pipe.execute()

    async def outbox_retry(self, event: Event) -> None:
        with _redis_errors():
            await self._retry(keys=[self.base + "outbox:data"], args=[event.id, event.to_json()])

    async def touch(self, used: Mapping[str, float]) -> None:
        if used:
            with _redis_errors():
                mapping: dict[Any, Any] = dict(used)
                await self.client.hset(self.base + "used", mapping=mapping)

    async def last_used(self, names: Sequence[str]) -> dict[str, float]:
        if not names:
            return {}
        with _redis_errors():
            values = await self.client.hmget(self.base + "used", list(names))
        return {n: float(v) for n, v in zip(names, values, strict=True) if v is not None}

    async def budget_admit(
        self, budget: str, interval: float, burst: int, max_wait: float
    ) -> tuple[float, float, float, float]:
        with _redis_errors():
            raw = await self._admit(
                keys=[self.key(budget, "ratelimit")], args=[interval, burst, max_wait]
            )
        allowed, delay, paused_for, tat_ahead = (float(x) for x in raw)
        return allowed, delay, paused_for, tat_ahead

    async def budget_pause(self, budget: str, seconds: float) -> None:
        with _redis_errors():
            await self._pause(keys=[self.key(budget, "ratelimit")], args=[seconds])

    async def heartbeat(self, replica_id: str, dead_after: float) -> int:
        with _redis_errors():
            # Not a budget's key: "" names the fleet-wide replica set.
            live = await self._heartbeat(
                keys=[self.key("", "ratelimit-replicas")], args=[replica_id, dead_after]
            )
        return int(live)

    async def ping(self) -> None:
        with _redis_errors():
            await self.client.ping()
            if not self.replicas:  # a replica added to a lone master is learnt here
                await self._learn_replicas()

    async def close(self) -> None:
        with _redis_errors():
            try:
                await self.client.aclose()
            finally:
                if self._sentinel is not None:
                    await self._sentinel.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)
