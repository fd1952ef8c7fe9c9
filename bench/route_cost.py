"""CPU per request of the gateway's ``route`` stage vs the bare proxy's handler.

    python -m bench.route_cost [--requests 3000] [--runs 5] [--concurrency 1,16]
                               [--kinds get,post]

Starts a real upstream (``gateway.echo``, its own process) and two front
servers, each its own process on uvloop as ``gateway serve`` runs:

- ``bare``: :mod:`bench.bare_proxy`'s app, unchanged;
- ``route``: an app whose only handler gives the request a
  :class:`~gateway.context.RequestContext` (a verified identity, as after the
  pipeline) and runs the gateway's :class:`~gateway.pipeline.route.Route`
  stage on a ``kind = "upstream"`` route (circuit breaker, header hygiene,
  X-Nops-* identity, timeouts, streaming) over a session built as
  ``gateway/app.py`` builds it. No middleware, no other stage.

This script is the client: it sends ``--requests`` requests to one front at
a time (``--concurrency`` of them in flight: 1 is the "one at a time" regime
of bench.run's stage table, more is the regime of max throughput) and reads
the front process's CPU (user + system, /proc) before and after. Fronts
alternate within each run; the figure is the median of ``--runs`` runs.
``get`` is ``GET .../ping`` (2-byte answer); ``post`` sends a 1 KiB body
with a Content-Length.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.harness import cpu_seconds, free_port, median, stack, wait_http

_KINDS = {"get": ("GET", b""), "post": ("POST", b"x" * 1024)}


def _route_app(upstream: str) -> web.Application:
    from gateway.config import RouteConfig
    from gateway.context import REQUEST_CONTEXT, RequestContext, Subject, Tenant
    from gateway.pipeline.route import Route, upstream_breakers
    from gateway.proxy import ReverseProxy

    app = web.Application()
    route = RouteConfig(name="bench", prefix="/", upstream=upstream, auth="jwt")
    stage: list[Route] = []

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # As gateway/app.py's _http_session.
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=256, ttl_dns_cache=30)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            proxy = ReverseProxy(session, max_body_bytes=1 << 20)
            stage.append(Route(proxy, breakers=upstream_breakers([route])))
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = RequestContext(request=request, request_id="0" * 32, client_ip="127.0.0.1")
        ctx.route = route
        ctx.tenant = Tenant("acme")
        ctx.subject = Subject(sub="alice", scopes=("read", "write"), agent_id="agent-1")
        request[REQUEST_CONTEXT] = ctx
        response = await stage[0].run(ctx)
        assert response is not None
        return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _serve(kind: str, port: int, upstream: str) -> None:
    import uvloop

    from bench.bare_proxy import create_app

    app = create_app(upstream) if kind == "bare" else _route_app(upstream)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


async def _drive(url: str, method: str, body: bytes, requests: int, concurrency: int) -> int:
    """Send ``requests`` requests, ``concurrency`` at a time; the count of non-200s."""
    errors = 0
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                async with session.request(method, url, data=body or None) as response:
                    await response.read()
                    errors += response.status != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def _measure(pid: int, url: str, kind: str, requests: int, concurrency: int) -> float:
    method, body = _KINDS[kind]
    asyncio.run(_drive(url, method, body, 200, concurrency))  # warm-up
    before = cpu_seconds(pid)
    errors = asyncio.run(_drive(url, method, body, requests, concurrency))
    used = cpu_seconds(pid) - before
    if errors:
        raise RuntimeError(f"{errors} non-200 answers from {url}")
    return used / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.route_cost")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--kinds", default="get,post")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also measure the route stage of the tree in this directory (a plain copy "
        "of another commit, with this script in its bench/), as front 'before'",
    )
    parser.add_argument("--serve", choices=("bare", "route"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.port, args.upstream)
        return 0

    fronts = ("bare", "before", "route") if args.baseline else ("bare", "route")
    ports = {name: free_port() for name in ("upstream", *fronts)}
    upstream = f"http://127.0.0.1:{ports['upstream']}"
    with stack() as procs:
        procs.spawn([sys.executable, "-m", "gateway.echo", "--port", str(ports["upstream"])])
        pids: dict[str, int] = {}
        for front in fronts:
            argv = [sys.executable, "-m", "bench.route_cost", "--serve"]
            argv += ["bare" if front == "bare" else "route", "--port", str(ports[front])]
            argv += ["--upstream", upstream]
            if front == "before":
                process = subprocess.Popen(argv, cwd=args.baseline, stdout=subprocess.DEVNULL)
                procs.processes.append(process)
            else:
                process = procs.spawn(argv)
            pids[front] = process.pid
        wait_http(f"{upstream}/x/ping")
        for front in fronts:
            wait_http(f"http://127.0.0.1:{ports[front]}/x/ping")
        print("CPU µs per request of the front process (median of runs; all runs)")
        for kind in args.kinds.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                samples: dict[str, list[float]] = {front: [] for front in fronts}
                started = time.monotonic()
                for _ in range(args.runs):
                    for front in fronts:
                        url = f"http://127.0.0.1:{ports[front]}/x/ping"
                        samples[front].append(
                            _measure(pids[front], url, kind, args.requests, concurrency)
                        )
                medians = {front: median(samples[front]) for front in fronts}
                row = "  ".join(f"{front} {medians[front]:4.0f}" for front in fronts)
                ratios = "  ".join(
                    f"{front}/bare {medians[front] / medians['bare']:4.2f}" for front in fronts[1:]
                )
                runs = "; ".join(
                    f"{front} {', '.join(f'{s:.0f}' for s in samples[front])}" for front in fronts
                )
                print(
                    f"{kind:4} concurrency {concurrency:3}: {row}  {ratios}   "
                    f"({runs}; {time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
