"""RedisStore.from_url against real servers: TLS (rediss://), a password, and Sentinel.

Each test starts its own `redis-server` processes on free ports (never 6379) and stops
them even when it fails. Certificates are a throwaway CA made here with `cryptography`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.errors import StoreUnavailable
from proxy.fake_cloudbeds import FakeCloudbeds
from proxy.redis_store import RedisStore
from proxy.tokens import TokenRecord
from tests.redis_server import RedisSentinel, RedisServer, TLSFiles
from tests.support import ProxyProcess, fake_env

pytestmark = pytest.mark.slow

PASSWORD = "pw-Tls9-s3cret"
ACCESS = "acc-5e4d3c2b1a09f8e7"


def record(generation: int) -> TokenRecord:
    return TokenRecord(
        access_token=ACCESS,
        expires_at=1_700_000_000.0 + generation,
        refresh_token="ref-1029384756",
        generation=generation,
        refreshed_at=1_699_990_000.0,
        properties=("12345",),
    )


# --- certificates ---------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA, written to `<name>.pem`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(cert, directory / f"{name}.pem")
    return key, cert


def make_tls_files(directory: Path) -> TLSFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost that it signed."""
    ca_key, ca_cert = make_ca(directory, "test-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(
        cert=directory / "server.pem", key=directory / "server.key", ca=directory / "test-ca.pem"
    )
    _write_cert(cert, files.cert)
    _write_key(key, files.key)
    return files


# --- helpers --------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., RedisStore]]:
    """`RedisStore.from_url` whose stores are all closed at the end, pass or fail."""
    made: list[RedisStore] = []

    def make(url: str, *, socket_timeout: float = 2.0) -> RedisStore:
        store = RedisStore.from_url(url, prefix="servers-test", socket_timeout=socket_timeout)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path)


@pytest.fixture
def tls_server(tls_files: TLSFiles) -> Iterator[RedisServer]:
    """A TLS-only redis-server (no plain TCP port) with a password."""
    with RedisServer(tls=tls_files, password=PASSWORD) as server:
        yield server


async def next_change(listener: RedisStore, writer: RedisStore, name: str) -> str | None:
    """Follow `listener`'s feed from its end, `put` as `writer`, return the id it reports."""
    changes = listener.changes(await listener.position())
    try:
        pending = asyncio.ensure_future(anext(changes))
        assert await writer.put(name, record(1))
        return (await asyncio.wait_for(pending, 5))[1]
    finally:
        await changes.aclose()


async def exercise(store: RedisStore) -> None:
    """put/load a record, take and release the lock: the store's round trip."""
    await store.ping()
    assert await store.put("default", record(1))
    assert not await store.put("default", record(1))
    assert await store.load("default") == record(1)
    held = store.lock("default", 30)
    assert await held.acquire()
    assert not await store.lock("default", 30).acquire()
    assert await held.extend(30)
    await held.release()
    again = store.lock("default", 30)
    assert await again.acquire()
    await again.release()


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it was raised from or during."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def assert_unavailable_hides(exc: StoreUnavailable, *secrets: str) -> None:
    message = str(exc)
    assert message.startswith("Redis "), message
    for secret in secrets:
        assert secret not in message
    assert "redis://" not in message
    assert "rediss://" not in message


# --- TLS ------------------------------------------------------------------------------


async def test_tls_store_round_trip_lock_and_changes(
    tls_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    assert tls_server.url.startswith("rediss://")
    writer, reader = stores(tls_server.url), stores(tls_server.url)
    await exercise(writer)
    assert await next_change(reader, writer, "second") == "second"


async def test_tls_client_really_uses_tls(tls_server: RedisServer) -> None:
    """The server has no plain port: a redis:// client to the TLS port cannot talk to it."""
    plain = RedisStore.from_url(
        f"redis://:{PASSWORD}@127.0.0.1:{tls_server.port}/0", socket_timeout=1
    )
    try:
        with pytest.raises(StoreUnavailable):
            await plain.ping()
    finally:
        await plain.close()


async def test_tls_wrong_ca_is_unavailable_without_secrets(
    tls_server: RedisServer, tmp_path: Path, stores: Callable[..., RedisStore]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    make_ca(other, "other-ca")
    wrong_ca = str(other / "other-ca.pem")
    url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_server.port}/0?ssl_ca_certs={wrong_ca}"
    store = stores(url, socket_timeout=1)
    for call in (store.ping, lambda: store.load("default"), lambda: store.lock("x", 5).acquire()):
        with pytest.raises(StoreUnavailable) as caught:
            await call()
        assert_unavailable_hides(caught.value, PASSWORD, url, wrong_ca, str(tls_server.port))
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(caught.value))


