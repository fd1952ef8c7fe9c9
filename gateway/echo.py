"""A small real upstream for the demo, the tests and the benchmarks.

``python -m gateway.echo --port 8081`` serves:

- any path: a JSON echo of the method, path, query, headers and body size;
- ``.../status/{code}``: answers with that status;
- ``.../slow/{seconds}``: waits, then echoes (to exercise timeouts);
- ``.../stream/{chunks}``: a chunked body of that many lines;
- ``.../ping``: a two-byte answer (the benchmarks' cheap upstream);
- ``.../set-cookie``: an echo that also sets a cookie.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Sequence

import orjson
from aiohttp import web

__all__ = ["create_echo_app", "main"]


async def _echo(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    if tail.endswith("/ping"):
        return web.Response(body=b"ok", content_type="text/plain")
    parts = tail.split("/")
    if len(parts) >= 2 and parts[-2] == "slow":
        await asyncio.sleep(float(parts[-1]))
    if len(parts) >= 2 and parts[-2] == "stream":
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        for i in range(int(parts[-1])):
            await response.write(f"line {i}\n".encode())
        await response.write_eof()
        return response
    status = int(parts[-1]) if len(parts) >= 2 and parts[-2] == "status" else 200
    body = await request.read()
    payload = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": {k: request.query.getall(k) for k in request.query},
        "headers": {k.lower(): v for k, v in request.headers.items()},  # names folded
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    response = web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json"
    )
    if parts[-1] == "set-cookie":
        response.set_cookie("upstream-session", "s1")
    return response


def create_echo_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    web.run_app(create_echo_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":  # pragma: no cover
    main()
