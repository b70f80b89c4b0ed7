"""Fuzzing the request parser edge: raw bytes at the port of a real `serve` process.

For any input the proxy must not crash (it still answers its health check, and its log
holds no traceback, crash or 500), must not hang past its bounds (every connection ends
within head timeout + read timeout + slack), and every error its own code makes is the
JSON shape with `X-Cloudbeds-Proxy-Error`. aiohttp's own plain-text 400 for a head it
cannot parse is allowed: the README says so. Deterministic (`derandomize=True`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support import ProxyProcess, fake_env, free_port

FUZZ = settings(
    # FUZZ_EXAMPLES raises the count for a long run by hand; the suite keeps it small.
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
HEAD_TIMEOUT, READ_TIMEOUT = 0.5, 0.5
# Seconds a connection may live: the head, one body read, the drain of an unread body.
BOUND = 2 * HEAD_TIMEOUT + READ_TIMEOUT + 4.0

methods = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get",
     "G\x00T", "", "PRI", "X" * 300]
)  # fmt: skip
segments = st.sampled_from(
    ["api", "v1.3", "getHotels", "fake", "echo", "..", ".", "%2e%2E", "%2F", "%5c", "\\",
     "access_token", "oauth", "metadata", "_proxy", "healthz", "%00", "%0d%0a", "x?y=%zz",
     "#f", "é", "\x7f", "a" * 50]
)  # fmt: skip
targets = st.one_of(
    st.lists(segments, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["*", "http://evil.example/", "//evil/x", "", "/" + "a" * 9000, "evil:443"]),
    st.text(max_size=20),
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", ""])
header_names = st.sampled_from(
    [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect",
     b"X-Request-ID", b"X-Cloudbeds-Credential", b"X-PROPERTY-ID", b"Authorization",
     b"Content-Type", b"Upgrade", b"TE", b"Trailer", b"X-Odd", b"Bad Name", b"", b"X\x00"]
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(
        [b"5", b"0", b"-1", b"abc", b"99999999999999999999", b"5, 5", b"chunked",
         b"gzip, chunked", b"chunked, gzip", b"identity", b"close", b"keep-alive, Upgrade",
         b"100-continue", b"websocket", b"default", b"nobody", b"1001", b"\xe9t\xe9",
         b"caf\xc3\xa9", b"a" * 9000, b"x\ry", b"x\x00y"]
    ),
    st.binary(max_size=30),
)  # fmt: skip
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from(
        [b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\nZZ\r\n", b"5\r\nhelloEXTRA\r\n",
         b"ffffffffffffffffff\r\n", b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
         b"hello", b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n"]
    ),
)  # fmt: skip


valid_headers = st.sampled_from(
    [(b"Content-Type", b"application/json"), (b"Content-Length", b"5"), (b"X-Request-ID", b"r-1"),
     (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue"), (b"Connection", b"TE"),
     (b"X-PROPERTY-ID", b"1001"), (b"X-Cloudbeds-Credential", b"default"),
     (b"Authorization", b"Bearer caller"), (b"Accept-Encoding", b"gzip")]
)  # fmt: skip
valid_targets = st.lists(segments, max_size=4).map(lambda p: "/api/v1.3/" + "/".join(p))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Mostly requests aiohttp can parse (so the proxy's own code sees them), some not."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=200))
    hostile = kind <= 3
    newline = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n"])) if hostile else b"\r\n"
    method = draw(methods if hostile else st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    target = draw(targets if hostile else valid_targets)
    version = draw(versions if hostile else st.just("HTTP/1.1"))
    line = f"{method} {target} {version}".encode(errors="surrogateescape")
    headers = [] if hostile and draw(st.booleans()) else [(b"Host", b"proxy")]
    pairs = st.tuples(header_names, header_values) if hostile else valid_headers
    headers += draw(st.lists(pairs | valid_headers, max_size=6))
    if draw(st.booleans()):  # most inputs end their connection; the rest rely on the timer
        headers.append((b"Connection", b"close"))
    head = newline.join([line, *(name + b": " + value for name, value in headers)])
    return head + newline + newline + draw(bodies)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ProxyProcess]:
    """The fake Cloudbeds and the proxy, each a real process; the proxy uses an API key."""
    fake_port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "proxy", "fake-cloudbeds", "--port", str(fake_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = {
        **fake_env(fake_url),
        "CBPROXY_API_KEY": "cbat_fake_api_key",
        "CBPROXY_HEAD_TIMEOUT": str(HEAD_TIMEOUT),
        "CBPROXY_READ_TIMEOUT": str(READ_TIMEOUT),
    }
    proxy = ProxyProcess(env, tmp_path / "proxy.log")
    try:
        _wait_for(fake_url)
        yield proxy.start()
    finally:
        proxy.stop()
        fake.terminate()
        fake.wait(10)


def _wait_for(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def send(port: int, data: bytes) -> bytes:
    """Send `data`, then read until the proxy ends the connection; fail past BOUND."""
    deadline = time.monotonic() + BOUND
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
                if time.monotonic() > deadline:
                    break
        except ConnectionError:  # the proxy may refuse the rest and close: that is an end
            return received
        except TimeoutError:
            pass
    assert time.monotonic() <= deadline, f"connection still open after {BOUND}s: {data!r}"
    return received


def answers(received: bytes) -> Iterator[tuple[int, dict[bytes, bytes], bytes]]:
    """The answers in `received`: (status, headers, body) while they can be framed."""
    while received.startswith(b"HTTP/1."):
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {k.lower(): v for k, _, v in (x.partition(b": ") for x in lines[1:])}
        if b"content-length" not in headers:
            yield status, headers, b""
            return
        length = int(headers[b"content-length"])
        yield status, headers, rest[:length]
        received = rest[length:]


@FUZZ
@given(data=st.data())
def test_raw_bytes_at_the_port(served: ProxyProcess, data: st.DataObject) -> None:
    request = data.draw(raw_requests())
    seen = len(served.log_text())
    received = send(served.port, request)
    outcomes = list(answers(received))
    event("no answer" if not outcomes else f"first answer {outcomes[0][0]}")
    for status, headers, body in outcomes:
        assert status != 500, (request, received)
        if b"x-cloudbeds-proxy-error" in headers and not request.startswith(b"HEAD "):
            # (An answer to HEAD carries no body: only its status and headers are checked.)
            error = json.loads(body)
            event(f"proxy error {error['error']}")
            assert set(error) == {"error", "message", "request_id"}, (request, received)
            assert error["error"] == headers[b"x-cloudbeds-proxy-error"].decode()
    with urllib.request.urlopen(f"{served.url}/_proxy/healthz", timeout=BOUND) as health:
        assert health.status == 200
    log = served.log_text()[seen:]
    for sign in ("Traceback", "request.crashed", "Unhandled exception", "Error handling"):
        assert sign not in log, (request, log[-3000:])
    assert '"level": "error"' not in log, (request, log[-3000:])
