"""A hostile network on both sides of the proxy, through its real port.

The upstream here is a raw asyncio server that each test scripts byte by byte (what a
broken load balancer or an attacker would send); callers are raw sockets too, so no
client library smooths anything over. The proxy uses an API-key credential, so no token
endpoint is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.config import load_settings
from proxy.upstream import GuardedResponseHandler

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BOUND = 10.0  # seconds any single wait in these tests may take before the test fails


class RawUpstream:
    """An upstream whose every connection runs `behaviour`; it keeps what each one sent."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.closed_by_peer = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by __aexit__: asyncio's server would log a cancelled connection task.
            pass
        finally:
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def until_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything up to the peer's close; fails the test if it never comes."""
    async with asyncio.timeout(BOUND):
        return await reader.read()


def settings(upstream: str, **extra: str) -> Any:
    return load_settings(
        {
            "CBPROXY_UPSTREAM_URL": upstream,
            "CBPROXY_API_KEY": "cbat_hostile_test_key",
            "CBPROXY_RATE_LIMIT": "0",
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def caller(proxy: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(proxy: str, request: bytes) -> bytes:
    async with caller(proxy) as (reader, writer):
        writer.write(request)
        await writer.drain()
        return await until_eof(reader)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode()


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line.get("event") == "request" and not line["path"].startswith("/_proxy/")
    ]


def proxy_error(answer: bytes) -> tuple[int, dict[str, Any], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"\r\nX-Cloudbeds-Proxy-Error: " in head, head
    return status, json.loads(body), head


# 1. A pooled connection that received anything while idle is never reused.


async def test_an_answer_injected_on_an_idle_connection_reaches_nobody(start_proxy: Any) -> None:
    injected, dropped = asyncio.Event(), asyncio.Event()
    answered: list[bytes] = []

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()
            answered.append(path)
            if len(answered) == 1:
                await injected.wait()
                # Another hotel's answer, sent while nobody asked (a late or stray answer).
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED")
                await writer.drain()
                await reader.read()  # until the proxy drops this connection
                dropped.set()
                return

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        first = await exchange(proxy, get("/api/v1.3/getHotels?propertyID=1"))
        assert first.endswith(b"\r\n\r\n/api/v1.3/getHotels?propertyID=1")
        injected.set()
        # The proxy closes the idle connection that received the stray answer; without the
        # guard it keeps it, and the answer, for the next caller (and this wait fails).
        async with asyncio.timeout(BOUND):
            await dropped.wait()
        second = await exchange(proxy, get("/api/v1.3/getHotels?propertyID=2"))
        third = await exchange(proxy, get("/api/v1.3/getHotels?propertyID=3"))
    assert second.endswith(b"\r\n\r\n/api/v1.3/getHotels?propertyID=2"), second
    assert third.endswith(b"\r\n\r\n/api/v1.3/getHotels?propertyID=3"), third
    assert upstream.connections == 2  # the poisoned connection was dropped, then pooling resumed


async def test_a_second_answer_in_the_same_packet_is_not_kept(start_proxy: Any) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            path = head.split(b" ")[1]
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)
                + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED"
            )
            await writer.drain()

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        for n in range(3):
            answer = await exchange(proxy, get(f"/api/v1.3/getRooms?n={n}"))
            assert answer.endswith(b"\r\n\r\n/api/v1.3/getRooms?n=%d" % n), answer


# 2. Broken chunked framing ends at once or within the read timeout, never hangs.


@pytest.mark.parametrize(
    "broken",
    [b"ZZ\r\n", b"5\r\nhelloEXTRA-DATA-BEYOND-ITS-SIZE\r\n"],
    ids=["bad-chunk-size", "chunk-longer-than-its-size"],
)
async def test_a_caller_body_with_broken_chunks_gets_400_and_the_upstream_is_closed(
    start_proxy: Any, broken: bytes
) -> None:
    upstream_saw: list[bytes] = []
    body_started = asyncio.Event()

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_saw.append(await read_head(reader))
        upstream_saw.append(await reader.readexactly(10))  # b"5\r\nhello\r\n", re-chunked
        body_started.set()
        upstream_saw.append(await until_eof(reader))  # the proxy must close, not leave it

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url, CBPROXY_READ_TIMEOUT="1"))
        async with caller(proxy) as (reader, writer):
            writer.write(
                b"POST /api/v1.3/postGuestDocument HTTP/1.1\r\nHost: p\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(BOUND):
                await body_started.wait()
            writer.write(broken)
            await writer.drain()
            answer = await until_eof(reader)
        async with asyncio.timeout(BOUND):
            while len(upstream_saw) < 3:
                await asyncio.sleep(0.01)
    status, body, _ = proxy_error(answer)
    assert (status, body["error"]) == (400, "body_incomplete")
    assert not upstream_saw[2].endswith(b"0\r\n\r\n")  # never made to look complete


async def test_a_caller_body_that_stalls_gets_400_within_the_read_timeout(
    start_proxy: Any,
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url, CBPROXY_READ_TIMEOUT="1"))
        async with caller(proxy) as (reader, writer):
            writer.write(
                b"POST /api/v1.3/postReservation HTTP/1.1\r\nHost: p\r\n"
                b"Content-Length: 100\r\n\r\nonly-a-part"
            )
            await writer.drain()
            answer = await until_eof(reader)
    status, body, _ = proxy_error(answer)
    assert (status, body["error"]) == (400, "body_incomplete")


