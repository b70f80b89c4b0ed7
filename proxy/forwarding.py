"""Forward one request to Cloudbeds with the credential attached, streaming both ways.

The path and query go upstream exactly as received (`request.raw_path`, `encoded=True`):
no re-encoding. Bodies stream in both directions (an answer that has arrived whole by the
time its head is read, with a Content-Length, goes back in one write); only a body small
enough to replay after a 401 (`replay_body_bytes`, and with a Content-Length) is read whole
first; the replay takes its own slot of the rate budget, as every call to Cloudbeds does.
The client (`upstream.Upstream`) adds no header but `Host` and decompresses nothing: the
caller's bytes and Cloudbeds' bytes pass unchanged.

Every wait has a bound: each read of the caller's body waits at most the read timeout
(a stalled body, or one whose chunked framing broke, which aiohttp's C parser leaves
waiting rather than failing, is a 400 `body_incomplete` and the upstream connection is
closed), and each read of the answer the same (`sock_read`). An answer's head is checked
against its budget before anything is relayed. A caller that leaves at any point, even
before the answer's head could be sent, is `cut_short="caller"`, never a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy.callers import Callers
from proxy.config import Settings
from proxy.credentials import Credential
from proxy.errors import (
    BadRequest,
    BodyIncomplete,
    BodyTooLarge,
    InvalidHeaderBytes,
    ProxyError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import (
    REQUEST_ID,
    check_answer_head,
    downstream_headers_of,
    upstream_headers_of,
)
from proxy.metrics import Metrics
from proxy.ratelimit import Limiter
from proxy.registry import Registry
from proxy.upstream import Answer, UnreadableAnswer, Upstream

log = structlog.get_logger("proxy.forwarding")


@dataclasses.dataclass
class Exchange:
    """What one request learns on its way through, for the access line and error bodies."""

    request_id: str
    credential: str | None = None
    upstream_request_id: str | None = None
    bytes_sent: int = 0
    not_replayed: bool = False
    response_started: bool = False
    cut_short: str | None = None
    """Who ended the exchange early: "caller" or "upstream"."""


EXCHANGE = web.RequestKey("exchange", Exchange)
NOT_REPLAYED = "X-Cloudbeds-Proxy-Not-Replayed"
_CHUNK = 64 * 1024


class _BodyStream:
    """The caller's body as an async iterator that stops at the size limit.

    Each read waits at most `read_timeout`: a body that stops coming, or whose chunked
    framing broke (the C parser then neither ends nor fails it), is `BodyIncomplete`.
    """

    def __init__(self, content: aiohttp.StreamReader, limit: int, read_timeout: float) -> None:
        self.content, self.limit, self.seen = content, limit, 0
        self.read_timeout = read_timeout
        self.too_large = self.caller_gone = self.incomplete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self.content.iter_chunked(_CHUNK)
        while True:
            try:
                async with asyncio.timeout(self.read_timeout):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self.incomplete = True
                raise BodyIncomplete(_incomplete(self.read_timeout)) from None
            except (ConnectionError, aiohttp.ClientPayloadError):
                self.caller_gone = True
                raise
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.too_large = True
                raise BodyTooLarge(_too_large(self.limit))
            yield chunk


def _incomplete(timeout: float) -> str:
    return (
        f"the request body stopped for CBPROXY_READ_TIMEOUT ({timeout:g}s) before its end, "
        "or its chunked framing is broken; send the whole body, correctly framed"
    )


def _too_large(limit: int) -> str:
    return f"the request body exceeds CBPROXY_MAX_BODY_BYTES ({limit} bytes); send a smaller one"


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        registry: Registry,
        limiter: Limiter,
        metrics: Metrics,
        *,
        callers: Callers,
    ) -> None:
        self._callers = callers
        self._settings, self._upstream, self._registry = settings, upstream, registry
        self._limiter, self._metrics = limiter, metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        caller = self._callers.identify(request.headers)
        credential = await self._registry.find(request.headers, request.query)
        request[EXCHANGE].credential = credential.name
        if caller is not None:
            self._callers.check(caller, credential)
        self._registry.used(credential.name)
        body = await self._body(request)
        # A slot is taken only once a token exists (a request that would get a 503 spends
        # none of the budget a refresh needs); the token is read again after the wait.
        await credential.header()
        await self._limiter.admit(credential.settings.budget, credential.name)
        header = await credential.header()
        upstream = await self._send(request, credential, header, body)
        try:
            if upstream.status == 401:
                upstream = await self._after_401(request, credential, header, body, upstream)
            return await self._relay(request, upstream, credential.name)
        finally:
            upstream.release()  # the one relayed (or the 401 it replaced), once its use ends

    async def _body(self, request: web.Request) -> bytes | _BodyStream | None:
        limit = self._settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(_too_large(limit))
        if not request.body_exists:
            return None
        content = request.content
        buffered = length is not None and length <= self._settings.replay_body_bytes
        # A body that came whole with its head (a form of a few KiB does): no read to wait for.
        if buffered and _complete(content, length):
            return content.read_nowait()
        stream = _BodyStream(content, limit, self._settings.read_timeout)
        if buffered:
            try:
                return b"".join([chunk async for chunk in stream])
            except (ConnectionError, aiohttp.ClientPayloadError):
                request[EXCHANGE].cut_short = "caller"
                raise BadRequest(
                    "the request body ended before its end (the caller went away)"
                ) from None
        return stream

    async def _send(
        self,
        request: web.Request,
        credential: Credential,
        header: tuple[str, str],
        body: bytes | _BodyStream | None,
    ) -> Answer:
        headers = upstream_headers_of(request.raw_headers, header, request[EXCHANGE].request_id)
        settings = self._settings
        started = time.perf_counter()
        try:
            response = await self._upstream.send(request.method, request.raw_path, headers, body)
        except TimeoutError:
            raise UpstreamTimeout(
                "Cloudbeds did not answer within CBPROXY_READ_TIMEOUT/CBPROXY_CONNECT_TIMEOUT; "
                "retry later",
                retry_after=5,
            ) from None
        except UnreadableAnswer:
            # What aiohttp's parser refused in the answer's head (too many headers, a line
            # over 8 KiB, bytes that are not HTTP). Its message quotes those bytes: not ours.
            raise UpstreamInvalidResponse(
                "Cloudbeds' answer head could not be read (malformed, or over the proxy's "
                "header limits); retry later",
                retry_after=5,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(body, _BodyStream) and body.too_large:
                raise BodyTooLarge(_too_large(body.limit)) from None
            if isinstance(body, _BodyStream) and body.incomplete:
                raise BodyIncomplete(_incomplete(body.read_timeout)) from None
            if isinstance(body, _BodyStream) and body.caller_gone:
                request[EXCHANGE].cut_short = "caller"
                raise BadRequest(
                    "the request body ended before its end (the caller went away)"
                ) from None
            raise UpstreamUnreachable(
                f"could not reach Cloudbeds ({type(exc).__name__}); retry later", retry_after=5
            ) from None
        self._metrics.upstream_latency.observe(time.perf_counter() - started)
        try:
            check_answer_head(
                response.raw_headers,
                settings.max_response_header_bytes,
                settings.max_response_headers,
            )
            request[EXCHANGE].upstream_request_id = response.headers.get(REQUEST_ID)
            await self._honour_pause(credential.settings.budget, response)
        except BaseException:
            response.close()  # the connection is not reused: its answer was not read
            raise
        return response

    async def _honour_pause(self, name: str, response: Answer) -> None:
        """Cloudbeds' 429 (or 503 with Retry-After) pauses the budget on every replica: a
        connection of an app pauses the whole app, since Cloudbeds counts per client id."""
        retry_after = response.headers.get("Retry-After")
        if response.status == 429 or (response.status == 503 and retry_after):
            try:
                seconds = float(retry_after) if retry_after else 1.0
            except ValueError:
                seconds = 1.0
            await self._limiter.pause(name, min(max(seconds, 0.0), 300.0))

    async def _after_401(
        self,
        request: web.Request,
        credential: Credential,
        header: tuple[str, str],
        body: bytes | _BodyStream | None,
        response: Answer,
    ) -> Answer:
        """Refresh if the rejected token is current; replay once if the body was buffered."""
        renewed = await credential.rejected(header)
        if not renewed:
            return response
        if isinstance(body, _BodyStream):
            self._metrics.replays.labels(credential.settings.budget, "not_replayed").inc()
            request[EXCHANGE].not_replayed = True
            return response
        response.release()
        # Cloudbeds counts the replay like any call (its limit is per client id), so it
        # takes a slot of the budget; refused, the caller gets the 429 and Retry-After.
        await self._limiter.admit(credential.settings.budget, credential.name)
        self._metrics.replays.labels(credential.settings.budget, "replayed").inc()
        log.info("request.replayed_after_401", credential=credential.name)
        return await self._send(request, credential, await credential.header(), body)

    async def _relay(
        self, request: web.Request, upstream: Answer, credential: str
    ) -> web.StreamResponse:
        try:
            headers = downstream_headers_of(upstream.raw_headers)
        except InvalidHeaderBytes:
            upstream.close()
            raise UpstreamInvalidResponse(
                "Cloudbeds answered a header whose bytes are not UTF-8, which the proxy "
                "cannot pass unchanged; retry later"
            ) from None
        exchange = request[EXCHANGE]
        if exchange.not_replayed:
            headers[NOT_REPLAYED] = "body-streamed"
        whole = _arrived_whole(request, upstream)
        if whole is not None:
            return await self._answer_whole(request, upstream, headers, whole)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers)
        try:
            await response.prepare(request)
        except ConnectionError:  # the caller left while Cloudbeds was answering
            return self._cut(request, response, "caller")
        exchange.response_started = True
        chunks = upstream.content.iter_any()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The status line is gone already: cut the connection so the caller sees
                # a truncated answer rather than a complete-looking one.
                log.warning("upstream.body.broken", error=type(exc).__name__, credential=credential)
                return self._cut(request, response, "upstream")
            try:
                await response.write(chunk)
            except ConnectionError:  # the caller went away; nothing is wrong upstream
                return self._cut(request, response, "caller")
            exchange.bytes_sent += len(chunk)
        try:
            await response.write_eof()
        except ConnectionError:
            return self._cut(request, response, "caller")
        return response

    async def _answer_whole(
        self,
        request: web.Request,
        upstream: Answer,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> web.StreamResponse:
        """An answer already received whole goes back as one write: head and body."""
        response = web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=body
        )
        exchange = request[EXCHANGE]
        try:
            # Written at the loop's next turn, with the other answers of this turn (as
            # requests go upstream, see upstream.Upstream): the callers' side wakes once.
            await asyncio.sleep(0)
            await response.prepare(request)  # a Response's head waits for its body
            exchange.response_started = True
            await response.write_eof()
        except ConnectionError:  # the caller left while Cloudbeds was answering
            return self._cut(request, response, "caller")
        exchange.bytes_sent = len(body)
        return response

    @staticmethod
    def _cut(request: web.Request, response: web.StreamResponse, by: str) -> web.StreamResponse:
        """End an answer whose body cannot be completed: close the caller's connection.

        aiohttp's final `write_eof` then meets a closed transport, which it takes quietly
        as a caller that went away; the truncated body is never made to look complete.
        """
        request[EXCHANGE].cut_short = by
        if request.transport is not None:
            request.transport.close()
        return response


def _complete(content: aiohttp.StreamReader, length: int | None) -> bool:
    """All `length` bytes of a fresh body have arrived (to the buffer) and none failed."""
    return content.is_eof() and content.total_bytes == length and content.exception() is None


def _arrived_whole(request: web.Request, upstream: Answer) -> bytes | None:
    """The answer's body when it has all arrived already, with a Content-Length; else None.

    Cloudbeds' usual answer (a few KiB) is in the proxy's buffer by the time its head is
    read: it goes back in one piece. Anything else (no Content-Length, a body still on its
    way, one that failed, a HEAD, 1xx, 204 or 304, whose framing aiohttp handles apart)
    streams.
    """
    content = upstream.content
    if (
        upstream.content_length is None
        or not _complete(content, upstream.content_length)
        or request.method == "HEAD"
        or upstream.status < 200
        or upstream.status in (204, 304)
    ):
        return None
    return content.read_nowait()


def error_body(exc: ProxyError, request_id: str) -> dict[str, Any]:
    return {"error": exc.code, "message": exc.message, "request_id": request_id}