async def test_tls_wrong_password_is_unavailable_without_it(
    tls_server: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    url = tls_server.url.replace(PASSWORD, "not-the-password")
    with pytest.raises(StoreUnavailable) as caught:
        await stores(url).ping()
    assert_unavailable_hides(caught.value, PASSWORD, "not-the-password", url)


# --- password -------------------------------------------------------------------------


async def test_password_server(stores: Callable[..., RedisStore]) -> None:
    with RedisServer(password=PASSWORD) as server:
        assert server.url == f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        await exercise(stores(server.url))

        for url in (
            server.url.replace(PASSWORD, "wrong-pw-77"),
            f"redis://127.0.0.1:{server.port}/0",  # no password at all
        ):
            with pytest.raises(StoreUnavailable) as caught:
                await stores(url).load("default")
            assert_unavailable_hides(caught.value, PASSWORD, "wrong-pw-77", url)


# --- Sentinel -------------------------------------------------------------------------


@pytest.mark.parametrize("password", [None, PASSWORD], ids=["open", "auth-pass"])
async def test_sentinel_finds_the_master(
    password: str | None, tmp_path: Path, stores: Callable[..., RedisStore]
) -> None:
    with RedisServer(password=password) as master:
        with RedisSentinel(master, tmp_path) as sentinel:
            expected = f"127.0.0.1:{sentinel.port}/mymaster/0"
            assert sentinel.url.endswith(expected)
            assert (password is not None) == (f":{PASSWORD}@" in sentinel.url)
            store = stores(sentinel.url)
            await exercise(store)

            # The record is on the master the sentinel named, not somewhere else.
            direct = aioredis.Redis.from_url(master.url)
            try:
                assert await direct.hget(store.record_key("default"), "generation") == b"1"
            finally:
                await direct.aclose()

            assert await next_change(store, stores(sentinel.url), "other") == "other"

            if password is not None:
                wrong = stores(sentinel.url.replace(PASSWORD, "wrong-pw-77"))
                with pytest.raises(StoreUnavailable) as caught:
                    await wrong.load("default")
                assert_unavailable_hides(caught.value, PASSWORD, "wrong-pw-77")


async def test_sentinel_unknown_service_is_unavailable(
    tmp_path: Path, stores: Callable[..., RedisStore]
) -> None:
    with RedisServer() as master:
        with RedisSentinel(master, tmp_path) as sentinel:
            store = stores(f"redis+sentinel://127.0.0.1:{sentinel.port}/no-such-master/0")
            with pytest.raises(StoreUnavailable) as caught:
                await store.ping()
            assert_unavailable_hides(caught.value)


# --- Cluster --------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_one_node_cluster(
    tls: bool, tmp_path: Path, stores: Callable[..., RedisStore]
) -> None:
    """redis+cluster:// and rediss+cluster:// on a one-node cluster holding every slot."""
    files = make_tls_files(tmp_path) if tls else None
    with RedisServer(tls=files, cluster_dir=tmp_path) as node:
        options = f"?ssl_ca_certs={quote(str(files.ca), safe='')}" if files else ""
        admin = aioredis.Redis.from_url(node.url)
        try:
            await admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]

            async def cluster_ok() -> bool:
                info = await admin.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                text = info.decode() if isinstance(info, bytes) else str(info)
                return "cluster_state:ok" in text

            await eventually(cluster_ok, timeout=10)  # Redis waits ~2 s before it says ok
        finally:
            await admin.aclose()

        scheme = "rediss+cluster" if tls else "redis+cluster"
        store = stores(f"{scheme}://127.0.0.1:{node.port}/0{options}")
        await exercise(store)
        assert await next_change(store, store, "other") == "other"


# --- the whole proxy over TLS ---------------------------------------------------------


async def test_proxy_process_serves_with_a_tls_redis_url(
    tls_server: RedisServer,
    fake_cloudbeds: tuple[FakeCloudbeds, str],
    tmp_path: Path,
    stores: Callable[..., RedisStore],
) -> None:
    state, fake_url = fake_cloudbeds
    env = {
        **fake_env(fake_url),
        "CBPROXY_REDIS_URL": tls_server.url,
        "CBPROXY_REDIS_PREFIX": "servers-test",
        "PYTHONUNBUFFERED": "1",
    }
    proxy = ProxyProcess(env, tmp_path / "proxy.log")
    try:
        await asyncio.to_thread(proxy.start)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.url}/api/v1.3/getHotels") as response:
                assert response.status == 200, await response.text()
        # The token the proxy used is the one it shared through the TLS Redis.
        stored = await stores(tls_server.url).load("default")
        assert stored is not None
        assert stored.access_token in state.valid_access_tokens()
    finally:
        await proxy.astop()
    log = proxy.log_text()
    assert PASSWORD not in log
    assert "rediss://" not in log