@pytest.mark.parametrize("broken", [b"ZZ\r\n", b"5\r\nhelloEXTRA\r\n"])
async def test_an_answer_whose_chunks_break_is_cut_at_once(
    start_proxy: Any, captured_logs: io.StringIO, broken: bytes
) -> None:
    caller_has_start = asyncio.Event()
    upstream_tail: list[bytes] = []

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await caller_has_start.wait()
        writer.write(broken)
        await writer.drain()
        upstream_tail.append(await until_eof(reader))

    async with RawUpstream(behaviour) as upstream:
        # A read timeout far beyond BOUND: only the broken framing may end this answer.
        proxy = await start_proxy(settings(upstream.url, CBPROXY_READ_TIMEOUT="300"))
        async with caller(proxy) as (reader, writer):
            writer.write(get("/api/v1.3/getReservations"))
            await writer.drain()
            async with asyncio.timeout(BOUND):
                start = await reader.readuntil(b"hello")
            caller_has_start.set()
            rest = await until_eof(reader)
        async with asyncio.timeout(BOUND):
            while not upstream_tail:
                await asyncio.sleep(0.01)
    assert start.startswith(b"HTTP/1.1 200")
    assert not rest.endswith(b"0\r\n\r\n")  # cut, never a complete-looking answer
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    (access,) = access_lines(lines)
    assert access["cut_short"] == "upstream"


# 3. A caller that leaves before the answer's head is a caller that left, not a crash.


async def test_a_caller_leaving_before_the_answer_is_quiet(
    start_proxy: Any, captured_logs: io.StringIO
) -> None:
    caller_gone = asyncio.Event()

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await caller_gone.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        async with caller(proxy) as (_reader, writer):
            writer.write(get("/api/v1.3/getHotels"))
            await writer.drain()
            # Wait until the request is with the upstream, then leave.
            async with asyncio.timeout(BOUND):
                while upstream.connections == 0:
                    await asyncio.sleep(0.01)
            writer.transport.abort()
        await asyncio.sleep(0.1)  # the proxy notices the caller's close
        caller_gone.set()
        lines: list[dict[str, Any]] = []
        async with asyncio.timeout(BOUND):
            while not access_lines(lines):
                await asyncio.sleep(0.01)
                lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    (access,) = access_lines(lines)
    assert access["cut_short"] == "caller"
    assert access["status"] == 200
    assert not [line for line in lines if line["level"] in ("error", "critical")], lines


# 4. An answer's headers have a budget.


