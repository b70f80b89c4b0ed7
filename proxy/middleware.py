"""The request middleware: the request id, every error as the JSON shape, the access line.

Errors become responses here and nowhere else (handlers raise `ProxyError`s). A proxy
error carries `X-Cloudbeds-Proxy-Error: <code>` so a caller can always tell it from
Cloudbeds' own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy import endpoints, logs
from proxy.errors import BodyIncomplete, ProxyError
from proxy.forwarding import EXCHANGE, Exchange, error_body
from proxy.headers import REQUEST_ID, check_target
from proxy.runtime import PUBLIC, RUNTIME

log = structlog.get_logger("proxy.app")
PROXY_ERROR_HEADER = "X-Cloudbeds-Proxy-Error"
_STATUS_CLASS = {status: f"{status // 100}xx" for status in range(100, 600)}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _QuietParseErrors(logging.Filter):
    """A request aiohttp cannot parse is the caller's mistake, not the proxy's.

    aiohttp logs it at error level with a traceback that quotes the offending bytes (a
    header line, which may hold a caller's token): one warning line is enough, and cheap
    for anyone to cause, so it must not raise alerts either.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "request.unparsable", ()
            record.exc_info, record.exc_text = None, None
        return True


server_log = logging.getLogger("proxy.server")
"""The logger aiohttp's server is given: its parse errors are quiet warnings."""
server_log.addFilter(_QuietParseErrors())


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID, "")
    if 0 < len(given) <= 200 and given.isprintable():
        return given
    return _RANDOM_IDS.next()


class _RandomIds:
    """128 bits from `os.urandom` per id, as 32 hex digits (the shape uuid4().hex had),
    read 256 ids at a time: one system call per 256 requests, not one per request."""

    _BATCH = 256

    def __init__(self) -> None:
        self._hex, self._at = "", 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(16 * self._BATCH).hex(), 0
        self._at = at + 32
        return self._hex[at : at + 32]


_RANDOM_IDS = _RandomIds()


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Binds the request id, turns every error into the JSON shape, writes the access line."""
    exchange = request[EXCHANGE] = Exchange(_request_id(request))
    request_id = exchange.request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = asyncio.get_running_loop().time()
    response: web.StreamResponse | None = None
    try:
        if not request.raw_path.startswith("/_proxy/") and not request.app.get(PUBLIC):
            # Before routing decides anything: CONNECT and absolute-form targets match no route.
            check_target(request.method, request.raw_path)
        response = await handler(request)
    except ProxyError as exc:
        response = _error_response(request, exc)
        if isinstance(exc, BodyIncomplete):
            await _answer_and_close(request, response)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect raised as an exception is an answer, not an error
            response = exc
            raise
        response = _error_response(request, _http_error(exc))
    except Exception:
        if exchange.response_started:
            raise
        log.exception("request.crashed")
        response = _error_response(
            request,
            ProxyError("the proxy failed unexpectedly; retry, and report it if it persists"),
        )
    finally:
        _access(request, response, asyncio.get_running_loop().time() - started)
        structlog.contextvars.unbind_contextvars("request_id")
    return response


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send the answer now and close: a body that cannot end must not be waited for.

    aiohttp would otherwise read the rest of the body for its lingering time (10 s) before
    closing; aiohttp then finds the answer sent and the connection closing, and stops.
    """
    response.force_close()
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()


def _http_error(exc: web.HTTPException) -> ProxyError:
    error = ProxyError(
        f"{exc.reason}: see /_proxy/healthz, /_proxy/readyz, /_proxy/metrics, /_proxy/tokens"
    )
    error.status, error.code = exc.status, exc.reason.lower().replace(" ", "_")
    return error


def _error_response(request: web.Request, exc: ProxyError) -> web.Response:
    runtime = request.app.get(RUNTIME)
    if runtime is not None:
        runtime.metrics.proxy_errors.labels(exc.code).inc()
    headers = {PROXY_ERROR_HEADER: exc.code, REQUEST_ID: request[EXCHANGE].request_id}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if endpoints.wants_html(request) and request.path.startswith(
        ("/_proxy/oauth/", "/_proxy/apps/")
    ):
        return web.Response(
            status=exc.status,
            text=endpoints.error_page(exc),
            content_type="text/html",
            headers=headers,
        )
    return web.json_response(
        error_body(exc, request[EXCHANGE].request_id), status=exc.status, headers=headers
    )


def _access(request: web.Request, response: web.StreamResponse | None, duration: float) -> None:
    exchange = request[EXCHANGE]
    status = response.status if response is not None else 500
    sent = exchange.bytes_sent
    if not exchange.response_started and response is not None:
        sent = response.content_length or 0
    runtime = request.app.get(RUNTIME)
    if runtime is not None:
        runtime.metrics.answered(request.method, _STATUS_CLASS.get(status) or f"{status // 100}xx")
    # Rendered without the generic processor chain (the same line, see logs.info_flat):
    # every request writes one.
    logs.info_flat(
        "request",
        {
            "method": request.method,
            "path": request.path,
            "status": status,
            "bytes": sent,
            "duration_ms": round(duration * 1000, 2),
            "credential": exchange.credential,
            "upstream_request_id": exchange.upstream_request_id,
            "cut_short": exchange.cut_short,
        },
        {"request_id": exchange.request_id},
    )
