"""Structured logs: configured once by the CLI; a redaction processor guards every line.

Event names are stable (`token.refresh.ok`, `request`, …) with facts as fields.
Redaction works three ways, so a secret that slips into any field is still caught:
fields whose name says secret are masked, `Bearer …` and `cbat_…` patterns are masked,
and every secret the process knows is masked wherever it appears: configured ones (and a
few received at install) searched for, each connection's tokens and keys looked up word by
word, for as long as they could still be used.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import heapq
import json
import logging
import math
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, MutableMapping
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO, cast

import structlog

REDACTED = "[redacted]"
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "access_token",
        "refresh_token",
        "client_secret",
        "api_key",
        "x-api-key",
        "password",
        "code",
        "token",
        "secret",
        "encryption_key",
    }
)
_PATTERNS = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|cbat_[A-Za-z0-9_\-]+")
_configured: set[str] = set()
"""Secrets from the configuration: kept for the life of the process."""
_received: deque[str] = deque(maxlen=64)
"""Tokens as they arrive: the newest few, as older ones are expired and harmless."""
_held: dict[str, tuple[tuple[str, ...], float]] = {}
"""Each connection's current secrets (access token, refresh token, API key) and how long
they stay usable (a monotonic deadline): kept while the connection holds them, however
many connections there are, replaced when its record changes."""
_retired: list[tuple[float, str]] = []
"""A heap of (deadline, value): secrets a connection held before its record changed,
kept until they can no longer be used (an access token until its expiry), so every token
that still works stays redacted; memory stays a few values per connection."""
_held_values: dict[str, int] = {}
"""The values of `_held` and `_retired`, counted (two connections, or a connection and
its past, may hold one value): looked up, not scanned, so a line costs the same at 10
connections as at 10,000."""
KEEP_UNEXPIRING = 30 * 24 * 3600.0
"""How long a replaced secret with no known expiry (an API key) stays redacted: Cloudbeds
expires an API key unused for 30 days."""
_WORD = re.compile(r"[A-Za-z0-9._~+/-]{6,}=*")
"""A run of token characters: a received or held token shows up in a line as one of these."""
_searched: tuple[str, ...] = ()
"""`_configured` and `_received` as one tuple, rebuilt when either changes (rarely: at
start and once per token received), so a line does not rebuild it."""


def register_secret(value: str | None, *, configured: bool = False) -> None:
    """Remember a secret so that no log line ever shows it (short values are ignored)."""
    if not value or len(value) < 6 or value in _configured or value in _received:
        return
    global _searched  # noqa: PLW0603 (the module's own cache of the two collections above)
    if configured:
        _configured.add(value)
    else:
        _received.append(value)
    _searched = (*_configured, *_received)


def hold_secrets(owner: str, *values: str | None, usable_for: float | None = None) -> None:
    """The secrets `owner` (a connection) holds now, in place of its previous ones, which
    stay redacted while they could still be used: the `usable_for` seconds they were
    given when held (an access token's remaining life), else `KEEP_UNEXPIRING`."""
    now = time.monotonic()
    while _retired and _retired[0][0] <= now:
        _release(heapq.heappop(_retired)[1])
    kept = tuple(v for v in values if v and len(v) >= 6)
    old, deadline = _held.pop(owner, ((), now))
    for value in kept:
        _held_values[value] = _held_values.get(value, 0) + 1
    for value in old:
        if value in kept or deadline <= now:
            _release(value)
        else:
            heapq.heappush(_retired, (deadline, value))  # still counted: still redacted
    if kept:
        life = KEEP_UNEXPIRING if usable_for is None else max(usable_for, 0.0)
        _held[owner] = (kept, now + life)


def _release(value: str) -> None:
    _held_values[value] -= 1
    if not _held_values[value]:
        del _held_values[value]


def _scrub(value: str) -> str:
    # The patterns (case-insensitive) need "bearer" or "cbat_": a substring test of the
    # lowered line finds out whether the expression has anything to do, at a fraction of
    # its cost.
    lowered = value.lower()
    if "bearer" in lowered or "cbat_" in lowered:
        value = _PATTERNS.sub(lambda m: (m.group(1) or "") + REDACTED, value)
    # Configured secrets (a few, and of any characters) and the newest received tokens (at
    # most 64) are searched for, so one is caught inside a longer word too; the held ones,
    # a few per connection, are looked up word by word and path segment by path segment:
    # the words of the line are collected once and tested against them as a set, and only
    # a line that holds one is rewritten.
    for secret in _searched:
        if secret in value:
            value = value.replace(secret, REDACTED)
    if _held_values:
        words = _WORD.findall(value)
        if not _held_values.keys().isdisjoint(words) or any(
            "/" in w and not _held_values.keys().isdisjoint(w.split("/")) for w in words
        ):
            value = _WORD.sub(_held_word, value)
    return value


def _held_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if word in _held_values:
        return REDACTED
    if "/" in word:
        return "/".join(REDACTED if p in _held_values else p for p in word.split("/"))
    return word


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in _SECRET_KEYS else _clean(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else (an exception, a URL, a record) is rendered through repr() anyway:
    # render it here, where it can still be scrubbed.
    return _scrub(repr(value))


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields and any secret inside any value."""
    for key, value in list(event.items()):
        event[key] = REDACTED if key.lower() in _SECRET_KEYS and value else _clean(value)
    return event


class TickWriter:
    """Standard output, written once per turn of the event loop rather than once per line.

    With PYTHONUNBUFFERED (containers set it) every line would be a system call of its
    own, a large part of a request's cost: lines written while the loop runs are joined
    and written (then flushed) by a callback the loop runs at its next turn, in the order
    they came. Outside a running loop, past 64 KiB waiting, and at exit, lines are written
    at once; at most one turn's lines wait.
    """

    _LIMIT = 64 * 1024

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._size = 0
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        atexit.register(self.drain)

    def write(self, text: str) -> int:
        with self._lock:
            self._pending.append(text)
            self._size += len(text)
        return len(text)

    def flush(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._size >= self._LIMIT:
            self.drain()
        elif self._scheduled_on is not loop:  # (a loop that closed never ran its callback)
            self._scheduled_on = loop
            loop.call_soon(self.drain)

    def drain(self) -> None:
        """Write what waits to standard output (as it is now: a test may have replaced it)."""
        with self._lock:
            self._scheduled_on = None
            pending, self._pending, self._size = self._pending, [], 0
            if pending:
                sys.stdout.write("".join(pending))
                sys.stdout.flush()


Scalar = str | int | float | bool | None
_flat: tuple[tuple[Any, ...], TextIO, bool] | None = None
"""(the processor chain `configure` installed, its stream, whether info lines pass) when
the format is JSON; None otherwise."""


def info_flat(event: str, fields: Mapping[str, Scalar], context: Mapping[str, str]) -> None:
    """Log an info line of scalar fields as the JSON chain renders it, without the chain.

    The same line, key for key and byte for byte, as `structlog` with the processors of
    `configure` writes for `log.info(event, **fields)` with `context` bound as contextvars:
    the fields, `event`, the context, `level`, `timestamp`, each value redacted. Used for
    the one line every request writes; anywhere the chain is not the JSON one `configure`
    installed (the console format, a test's `capture_logs`), the line goes through it.
    """
    flat = _flat
    # structlog changes its processor list in place (capture_logs does): compare contents.
    if flat is None or tuple(structlog.get_config()["processors"]) != flat[0]:
        structlog.get_logger("proxy.access").info(event, **fields, **context)
        return
    _, stream, passes = flat
    if not passes:
        return
    values: dict[str, Scalar] = {**fields, "event": event}
    for name, given in context.items():
        values.setdefault(name, given)  # as structlog's merge_contextvars does
    joined = "\n".join([v for v in values.values() if isinstance(v, str)])
    clean = joined == _scrub(joined)  # nearly always: then no field needs scrubbing
    parts = []
    for key, value in values.items():
        if key.lower() in _SECRET_KEYS and value:
            rendered = '"' + REDACTED + '"'
        elif isinstance(value, str):
            text = value if clean else _scrub(value)
            rendered = encode_basestring_ascii(text)
        else:
            rendered = _json_scalar(value)
        parts.append(f"{encode_basestring_ascii(key)}: {rendered}")
    stream.write(f'{{{", ".join(parts)}, "level": "info", "timestamp": "{iso_now()}"}}\n')
    stream.flush()


_second: list[Any] = [0, ""]
"""The last whole second stamped, and its text up to the seconds."""


def iso_now() -> str:
    """`datetime.now(UTC).isoformat()` with `Z` for `+00:00`, as structlog's ISO stamper
    writes it (microseconds, or none when they are 0), from `time.time()` as `now` takes
    it; the date and time up to the second are formatted once per second."""
    now = time.time()
    second = int(now)
    micro = round((now - second) * 1e6)  # as datetime rounds a timestamp's fraction
    if micro >= 1_000_000:
        second, micro = second + 1, 0
    cached = _second
    if second != cached[0]:
        stamp = datetime.datetime.fromtimestamp(second, datetime.UTC)
        cached[:] = second, stamp.strftime("%Y-%m-%dT%H:%M:%S")
    text = cached[1]
    return f"{text}.{micro:06d}Z" if micro else f"{text}Z"


def _json_scalar(value: Scalar) -> str:
    """What `json.dumps` makes of a scalar that is not a string."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    if not isinstance(value, int | float):
        raise TypeError(f"not a scalar: {type(value).__name__}")  # never rendered unscrubbed
    return json.dumps(value)


_stdout: TickWriter | None = None


def configure(
    log_format: str = "json", *, stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """Configure structlog (and the stdlib loggers of aiohttp and redis) once, at start.

    Without a `stream`, lines go to standard output through one `TickWriter`.
    """
    global _flat, _stdout  # noqa: PLW0603 (set once, at start, like structlog's own configuration)
    if stream is None:
        _stdout = _stdout or TickWriter()
        stream = cast("TextIO", _stdout)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,  # after format_exc_info: tracebacks are scrubbed too
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    json_chain = log_format == "json"
    _flat = (tuple(processors), stream, level <= logging.INFO) if json_chain else None
    # Library loggers (aiohttp's own errors) go through the same redaction.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *processors[-2:],
            ],
            foreign_pre_chain=processors[:-2],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
