"""The forwarder's own client (proxy.upstream.Upstream): its pool and its wire."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.upstream import UnreadableAnswer, Upstream
from tests.test_redis_servers import make_tls_files

# --- the forwarder's client (proxy.upstream.Upstream) against a raw HTTP/1.1 server ------


class RawServer:
    """An HTTP/1.1 server on 127.0.0.1 that answers each request head as `answer` says,
    and records the connections and the bytes each request came with."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer or (lambda n, head: OK)
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.closed = 0

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                self.bodies.append(await _read_body(reader, head))
                reply = self.answer(n, head)
                n += 1
                if reply is None:  # close without answering
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lowered = head.lower()
    if b"content-length:" in lowered:
        length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
        return await reader.readexactly(length)
    if b"transfer-encoding: chunked" not in lowered:
        return b""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        body += (await reader.readexactly(size + 2))[:size]
        if not size:
            return body


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@contextlib.asynccontextmanager
async def client(url: str, **overrides: Any) -> AsyncIterator[Upstream]:
    """An `Upstream` for `url` (small limits, overridable), closed at the end."""
    options: dict[str, Any] = {
        "limit": 4, "keepalive": 30.0, "connect_timeout": 2.0, "read_timeout": 2.0,
        "max_headers": 100,
    }  # fmt: skip
    upstream = Upstream(url, **{**options, **overrides})
    try:
        yield upstream
    finally:
        await upstream.close()


async def fetch(upstream: Upstream, method: str = "GET", body: Any = None) -> bytes:
    answer = await upstream.send(method, "/api/v1.3/getHotels", CIMultiDict(), body)
    try:
        return await answer.content.read()
    finally:
        answer.release()


