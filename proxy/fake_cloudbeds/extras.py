"""Fake-only endpoints under `.../fake/`: echo, a precompressed body, a large streamed body.

They authenticate like the API but take any property id, so fidelity tests can send any
`X-PROPERTY-ID` and see exactly what arrived.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json

from aiohttp import web

from proxy.fake_cloudbeds.api import CHUNK, fake_api

ECHO_BODY_LIMIT = 1024 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)


@fake_api
async def fake_gzip(request: web.Request) -> web.StreamResponse:
    """GET .../fake/gzip: a JSON body the fake compressed itself."""
    payload = json.dumps({"success": True, "data": {"compressed": True}}).encode()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=gzip.compress(payload), headers=headers)


def large_body(size: int) -> bytes:
    """What `.../fake/large?bytes=size` sends: byte i is i % 256."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@fake_api
async def fake_large(request: web.Request) -> web.StreamResponse:
    """GET .../fake/large?bytes=N: N deterministic bytes, streamed in chunks."""
    try:
        size = int(request.query.get("bytes", "0"))
    except ValueError:
        size = -1
    if not 0 <= size <= 4 * 1024**3:
        return web.json_response({"success": False, "message": "bad bytes"}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    try:
        for start in range(0, size, CHUNK):
            await response.write(_PATTERN[: min(CHUNK, size - start)])
    except ConnectionError:  # the reader went away, as readers do
        return response
    await response.write_eof()
    return response


@fake_api
async def fake_echo(request: web.Request) -> web.StreamResponse:
    """Any method .../fake/echo[/...]: what arrived, exactly, with the body streamed."""
    digest, size, kept = hashlib.sha256(), 0, bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if size < ECHO_BODY_LIMIT:
            kept += chunk
    body = base64.b64encode(kept).decode() if size < ECHO_BODY_LIMIT else None
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": headers,
            "body_length": size,
            "body_sha256": digest.hexdigest(),
            "body_base64": body,
        }
    )
