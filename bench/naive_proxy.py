"""The baseline for bench/throughput.py: the proxy anyone would write in an afternoon.

Deliberately naive: one ClientSession, the whole body read, the Authorization header set,
a web.Response back. No streaming, no target checks, no logs, no metrics, no Redis.

    python bench/naive_proxy.py --port 8081 --upstream http://127.0.0.1:9090 \\
        --authorization "Bearer x"
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("SESSION", aiohttp.ClientSession)
# Headers the naive proxy leaves to aiohttp on each side (framing, Host, the credential).
DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def create_app(upstream: str, authorization: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        # The same pool size as the product's connector (proxy/app.py), so the two differ
        # only in what they do per request.
        connector = aiohttp.TCPConnector(limit=200)
        app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        headers["Authorization"] = authorization
        body = await request.read()
        url = upstream + request.raw_path
        async with request.app[SESSION].request(
            request.method, url, headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            back = {k: v for k, v in answer.headers.items() if k.lower() not in DROP}
            return web.Response(status=answer.status, body=payload, headers=back)

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--authorization", required=True)
    args = parser.parse_args()
    app = create_app(args.upstream.rstrip("/"), args.authorization)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