async def test_one_connection_serves_requests_in_turn() -> None:
    server = RawServer()
    async with server as url:
        async with client(url) as upstream:
            assert [await fetch(upstream) for _ in range(3)] == [b"ok"] * 3
    assert server.connections == 1
    assert server.heads[0].startswith(b"GET /api/v1.3/getHotels HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_a_full_pool_waits_for_a_connection_then_times_out() -> None:
    server = RawServer()
    async with server as url:
        async with client(url, limit=1, connect_timeout=0.3) as upstream:
            held = await upstream.send("GET", "/a", CIMultiDict(), None)
            waiting = asyncio.ensure_future(fetch(upstream))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            held.release()  # the waiting request gets this connection
            assert await waiting == b"ok"
            held = await upstream.send("GET", "/a", CIMultiDict(), None)
            with pytest.raises(TimeoutError):
                await fetch(upstream)
            held.release()
            assert await fetch(upstream) == b"ok"  # the timed-out wait left the pool sound
    assert server.connections == 1


async def test_an_answer_left_unread_closes_its_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000
    server = RawServer(lambda n, head: big)
    async with server as url:
        async with client(url) as upstream:
            answer = await upstream.send("GET", "/a", CIMultiDict(), None)
            answer.release()  # its body not read
            assert len(await fetch(upstream)) == 1_000_000
    assert server.connections == 2


async def test_idle_connections_close_after_the_keepalive() -> None:
    server = RawServer()
    async with server as url:
        async with client(url, keepalive=0.2) as upstream:
            await fetch(upstream)
            await asyncio.sleep(0.6)
            assert server.closed == 1
            assert await fetch(upstream) == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
async def test_a_dropped_keepalive_is_retried_only_for_idempotent_methods(
    method: str, retried: bool
) -> None:
    # Each connection answers its first request, then closes on the next without answering.
    server = RawServer(lambda n, head: OK if n == 0 else None)
    async with server as url:
        async with client(url) as upstream:
            await fetch(upstream, method, b"x" if method == "POST" else None)
            if retried:
                assert await fetch(upstream, method) == b"ok"
            else:
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await fetch(upstream, method, b"x")
    assert server.connections == (2 if retried else 1)


async def test_a_streamed_body_goes_chunked_unless_it_has_a_length() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    server = RawServer()
    async with server as url:
        async with client(url) as upstream:
            answer = await upstream.send("POST", "/a", CIMultiDict(), parts())
            answer.release()
            sized = CIMultiDict({"Content-Length": "13"})
            answer = await upstream.send("POST", "/a", sized, parts())
            answer.release()
    assert server.bodies == [b"one,two,three"] * 2
    assert b"Transfer-Encoding: chunked\r\n" in server.heads[0]
    assert b"Transfer-Encoding" not in server.heads[1]


async def test_a_failing_streamed_body_fails_the_answer_and_the_connection() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"start"
        raise ValueError("the caller's body broke")

    server = RawServer()
    async with server as url:
        async with client(url) as upstream:
            with pytest.raises(aiohttp.ClientConnectionError):
                await upstream.send("POST", "/a", CIMultiDict(), broken())
            assert await fetch(upstream) == b"ok"
    assert server.connections == 2


async def test_an_unparsable_head_is_unreadable_answer() -> None:
    server = RawServer(lambda n, head: b"NOT HTTP AT ALL\r\n\r\n")
    async with server as url:
        async with client(url) as upstream:
            with pytest.raises(UnreadableAnswer):
                await fetch(upstream)


async def test_interim_answers_are_skipped_and_a_path_prefix_is_kept() -> None:
    server = RawServer(lambda n, head: b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    async with server as url:
        async with client(url + "/prefix/") as upstream:
            answer = await upstream.send("GET", "/a?b=1", CIMultiDict(), None)
            assert (answer.status, answer.content_length) == (200, 2)
            answer.release()
    assert server.heads[0].startswith(b"GET /prefix/a?b=1 HTTP/1.1\r\n")


async def test_waiting_requests_get_connections_in_arrival_order() -> None:
    server = RawServer()
    async with server as url:
        done: list[int] = []

        async def one(n: int) -> None:
            await fetch(upstream)
            done.append(n)

        async with client(url, limit=1) as upstream:
            held = await upstream.send("GET", "/a", CIMultiDict(), None)
            waiting = [asyncio.ensure_future(one(n)) for n in range(4)]
            await asyncio.sleep(0.05)
            held.release()
            # A newcomer while they wait queues behind them rather than taking the next
            # released connection.
            waiting.append(asyncio.ensure_future(one(4)))
            await asyncio.gather(*waiting)
    assert done == [0, 1, 2, 3, 4]
    assert server.connections == 1


async def test_an_https_upstream_is_verified_against_the_trusted_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloudbeds is HTTPS: the client verifies its certificate and name against the CAs
    the process trusts (SSL_CERT_FILE adds one, as ops do for a private CA)."""
    files = make_tls_files(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(files.cert, files.key)

    async def hotels(request: web.Request) -> web.Response:
        return web.Response(text=f"over {request.scheme}")

    app = web.Application()
    app.router.add_get("/api/v1.3/getHotels", hotels)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=served)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with client(f"https://127.0.0.1:{port}") as untrusting:
            with pytest.raises(ssl.SSLCertVerificationError):
                await fetch(untrusting)
        monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))
        async with client(f"https://127.0.0.1:{port}") as trusting:
            assert await fetch(trusting) == b"over https"
    finally:
        await runner.cleanup()


def _server_in_a_thread(serve: Any) -> str:
    """An asyncio server on its own loop in a daemon thread, so it runs while the test's
    loop is blocked; returns its URL."""
    ready: list[int] = []

    async def run() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        await asyncio.sleep(3600)

    threading.Thread(target=asyncio.run, args=(run(),), daemon=True).start()
    while not ready:
        time.sleep(0.01)
    return f"http://127.0.0.1:{ready[0]}"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_keepalive_closed_before_the_request_is_written_takes_another(
    method: str,
) -> None:
    """The upstream's FIN is seen in the same loop turn as the request's step: nothing
    was sent, so the request goes on a new connection, whatever its method."""

    async def answer_one_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await _read_body(reader, head)
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(0.05)  # an idle timeout, short
        finally:
            writer.close()

    url = _server_in_a_thread(answer_one_then_close)
    body = b"x" if method == "POST" else None
    async with client(url) as upstream:
        assert await fetch(upstream, method, body) == b"ok"
        await asyncio.sleep(0.01)
        time.sleep(0.1)  # this loop busy: the FIN arrives, unread
        await asyncio.sleep(0)
        assert await fetch(upstream, method, body) == b"ok"


async def test_an_answer_dropped_unreleased_gives_its_place_back() -> None:
    server = RawServer()
    async with server as url:
        async with client(url, limit=1, connect_timeout=0.5) as upstream:
            answer = await upstream.send("GET", "/a", CIMultiDict(), None)
            del answer  # an error between the head and the relay, say
            assert await fetch(upstream) == b"ok"


async def test_the_read_timeout_runs_again_after_an_interim_answer() -> None:
    server = RawServer(lambda n, head: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    async with server as url:
        async with client(url, read_timeout=0.3) as upstream:
            async with asyncio.timeout(3):
                with pytest.raises(TimeoutError):
                    await fetch(upstream)


async def test_closing_the_pool_fails_the_waiting_requests_at_once() -> None:
    server = RawServer()
    async with server as url:
        async with client(url, limit=1, connect_timeout=30) as upstream:
            held = await upstream.send("GET", "/a", CIMultiDict(), None)
            waiting = asyncio.ensure_future(fetch(upstream))
            await asyncio.sleep(0.05)
            await upstream.close()  # closing twice (again at the end) is harmless
            async with asyncio.timeout(1):
                with pytest.raises(aiohttp.ClientConnectionError):
                    await waiting
            held.release()
