"""Every operation of the official v1.3 SDK, sent once straight to a recorder and once
through the proxy to the same recorder: the two requests must be the same bytes.

The proxy may differ only where the README says it does: it adds the credential and an
`X-Request-ID`, and drops hop-by-hop headers (the SDK sends none). Multipart boundaries
are random per call, so they are named alike before the comparison.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import re
import types
import typing
from typing import Any

import cloudbeds_pms_v1_3 as sdk
import pytest

from tests.test_hostile_wire import settings

# The token endpoint is the one operation the proxy refuses by design (403, tested in
# tests/test_forwarding.py): callers never mint or see a token through it.
REFUSED = {("AuthenticationApi", "access_token_post")}
OPERATIONS = sorted(
    (api_name, name)
    for api_name in dir(sdk)
    if inspect.isclass(api := getattr(sdk, api_name))
    and api.__module__.startswith("cloudbeds_pms_v1_3.api.")
    for name, _ in inspect.getmembers(api, inspect.isfunction)
    if not name.startswith("_")
    and not name.endswith(("_with_http_info", "_preload_content"))
    and (api_name, name) not in REFUSED
)
FILE = ("document.pdf", b"%PDF-1.4 \x00\xff binary bytes")


def sample(annotation: Any) -> Any:
    """A plausible value for a parameter's type; None where the SDK accepts it and no
    simple value fits (models, free-form objects)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return sample(args[0])
    if origin in (typing.Union, types.UnionType):
        if bytes in args or any(
            typing.get_origin(a) is typing.Annotated and bytes in typing.get_args(a) for a in args
        ):
            return FILE
        for arg in args:
            if arg is not type(None) and (value := sample(arg)) is not None:
                return value
        return None
    if origin is list:
        value = sample(args[0])
        return None if value is None else [value]
    simple: dict[Any, Any] = {
        str: "Zoë & co/1",
        int: 7,
        float: 1.5,
        bool: True,
        bytes: FILE,
        datetime.date: datetime.date(2024, 2, 1),
        datetime.datetime: datetime.datetime(2024, 2, 1, 13, 30, 5),
    }
    return simple.get(annotation)


def call(base: str, api_name: str, name: str) -> None:
    api = getattr(sdk, api_name)(sdk.ApiClient(sdk.Configuration(host=f"{base}/api/v1.3")))
    method = getattr(api, f"{name}_without_preload_content")
    hints = typing.get_type_hints(getattr(type(api), name), include_extras=True)
    kwargs = {
        p: sample(hints[p])
        for p in inspect.signature(method).parameters
        if not p.startswith("_") and p in hints
    }
    method(**kwargs).read()


class Recorder:
    """A raw HTTP/1.1 server that keeps each request's bytes and answers `{}`."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.url = ""

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lowered = head.lower()
                if b"\r\ntransfer-encoding: chunked" in lowered:
                    body = await reader.readuntil(b"\r\n0\r\n\r\n")
                elif match := re.search(rb"\r\ncontent-length: *(\d+)", lowered):
                    body = await reader.readexactly(int(match[1]))
                else:
                    body = b""
                self.requests.append(head + body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def normalised(request: bytes) -> bytes:
    for boundary in re.findall(rb"boundary=([^\s;\r]+)", request):
        request = request.replace(boundary, b"BOUNDARY")
    return request


def without_proxy_additions(request: bytes) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"x-api-key: cbat_hostile", b"x-request-id: "))
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_the_operation_list_is_the_whole_sdk() -> None:
    assert len(OPERATIONS) == 114
    assert ("GuestApi", "delete_guest_note_delete") in OPERATIONS


@pytest.mark.parametrize(("api_name", "name"), OPERATIONS, ids=[o[1] for o in OPERATIONS])
async def test_every_sdk_operation_arrives_byte_for_byte(
    start_proxy: Any, api_name: str, name: str
) -> None:
    recorder = Recorder()
    server = await recorder.start()
    try:
        proxy = await start_proxy(settings(recorder.url))
        await asyncio.to_thread(call, recorder.url, api_name, name)
        await asyncio.to_thread(call, proxy, api_name, name)
    finally:
        server.close()
    direct, proxied = recorder.requests
    assert b"\r\nX-Request-ID: " in proxied and b"\r\nx-api-key: cbat_hostile" in proxied
    assert normalised(without_proxy_additions(proxied)) == normalised(direct)
