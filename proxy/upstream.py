"""Connections to the upstream that never mix answers and never leave a body hanging.

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

- A request carries the framing headers its caller sent: no `Content-Length: 0` that
  the caller left out. aiohttp adds one to a bodyless request of every method but GET,
  HEAD, OPTIONS and TRACE; RFC 9110 §8.6 says a client should not send it where the
  method does not anticipate content (a `DELETE`), and the proxy adds nothing.

aiohttp offers no public hook for its protocol, so `GuardedConnector` swaps the factory
`TCPConnector` uses to make one; everything else is aiohttp's own.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, cast

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL, set_exception
from aiohttp.http import SERVER_SOFTWARE, RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

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


_SKIP_TABLES: dict[frozenset[str], CIMultiDict[None]] = {}
"""aiohttp's table of the headers a request must not get added, per set asked for: the
forwarder asks for the same set every time."""


class VerbatimRequest(aiohttp.ClientRequest):
    """aiohttp's request, minus the `Content-Length: 0` it invents for a bodyless one.

    Its automatic headers follow aiohttp's rule (each default header and `User-Agent`
    unless given or skipped) without copying the request's headers and building the
    skip table anew for every request.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if skip_auto_headers is None:
            super().update_auto_headers(skip_auto_headers)
            return
        key = frozenset(skip_auto_headers)
        table = _SKIP_TABLES.get(key)
        if table is None:
            table = CIMultiDict((name, None) for name in sorted(key))
            if len(_SKIP_TABLES) < 16:  # the proxy's own sets: a few at most
                _SKIP_TABLES[key] = table
        self._skip_auto_headers = table
        headers = self.headers
        for name, value in (*self.DEFAULT_HEADERS.items(), (hdrs.USER_AGENT, SERVER_SOFTWARE)):
            if name not in headers and name not in table:
                headers[name] = value

    def update_body_from_data(self, body: Any, _stacklevel: int = 3) -> None:
        given = hdrs.CONTENT_LENGTH in self.headers
        super().update_body_from_data(body, _stacklevel + 1)
        if body is None and not given:
            self.headers.popall(hdrs.CONTENT_LENGTH, None)
