"""Serve one bundle file to the supervised local OPA over loopback HTTP.

OPA verifies a bundle's signature every time its bundle plugin downloads one,
but not when ``opa run --watch`` reloads a bundle file, and it reads a
``file://`` resource only once. So for ``policy.bundle_file`` the gateway
serves that file on 127.0.0.1 and the local OPA polls it exactly as a sidecar
polls a bundle server (deploy/opa/config.yaml): a replaced file is picked up
within the polling delay, and one whose signature does not verify is never
activated.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Final

from aiohttp import hdrs, web

__all__ = ["BUNDLE_RESOURCE", "BundleFileServer"]

#: Where OPA asks for the bundle (relative to the service URL).
BUNDLE_RESOURCE: Final = "bundles/nops/bundle.tar.gz"


class BundleFileServer:
    """``GET /bundles/nops/bundle.tar.gz`` answers the file's current bytes, with an ETag."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/" + BUNDLE_RESOURCE, self._bundle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # SECURITY: loopback only; the bundle is signed, but it is nobody else's business.
        site = web.TCPSite(runner, "127.0.0.1", 0)
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
