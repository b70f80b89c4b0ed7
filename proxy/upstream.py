"""Connections to the upstream that never mix answers and never leave a body hanging, and
the forwarder's client on them.

Two clients use these connections: the aiohttp session of the token calls, keep-alives
and events (`GuardedConnector`), and the forwarder's `Upstream`, which
writes each request itself and reads the answer's head with aiohttp's own protocol and
parser. aiohttp's `ClientSession` costs more per call than all the rest of a forwarded
request (its request and response objects, tracing, redirects, cookies, a task per body):
the forwarder needs none of it, and the connection rules below hold for both.

Rules:
- A pooled connection answers exactly one request at a time, in order. Before the first
  request, and once the final answer to the request in flight has ended, any byte before
  the next request is unsolicited (a late or injected answer, a stray chunk terminator):
  the connection is closed at once, so the pool can never hand it, and those bytes, to
  the next caller.
  aiohttp's client queues such bytes and gives them to whoever reuses the connection.
- A second answer head for one request is unsolicited too: the connection is closed
  once the first answer has been read.
- An answer whose framing breaks after its head (a bad chunk size, chunk data longer
  than its size) fails its body at once with `ClientPayloadError`. aiohttp's C parser
  fails only the protocol and leaves the body waiting for bytes that never come, with
  the read timeout already stopped.

- The read timeout (`sock_read`) is aiohttp's rule: it runs while an answer is awaited
  and each arrival of bytes starts it again. Here an arrival moves a deadline instead of
  replacing the timer (aiohttp cancels one and schedules another for every chunk): one
  timer per wait, which on firing early re-arms for what is left of the deadline.

- A forwarded request carries the framing headers its caller sent: no `Content-Length: 0`
  that the caller left out (aiohttp's client adds one to a bodyless request of every
  method but GET, HEAD, OPTIONS and TRACE; RFC 9110 §8.6 says a client should not send it
  where the method does not anticipate content, a `DELETE`).

aiohttp offers no public hook for its protocol, so `GuardedConnector` swaps the factory
`TCPConnector` uses to make one; `Upstream` makes its connections with it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import Any, cast

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL, set_exception
from aiohttp.http import RawResponseMessage, StreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from yarl import URL

_TIMER_SLACK = 0.001
"""A read timer that fires this close to its deadline (the loop runs timers up to its clock
resolution early) times out rather than re-arming."""


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, refusing bytes nobody asked for."""

    def __init__(self, loop: Any) -> None:
        super().__init__(loop)
        self._answered = False
        """The final answer's head for the request in flight has arrived."""
        self._idle = True
        """No request is waiting for an answer: before the first request, and from the end
        of each final answer's body until the next request. Nothing may come now."""
        self._deadline = 0.0
        """When the read timeout runs out, if no byte comes first (loop time)."""

    def set_response_params(self, **kwargs: Any) -> None:
        # Called once per request, before it is sent: a new exchange begins.
        self._answered = self._idle = False
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if data and self._idle:
            self._refuse()
            return
        super().data_received(data)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        message, payload = data
        if self._answered:
            self._refuse()
            return
        super().feed_data(data, size)
        if message.code >= 200:  # a 1xx is an interim answer: the final one follows
            self._answered = True
            payload.on_eof(self._ended)

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        payload = self._payload
        super().set_exception(exc, exc_cause)
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            # The parser's message quotes the upstream's bytes; the class name is enough.
            broken = aiohttp.ClientPayloadError(f"answer body broken ({type(exc).__name__})")
            set_exception(payload, broken, exc)

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        loop = self._loop
        self._deadline = loop.time() + timeout
        if self._read_timeout_handle is None:
            self._read_timeout_handle = loop.call_at(self._deadline, self._read_timer_fired)

    def _read_timer_fired(self) -> None:
        self._read_timeout_handle = None
        if self._deadline - self._loop.time() > _TIMER_SLACK:  # bytes came meanwhile
            self._read_timeout_handle = self._loop.call_at(self._deadline, self._read_timer_fired)
            return
        self._on_read_timeout()

    def _ended(self) -> None:
        self._idle = True

    def _refuse(self) -> None:
        self.force_close()
        if self.transport is not None:
            self.transport.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector whose connections are `GuardedResponseHandler`s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        guarded = functools.partial(GuardedResponseHandler, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", guarded)


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Answer:
    """One upstream answer: its head, its body (aiohttp's stream) and the connection it
    came on, which `release` hands back to the pool once the body has ended (else
    closes) and `close` closes."""

    __slots__ = ("_conn", "_pool", "content", "headers", "raw_headers", "reason", "status")

    def __init__(
        self, message: RawResponseMessage, content: StreamReader, pool: Upstream, conn: _Conn
    ) -> None:
        self.status, self.reason = message.code, message.reason
        self.headers, self.raw_headers = message.headers, message.raw_headers
        self.content = content
        self._pool = pool
        self._conn: _Conn | None = conn

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        return None if value is None else int(value)  # the parser let only digits through

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.put(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.protocol.force_close()
            self._pool.put(conn)

    def __del__(self) -> None:
        # An answer dropped unreleased (an error between its head and its relay) must not
        # keep its place in the pool for good: its connection closes.
        if self._conn is not None:
            self.close()


@dataclasses.dataclass(slots=True, eq=False)
class _Conn:
    protocol: GuardedResponseHandler
    since: float = 0.0
    """When it last went idle (loop time)."""
    writer: asyncio.Task[None] | None = None
    """A streamed body still being written."""


class _Unsent(Exception):
    """The connection closed before the request was written: it can go on another."""


class UnreadableAnswer(Exception):
    """The answer's head was refused by the parser (malformed, or over the head limits)."""


class Upstream:
    """The forwarder's HTTP/1.1 client: a pool of guarded keep-alive connections to one
    origin, a request written as it is given, and the answer's head read.

    It sends exactly the headers it is given, after `Host` (aiohttp's order), and
    `Transfer-Encoding: chunked` only for a streamed body without a Content-Length; no
    automatic headers, cookies, redirects or decompression. A connection answers one
    request at a time and goes back to the pool only once its answer has ended: its
    parser, read timeout and guards are aiohttp's (`GuardedResponseHandler`).

    - At most `limit` connections are open; a request that finds none free waits its turn
      (first come, first served: a released connection goes to the first waiting request),
      and the wait and the connect together last at most `connect_timeout` (`TimeoutError`).
    - A connection idle for `keepalive` seconds is closed.
    - A request whose connection is found closed before it is written (a keep-alive the
      upstream dropped) takes another, whatever its method: nothing was sent. An
      idempotent one whose reused connection fails once sent is sent once more on a new
      connection (RFC 9112 §9.3.1), as aiohttp does; a streamed body is never resent.

    Raises `TimeoutError`, `UnreadableAnswer`, `aiohttp.ClientError` (the connection
    failed or closed, or a streamed body failed) or `OSError` (no connection).
    """

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        keepalive: float,
        connect_timeout: float,
        read_timeout: float,
        max_headers: int,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme not in _DEFAULT_PORTS or not parsed.host:
            raise ValueError(f"not an http(s) URL: {url}")
        self._host, self._tls = parsed.host, parsed.scheme == "https"
        self._port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
        self._host_header = parsed.host_port_subcomponent or parsed.host
        self._prefix = parsed.raw_path.rstrip("/")
        self._ssl = ssl.create_default_context() if self._tls else None
        self._limit, self._keepalive = limit, keepalive
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._max_headers = max_headers
        self._loop = asyncio.get_running_loop()
        self._idle: deque[_Conn] = deque()
        """Oldest on the left; taken from the right (the warmest)."""
        self._open = 0
        """Connections open or being opened."""
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        """Requests waiting for a connection, first come first served."""
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> Answer:
        """Send `method target` with `headers` and `body`; the answer once its head came."""
        retry = method in IDEMPOTENT and not _streamed(body)
        unsent = 2  # a connection found closed before the request went: never sent
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn, reused = await self._connection()
            try:
                return await self._exchange(conn, method, target, headers, body)
            except _Unsent:
                unsent -= 1
                if not unsent:
                    raise aiohttp.ServerDisconnectedError() from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError):
                if not (reused and retry):
                    raise
                retry = False

    async def _exchange(
        self,
        conn: _Conn,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> Answer:
        protocol = conn.protocol
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=self._read_timeout,
            max_headers=self._max_headers,
        )
        try:
            await self._write(conn, method, target, headers, body)
            while True:
                message, payload = await protocol.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break
                # A 1xx but 101 is an interim answer: the final one follows, within the
                # read timeout again (aiohttp's protocol stops it at each bodiless head).
                protocol.start_timeout()
        except HttpProcessingError:
            self._discard(conn)
            raise UnreadableAnswer from None
        except BaseException:
            self._discard(conn)
            raise
        return Answer(message, payload, self, conn)

    async def _write(
        self,
        conn: _Conn,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> None:
        """The request, after `Host`; a streamed body goes on in the connection's task."""
        protocol = conn.protocol
        head = CIMultiDict({hdrs.HOST: self._host_header})
        head.extend(headers)
        writer = StreamWriter(protocol, self._loop)
        start = f"{method} {self._prefix}{target} HTTP/1.1"
        if body is None or isinstance(body, bytes):
            # Written at the loop's next turn, with the other requests of this turn: the
            # upstream wakes once for them, not once for each (waking a peer that sleeps
            # is a large part of a write's cost on a busy machine).
            await asyncio.sleep(0)
            if not protocol.is_connected():  # the upstream closed it meanwhile
                raise _Unsent
            await writer.write_headers(start, head)
            if body:
                await writer.write_eof(body)  # head and body in one write
            else:
                writer.set_eof()
            protocol.start_timeout()
            return
        if hdrs.CONTENT_LENGTH not in head:
            head[hdrs.TRANSFER_ENCODING] = "chunked"
            writer.enable_chunking()
        await writer.write_headers(start, head)
        conn.writer = self._loop.create_task(_write_body(writer, protocol, body))

    def _take_idle(self) -> _Conn | None:
        """An idle connection, taken without a wait (there are none while any request
        waits: a released connection goes to the first waiting one)."""
        idle = self._idle
        if not idle:
            return None
        now = self._loop.time()
        while idle:
            conn = idle.pop()
            if conn.protocol.is_connected() and now - conn.since < self._keepalive:
                return conn
            self._discard(conn)
        return None

    async def _connection(self) -> tuple[_Conn, bool]:
        """(a connection, whether it served before) for a request that found none idle:
        a new one under the limit, else its turn for the next one released (or for the
        place of one closed) in arrival order."""
        if self._closed:
            raise aiohttp.ClientConnectionError("the upstream pool is closed")
        async with asyncio.timeout(self._connect_timeout):
            if self._open < self._limit:
                self._open += 1
                return await self._open_one(), False
            waiter: asyncio.Future[_Conn | None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                given = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())  # given, then cancelled: the next one's
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
            if given is None:  # the place of a connection that closed
                return await self._open_one(), False
            return given, True

    async def _open_one(self) -> _Conn:
        """A new connection, in a place already counted in `_open`."""
        try:
            _, protocol = await self._loop.create_connection(
                functools.partial(GuardedResponseHandler, self._loop),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._tls else None,
                happy_eyeballs_delay=0.25,
            )
        except BaseException:
            self._pass_on(None)
            raise
        return _Conn(protocol)

    def put(self, conn: _Conn) -> None:
        """A connection whose answer is done with: to the first waiting request, or idle,
        if it can take another request; else closed."""
        writer, protocol = conn.writer, conn.protocol
        unfinished = writer is not None and not writer.done()  # a body still going up
        if unfinished or self._closed or protocol.should_close or not protocol.is_connected():
            self._discard(conn)
            return
        conn.writer = None
        if self._give(conn):
            return
        conn.since = self._loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = self._loop.call_at(conn.since + self._keepalive, self._close_stale)

    def _discard(self, conn: _Conn) -> None:
        """Close `conn`; its place goes to the first waiting request, if any."""
        writer = conn.writer
        if writer is not None and not writer.done():
            writer.cancel()
        conn.protocol.close()
        self._pass_on(None)

    def _pass_on(self, given: _Conn | None) -> None:
        """A connection (or, None, a free place) that its request will not use."""
        if given is not None:
            self.put(given)
        elif not self._give(None):
            self._open -= 1

    def _give(self, given: _Conn | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(given)
                return True
        return False

    def _close_stale(self) -> None:
        self._sweep = None
        idle, now = self._idle, self._loop.time()
        while idle and now - idle[0].since >= self._keepalive:
            self._discard(idle.popleft())
        if idle:
            self._sweep = self._loop.call_at(idle[0].since + self._keepalive, self._close_stale)

    async def close(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("the upstream pool is closed"))
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            self._discard(self._idle.pop())


def _streamed(body: bytes | AsyncIterable[bytes] | None) -> bool:
    return body is not None and not isinstance(body, bytes)


_NOT_SENT = "the request body could not be sent"


async def _write_body(
    writer: StreamWriter, protocol: ResponseHandler, body: AsyncIterable[bytes]
) -> None:
    """A streamed body, written while the answer is awaited (an upstream may answer before
    it has read it all); a body that fails fails the answer's wait too."""
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except OSError as exc:
        set_exception(protocol, aiohttp.ClientOSError(exc.errno, _NOT_SENT), exc)
    except Exception as exc:  # the caller's body failed (too large, stalled, cut off)
        set_exception(protocol, aiohttp.ClientConnectionError(_NOT_SENT), exc)
    else:
        protocol.start_timeout()
