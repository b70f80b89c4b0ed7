"""The token store shared by a fleet of replicas: Redis, standalone, Sentinel or Cluster.

Key layout, one Redis Cluster hash tag per credential so its keys share a slot:

    {prefix}:{cred:<name>}:record   HASH  generation (int), data (JSON of the record)
    {prefix}:{cred:<name>}:lock     STRING the refresh lock's owner token, with a TTL
    {prefix}:changes                pub/sub channel; messages are credential names

`data` is `TokenRecord.to_json()`; with a cipher its access and refresh tokens are
ciphertext and the JSON carries `"enc": 1`. A plaintext record still reads with a
cipher (migration: the next write encrypts it); an encrypted one never reads without.

Every redis exception is translated here, once, into `StoreUnavailable`, whose message
never carries the URL (it may hold a password) or a token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any, Literal
from urllib.parse import unquote

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.lock import Lock
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.crypto import TokenCipher
from proxy.errors import RecordUnreadable, StoreUnavailable
from proxy.tokens import TokenRecord

log = structlog.get_logger(__name__)

RedisClient = aioredis.Redis | RedisCluster

# Write iff nothing is stored or the stored generation is older: a stale writer (say, a
# refresher whose lock expired) can never replace a newer token. Atomic because it is
# one script.
_PUT_SCRIPT = """
local stored = redis.call('HGET', KEYS[1], 'generation')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'data', ARGV[2])
return 1
"""

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


def _unavailable(exc: BaseException) -> StoreUnavailable:
    # Only the exception's type: redis messages name hosts and may echo arguments.
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
        self, client: RedisClient, *, prefix: str = "cbproxy", cipher: TokenCipher | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.channel = f"{prefix}:changes"
        self._cipher = cipher
        self._put = client.register_script(_PUT_SCRIPT)
        self._sentinel: Sentinel | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "cbproxy",
        cipher: TokenCipher | None = None,
        socket_timeout: float = 2.0,
    ) -> RedisStore:
        """A store for CBPROXY_REDIS_URL. Connects lazily: call `ping()` to check."""
        target = parse_redis_url(url)
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
            store = cls(client, prefix=prefix, cipher=cipher)
            store._sentinel = sentinel
            return store
        assert target.url is not None
        if target.kind == "cluster":
            return cls(RedisCluster.from_url(target.url, **options), prefix=prefix, cipher=cipher)
        return cls(aioredis.Redis.from_url(target.url, **options), prefix=prefix, cipher=cipher)

    def key(self, name: str, suffix: str) -> str:
        """`{prefix}:{cred:<name>}:<suffix>`: the hash tag keeps a credential in one slot."""
        return f"{self.prefix}:{{cred:{name}}}:{suffix}"

    async def load(self, name: str) -> TokenRecord | None:
        with _redis_errors():
            raw = await self.client.hget(self.key(name, "record"), "data")
        if raw is None:
            return None
        return self._decode(name, raw)

    async def put(self, name: str, record: TokenRecord) -> bool:
        data = json.dumps(self._encode(record), separators=(",", ":"))
        with _redis_errors():
            written = await self._put(
                keys=[self.key(name, "record")], args=[record.generation, data]
            )
        if not written:
            return False
        try:
            with _redis_errors():
                await self.client.publish(self.channel, name)
        except StoreUnavailable as exc:
            # The record is written; replicas that miss the message find it by polling.
            log.warning("store.publish.failed", credential=name, error=exc.message)
        return True

    def lock(self, name: str, ttl: float) -> RedisLock:
        return RedisLock(self.client, self.key(name, "lock"), ttl)

    async def changes(self) -> AsyncGenerator[str, None]:
        """Names published on the channel; raises StoreUnavailable when the link breaks."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            with _redis_errors():
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        data = message["data"]
                        yield data.decode() if isinstance(data, bytes) else str(data)
            raise StoreUnavailable("Redis subscription ended; changes are found by polling")
        finally:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ping(self) -> None:
        with _redis_errors():
            await self.client.ping()

    async def close(self) -> None:
        with _redis_errors():
            try:
                await self.client.aclose()
            finally:
                if self._sentinel is not None:
                    await self._sentinel.aclose()

    def _encode(self, record: TokenRecord) -> dict[str, Any]:
        data = record.to_json()
        if self._cipher is not None:
            for field in ("access_token", "refresh_token"):
                if data[field] is not None:
                    data[field] = self._cipher.encrypt(data[field])
            data["enc"] = 1
        return data

    def _decode(self, name: str, raw: bytes | str) -> TokenRecord:
        try:
            data = json.loads(raw)
            encrypted = bool(data.pop("enc", 0))
        except (ValueError, TypeError, AttributeError):
            raise RecordUnreadable(
                f"stored record for credential {name!r} is not valid JSON; "
                "delete it and seed the credential again"
            ) from None
        if encrypted:
            if self._cipher is None:
                raise RecordUnreadable(
                    f"stored record for credential {name!r} is encrypted but "
                    "CBPROXY_ENCRYPTION_KEY is not set; set the key that wrote it"
                )
            for field in ("access_token", "refresh_token"):
                if data.get(field) is not None:
                    data[field] = self._cipher.decrypt(data[field])
        try:
            return TokenRecord.from_json(data)
        except (KeyError, ValueError, TypeError):
            raise RecordUnreadable(
                f"stored record for credential {name!r} is missing fields or malformed; "
                "delete it and seed the credential again"
            ) from None
