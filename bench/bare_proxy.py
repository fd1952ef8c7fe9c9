"""The baseline: a bare aiohttp reverse proxy with uvloop and keep-alive.

It does what any proxy must (forward method, path, headers and body; relay
status, headers and body) and nothing the gateway adds, so the ratio
gateway / bare proxy is the price of the pipeline.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "te"})
_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=256)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[_SESSION] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read() if request.body_exists else None
        async with app[_SESSION].request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream_response:
            payload = await upstream_response.read()
            out = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _HOP}
            out.pop("Content-Length", None)
            return web.Response(status=upstream_response.status, body=payload, headers=out)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT: several processes on one port"
    )
    args = parser.parse_args()
    web.run_app(
        create_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        reuse_port=args.reuse_port or None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
