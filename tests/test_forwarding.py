"""End to end through the proxy's HTTP port: fidelity, streaming, headers, SSRF, errors."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import socket
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import settings_for

Fake = tuple[FakeCloudbeds, str]


async def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes exactly as given (no client normalisation) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def echo(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> dict[str, Any]:
    async with session.request(kwargs.pop("method", "GET"), url, **kwargs) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_odd_path_and_query_reach_cloudbeds_byte_for_byte(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    _state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    target = "/api/v1.3/fake/echo/a%2Cb?ids=1%2C2&q=a+b&rooms[0][roomTypeID]=7&x=%E2%82%AC&empty="
    answer = await raw_request(
        proxy,
        f"GET {target} HTTP/1.1\r\nHost: example\r\nX-PROPERTY-ID: 1001\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    seen = json.loads(body)
    assert seen["raw_path"] == target
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-property-id"] == "1001"
    assert headers["authorization"].startswith("Bearer ")
    assert headers["host"] == fake_url.removeprefix("http://")
    # aiohttp's client adds these unless told not to; the proxy must not.
    assert "accept-encoding" not in headers
    assert "user-agent" not in headers
    assert "accept" not in headers


async def test_form_and_multipart_bodies_arrive_unchanged(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    form = b"propertyID=1001&rooms%5B0%5D%5BroomTypeID%5D=7&guestFirstName=Zo%C3%AB&note=a+b%2Cc"
    boundary = "----cbproxyBoundary"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="id.pdf"\r\n'
        f"Content-Type: application/pdf\r\n\r\n".encode()
        + bytes(range(256)) * 40
        + f"\r\n--{boundary}--\r\n".encode()
    )
    async with aiohttp.ClientSession() as session:
        for body, content_type in (
            (form, "application/x-www-form-urlencoded"),
            (multipart, f"multipart/form-data; boundary={boundary}"),
        ):
            seen = await echo(
                session,
                f"{proxy}/api/v1.3/fake/echo",
                method="POST",
                data=body,
                headers={"Content-Type": content_type},
            )
            assert base64.b64decode(seen["body_base64"]) == body
            assert {k.lower(): v for k, v in seen["headers"]}["content-type"] == content_type


async def test_gzip_passes_through_still_compressed(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(f"{proxy}/api/v1.3/fake/gzip") as response:
            raw = await response.read()
            assert response.headers["Content-Encoding"] == "gzip"
            assert int(response.headers["Content-Length"]) == len(raw)
    assert json.loads(gzip.decompress(raw))["success"] is True


async def test_hop_by_hop_dropped_and_authorization_replaced(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    async with aiohttp.ClientSession() as session:
        seen = await echo(
            session,
            f"{proxy}/api/v1.3/fake/echo",
            headers={
                "Authorization": "Bearer caller-supplied",
                "x-api-key": "cbat_caller",
                "Connection": "keep-alive, X-Private-Hop",
                "X-Private-Hop": "secret-hop",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic abc",
                "TE": "trailers",
                "Upgrade": "h2c",
                "X-Custom": "kept",
                "X-Request-ID": "caller-id-1",
            },
        )
    headers: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    for dropped in (
        "x-private-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
        "x-api-key",
    ):
        assert dropped not in headers, dropped
    assert headers["authorization"] == [f"Bearer {state.valid_access_tokens()[0]}"]
    assert headers["x-custom"] == ["kept"]
    assert headers["x-request-id"] == ["caller-id-1"]


async def test_request_id_generated_sent_upstream_and_cloudbeds_id_returned(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"].startswith("fake-")
        async with session.get(f"{proxy}/api/v1.3/access_token") as response:
            assert response.status == 403
            assert len(response.headers["X-Request-ID"]) == 32
    assert state.incoming_request_ids[-1] and len(state.incoming_request_ids[-1]) == 32


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "//evil.example/api/v1.3/getHotels",
        "/api/v1.3/../../admin",
        "/api/v1.3/%2e%2e/admin",
        "/api/v1.3/getHotels\\..\\x",
        "/api/v1.3/get%00Hotels",
        "/api/v1.3/get%0d%0aHotels",
    ],
)
async def test_ssrf_attempts_refused_and_never_reach_upstream(
    fake_cloudbeds: Fake, start_proxy: Any, target: str
) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    await asyncio.sleep(0.05)  # let the start-up refresh finish so requests_seen is stable
    before = list(state.requests_seen)
    answer = await raw_request(
        proxy, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert state.requests_seen == before


async def test_connect_refused(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    answer = await raw_request(
        proxy,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert not any(path.startswith("evil") for _, path in state.requests_seen)


@pytest.mark.parametrize(
    "path",
    ["/api/v1.3/access_token", "/api/v1.2/access_token", "/api/v1.1/oauth", "/api/v1.3/OAuth/"],
)
async def test_credential_endpoints_forbidden(
    fake_cloudbeds: Fake, start_proxy: Any, path: str
) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    calls = sum(state.token_calls.values())
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy}{path}", data={"grant_type": "refresh_token"}) as response,
    ):
        assert response.status == 403
        assert response.headers["X-Cloudbeds-Proxy-Error"] == "credential_endpoint_blocked"
        assert (await response.json())["error"] == "credential_endpoint_blocked"
    assert sum(state.token_calls.values()) == calls


async def test_oauth_metadata_passes(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/api/v1.3/oauth/metadata") as response,
    ):
        assert response.status == 200
        assert "X-Cloudbeds-Proxy-Error" not in response.headers


async def test_upstream_unreachable_is_502_json(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    _, fake_url = fake_cloudbeds
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proxy = await start_proxy(settings_for(fake_url, CBPROXY_UPSTREAM_URL=dead))

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/api/v1.3/getHotels") as response,
    ):
        assert response.status == 502
        body = await response.json()
        assert body["error"] == "upstream_unreachable"
        assert response.headers["X-Cloudbeds-Proxy-Error"] == "upstream_unreachable"
        assert body["request_id"] == response.headers["X-Request-ID"]


async def test_upstream_timeout_is_504_json(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url, CBPROXY_READ_TIMEOUT="0.3"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
            assert response.status == 200
        state.api_delay = 1.0
        async with session.get(f"{proxy}/api/v1.3/getHotels") as response:
            assert response.status == 504
            assert (await response.json())["error"] == "upstream_timeout"
            assert "Retry-After" in response.headers


async def test_body_over_limit_is_413_json(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    _state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url, CBPROXY_MAX_BODY_BYTES="1000"))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy}/api/v1.3/fake/echo", data=b"x" * 1001) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "body_too_large"

        async def chunks() -> Any:
            for _ in range(10):
                yield b"y" * 500

        async with session.post(f"{proxy}/api/v1.3/fake/echo", data=chunks()) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "body_too_large"


async def test_no_usable_token_is_503_with_retry_after(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    state, fake_url = fake_cloudbeds
    state.token_failures = 1000  # the token endpoint is down
    proxy = await start_proxy(settings_for(fake_url, CBPROXY_WAIT_FOR_TOKEN="0.3"), ready=False)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/api/v1.3/getHotels") as response,
    ):
        assert response.status == 503
        assert (await response.json())["error"] == "no_usable_token"
        assert int(response.headers["Retry-After"]) >= 1
    assert state.api_calls == 0


async def test_api_key_credential_sent_as_x_api_key(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    state, fake_url = fake_cloudbeds
    settings = settings_for(
        fake_url,
        CBPROXY_API_KEY=state.api_key,
        CBPROXY_CLIENT_ID="",
        CBPROXY_CLIENT_SECRET="",
        CBPROXY_REFRESH_TOKEN="",
    )
    proxy = await start_proxy(settings)
    async with aiohttp.ClientSession() as session:
        seen = await echo(
            session, f"{proxy}/api/v1.3/fake/echo", headers={"Authorization": "Bearer x"}
        )
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-api-key"] == state.api_key
    assert "authorization" not in headers
    assert sum(state.token_calls.values()) == 0


async def test_unknown_proxy_endpoint_is_json_404(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/_proxy/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"


async def test_large_streamed_answer_passes_intact(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    size = 5 * 1024 * 1024 + 3
    digest = hashlib.sha256()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/api/v1.3/fake/large?bytes={size}") as response,
    ):
        assert response.status == 200
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            digest.update(chunk)
    from proxy.fake_cloudbeds import large_body

    assert received == size
    assert digest.hexdigest() == hashlib.sha256(large_body(size)).hexdigest()


async def test_expect_100_continue_upload_is_answered_not_hung(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url, CBPROXY_READ_TIMEOUT="5"))
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(10):
            seen = await echo(
                session,
                f"{proxy}/api/v1.3/fake/echo",
                method="POST",
                data=b"z" * 5000,
                headers={"Expect": "100-continue"},
                expect100=True,
            )
    assert seen["body_length"] == 5000
    assert "expect" not in {name.lower() for name, _ in seen["headers"]}


async def test_non_ascii_header_bytes_pass_unchanged_both_ways(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    answer = await raw_request(
        proxy,
        "GET /api/v1.3/fake/echo HTTP/1.1\r\nHost: x\r\nX-Guest: Zoë Müller\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    # The echo reports header bytes as latin-1 text: compare the bytes themselves.
    (guest,) = [value for name, value in body["headers"] if name == "X-Guest"]
    assert guest.encode("latin-1") == "Zoë Müller".encode()


async def test_invalid_caller_request_id_is_replaced_upstream_and_in_logs(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{proxy}/api/v1.3/getHotels", headers={"X-Request-ID": "y" * 300}
        ) as response:
            assert response.status == 200
    assert len(state.incoming_request_ids[-1]) == 32


async def test_caller_leaving_mid_download_is_logged_as_the_caller_quietly(
    fake_cloudbeds: Fake, start_proxy: Any, captured_logs: io.StringIO
) -> None:
    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/v1.3/fake/large?bytes=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await reader.readexactly(200_000)
    writer.transport.abort()
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while not any(line.get("event") == "request" for line in lines):
            await asyncio.sleep(0.05)
            lines = [
                json.loads(x) for x in captured_logs.getvalue().splitlines() if x.startswith("{")
            ]
    (access,) = [
        line for line in lines if line.get("event") == "request" and "large" in line["path"]
    ]
    assert access["status"] == 200
    assert access["cut_short"] == "caller"
    assert not [line for line in lines if line.get("level") in ("error", "warning")]


async def test_upstream_keeps_no_cookies_and_adds_no_headers() -> None:
    """The forwarder's client sends the headers it is given after Host, nothing else: a
    cookie Cloudbeds sets on one answer is never sent with the next call."""
    from aiohttp import web

    from proxy.upstream import Upstream
    from tests.support import serve

    seen: list[list[tuple[str, str]]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append([(k.decode(), v.decode()) for k, v in request.raw_headers])
        return web.Response(text="ok", headers={"Set-Cookie": "session=caller-a; Path=/"})

    app = web.Application()
    app.router.add_get("/api/v1.3/getHotels", upstream)
    runner, url = await serve(app)
    client = Upstream(
        url, limit=2, keepalive=30, connect_timeout=5, read_timeout=5, max_headers=100
    )
    given = CIMultiDict([("X-Custom", "1"), ("x-custom", "2"), ("Authorization", "Bearer t")])
    try:
        for _ in range(2):
            answer = await client.send("GET", "/api/v1.3/getHotels", given, None)
            assert answer.status == 200
            assert await answer.content.read() == b"ok"
            answer.release()
    finally:
        await client.close()
        await runner.cleanup()
    host = url.removeprefix("http://")
    assert seen == [[("Host", host), *given.items()]] * 2


async def _keepalive_requests(url: str, request: bytes, count: int) -> None:
    """`count` requests in turn on one keep-alive connection, each answer read whole."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()


async def test_a_forwarded_request_leaves_no_reference_cycle(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    """What a request makes goes when it ends (reference counting), not at the next
    collection: the serving process's collector policy (proxy/cli.py) relies on it."""
    import gc

    _, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    get = b"GET /api/v1.3/getHotels HTTP/1.1\r\nHost: p\r\nX-PROPERTY-ID: 1001\r\n\r\n"
    form = b"propertyID=1001&guestFirstName=Ada"
    post = (
        b"POST /api/v1.3/fake/echo HTTP/1.1\r\nHost: p\r\nX-PROPERTY-ID: 1001\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(form), form)
    )
    for request in (get, post):
        await _keepalive_requests(proxy, request, 20)  # pools filled, plans cached
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for request in (get, post):
            await _keepalive_requests(proxy, request, 150)
        gc.collect()
        garbage = [type(o).__qualname__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    # The two closed client connections' transports and sockets are all that is left.
    assert len(garbage) < 30, sorted(set(garbage))