@pytest.mark.parametrize(
    ("count", "size"),
    [(110, 8000), (60, 8000), (101, 10)],
    ids=["880KiB-in-110-headers", "over-the-byte-budget", "over-the-count"],
)
async def test_an_answer_over_the_header_budget_is_502(
    start_proxy: Any, count: int, size: int
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        lines = b"".join(b"X-Padding-%d: %s\r\n" % (n, b"a" * size) for n in range(count))
        writer.write(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    status, body, head = proxy_error(answer)
    assert (status, body["error"]) == (502, "upstream_invalid_response")
    assert len(head) < 1024


async def test_an_answer_within_the_header_budget_passes(start_proxy: Any) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        lines = b"".join(b"X-Padding-%d: %s\r\n" % (n, b"a" * 500) for n in range(90))
        writer.write(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.count(b"\r\nX-Padding-") == 90


# 13. The proxy sends the framing the caller sent, no more.


@pytest.mark.parametrize("method", ["DELETE", "POST", "PUT", "PATCH", "GET"])
async def test_a_bodyless_request_gains_no_content_length(start_proxy: Any, method: str) -> None:
    heads: list[bytes] = []

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        request = f"{method} /api/v1.3/deleteWebhook?id=1 HTTP/1.1\r\nHost: p\r\n"
        answer = await exchange(proxy, f"{request}Connection: close\r\n\r\n".encode())
        with_length = await exchange(
            proxy, f"{request}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
    assert answer.startswith(b"HTTP/1.1 200") and with_length.startswith(b"HTTP/1.1 200")
    assert b"content-length" not in heads[0].lower()
    assert b"\r\nContent-Length: 0\r\n" in heads[1]


# 11. A slowloris costs nothing: heads must be complete within CBPROXY_HEAD_TIMEOUT.


async def test_half_sent_request_heads_are_closed_after_the_head_timeout(
    start_proxy: Any,
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url, CBPROXY_HEAD_TIMEOUT="1"))
        host, port = proxy.removeprefix("http://").split(":")
        pending = [await asyncio.open_connection(host, int(port)) for _ in range(300)]
        for n, (_, writer) in enumerate(pending):
            writer.write(b"GET /api/v1.3/getHotels HTTP/1.1\r\nHost: p\r\n" if n % 2 else b"GE")
        idle = await asyncio.open_connection(host, int(port))
        idle[1].write(get("/api/v1.3/getHotels").replace(b"close", b"keep-alive"))
        first = await idle[0].readuntil(b"{}")
        # Every half-sent head, and the idle keep-alive connection, is closed by the proxy.
        async with asyncio.timeout(BOUND):
            rests = await asyncio.gather(*(reader.read() for reader, _ in [*pending, idle]))
        assert set(rests) == {b""}
        for _, writer in [*pending, idle]:
            writer.close()
        assert first.startswith(b"HTTP/1.1 200")
        # ...and the proxy still serves.
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    assert answer.startswith(b"HTTP/1.1 200")


# 12. Header bytes pass unchanged or not at all.


async def test_latin1_header_bytes_are_refused_not_re_encoded(start_proxy: Any) -> None:
    heads: list[bytes] = []

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        refused = await exchange(
            proxy,
            b"GET /api/v1.3/getGuest HTTP/1.1\r\nHost: p\r\nX-Guest: Zo\xeb\r\n"
            b"Connection: close\r\n\r\n",
        )
        passed = await exchange(
            proxy,
            b"GET /api/v1.3/getGuest HTTP/1.1\r\nHost: p\r\nX-Guest: Zo\xc3\xab\r\n"
            b"Connection: close\r\n\r\n",
        )
    status, body, _ = proxy_error(refused)
    assert (status, body["error"]) == (400, "invalid_header_bytes")
    assert passed.startswith(b"HTTP/1.1 200")
    assert len(heads) == 1 and b"\r\nX-Guest: Zo\xc3\xab\r\n" in heads[0]


async def test_latin1_bytes_in_an_answer_header_are_refused(start_proxy: Any) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    status, body, _ = proxy_error(answer)
    assert (status, body["error"]) == (502, "upstream_invalid_response")


# Found by tests/test_fuzz_wire.py.


async def test_an_unparsable_head_is_one_quiet_line_that_quotes_nothing(
    start_proxy: Any, captured_logs: io.StringIO
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        answer = await exchange(
            proxy, b"GET / HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer caller-secret\x00\r\n\r\n"
        )
    assert answer.startswith(b"HTTP/1.0 400")  # aiohttp's own answer: the README says so
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    (line,) = [line for line in lines if line["event"] == "request.unparsable"]
    assert line["level"] == "warning"
    assert "caller-secret" not in captured_logs.getvalue()
    assert not [line for line in lines if line["level"] in ("error", "critical")]


async def test_a_body_left_unread_after_an_error_is_drained_no_longer_than_the_head_timeout(
    start_proxy: Any,
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url, CBPROXY_HEAD_TIMEOUT="1"))
        async with caller(proxy) as (reader, writer):
            # Refused before its body is read; the body never comes.
            writer.write(
                b"POST /api/v1.3/access_token HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(5):  # aiohttp's own drain would wait 10 s
                answer = await reader.read()
    status, body, _ = proxy_error(answer)
    assert (status, body["error"]) == (403, "credential_endpoint_blocked")


@pytest.mark.parametrize(
    "head",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
async def test_an_answer_head_that_is_not_http_is_502_invalid_response(
    start_proxy: Any, head: bytes
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(head)
        await writer.drain()
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url))
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    status, body, _ = proxy_error(answer)
    assert (status, body["error"]) == (502, "upstream_invalid_response")


async def test_bytes_before_the_first_request_close_the_connection() -> None:
    # The window between connecting and sending the first request is too short to hit
    # through the port; the protocol is checked directly, on a real socket pair.
    loop = asyncio.get_running_loop()
    server, client = socket.socketpair()
    with server, client:
        transport, protocol = await loop.create_connection(
            lambda: GuardedResponseHandler(loop), sock=client
        )
        protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED")
        assert transport.is_closing() and not protocol.is_connected()
        assert len(protocol) == 0  # nothing queued for whoever would have come next


# The read timeout bounds each wait for the answer's bytes, not the whole answer.


async def test_an_answer_that_trickles_within_the_read_timeout_arrives_whole(
    start_proxy: Any,
) -> None:
    """Bytes that keep coming, each within the read timeout, move its deadline: the answer
    outlasts the timeout several times over and still arrives complete."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            await asyncio.sleep(0.2)
            writer.write(bytes([byte]))
            await writer.drain()
        await until_eof(reader)

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url, CBPROXY_READ_TIMEOUT="0.5"))
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body == b"abcdef"


async def test_an_answer_that_stops_past_the_read_timeout_is_cut(start_proxy: Any) -> None:
    """After some bytes came, a silence past the read timeout still ends the answer: the
    caller's connection is closed short of the Content-Length."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abc":
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()
        await until_eof(reader)  # silent until the proxy gives up and closes

    async with RawUpstream(behaviour) as upstream:
        proxy = await start_proxy(settings(upstream.url, CBPROXY_READ_TIMEOUT="0.5"))
        answer = await exchange(proxy, get("/api/v1.3/getHotels"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) < 6
