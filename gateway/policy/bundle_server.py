"""Serve one bundle file to the supervised local OPA over loopback HTTP.

OPA verifies a bundle's signature every time its bundle plugin downloads one,
but not when ``opa run --watch`` reloads a bundle file, and it reads a
``file://`` resource only once. So for ``policy.bundle_file`` the gateway
serves that file on 127.0.0.1 and the local OPA polls it exactly as a sidecar
polls a bundle server (deploy/opa/config.yaml): a replaced file is picked up
within the polling delay, and one whose signature does not verify is never
activated.

The same server is the bundle service of the deployments (compose.yaml,
deploy/k8s): ``python -m gateway.policy.bundle_server --file F --host H --port P``
serves the signed bundle a one-shot build wrote, and answers ``GET /health``
(200 once the file is readable, 503 before) for the orchestrator's probes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from aiohttp import hdrs, web

__all__ = ["BUNDLE_RESOURCE", "BundleFileServer", "create_app", "main"]

#: Where OPA asks for the bundle (relative to the service URL).
BUNDLE_RESOURCE: Final = "bundles/nops/bundle.tar.gz"


class BundleFileServer:
    """``GET /bundles/nops/bundle.tar.gz`` answers the file's current bytes, with an ETag."""

    def __init__(self, file: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.file = file
        # SECURITY: loopback by default; the bundle is signed, but it is nobody
        # else's business. A deployment's bundle service binds its pod/container address.
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        """The routes: the bundle, and ``/health``."""
        app = web.Application()
        app.router.add_get("/" + BUNDLE_RESOURCE, self._bundle)
        app.router.add_get("/health", self._health)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _bundle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await asyncio.to_thread(self.file.read_bytes)
        except OSError:
            raise web.HTTPNotFound() from None
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if request.headers.get(hdrs.IF_NONE_MATCH) == etag:
            return web.Response(status=304, headers={hdrs.ETAG: etag})
        return web.Response(body=body, content_type="application/gzip", headers={hdrs.ETAG: etag})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        readable = await asyncio.to_thread(self.file.is_file)
        return web.json_response(
            {"status": "ok" if readable else "no bundle"}, status=200 if readable else 503
        )


def create_app(file: Path) -> web.Application:
    """The bundle service's application for ``file``."""
    return BundleFileServer(file).app()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.policy.bundle_server",
        description="Serve one signed OPA bundle file at /" + BUNDLE_RESOURCE,
    )
    parser.add_argument("--file", type=Path, required=True, help="the signed bundle.tar.gz")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8282)
    args = parser.parse_args(argv)
    web.run_app(create_app(args.file), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
