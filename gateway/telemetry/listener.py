"""The admin listener: ``GET /metrics`` on its own host and port.

Kept apart from the proxied traffic so that the scrape endpoint is never
reachable through the gateway's public port, never passes the pipeline
(no signature, no policy, no audit record per scrape) and can be bound to
loopback or a private interface while the gateway listens publicly.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway.config import MetricsConfig
from gateway.telemetry import Telemetry

__all__ = ["MetricsListener"]

_log = logging.getLogger("gateway.metrics")
_TELEMETRY: Final = web.AppKey("telemetry", Telemetry)


class MetricsListener:
    """Serves one app's registry; :attr:`port` is the bound port (useful with port 0)."""

    def __init__(self, config: MetricsConfig, telemetry: Telemetry) -> None:
        self._config = config
        app = web.Application()
        app[_TELEMETRY] = telemetry
        app.router.add_get("/metrics", _metrics_handler(telemetry))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port = config.port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        _log.info("metrics listening", extra={"host": self._config.host, "port": self.port})

    async def stop(self) -> None:
        await self._runner.cleanup()


def _metrics_handler(telemetry: Telemetry) -> Handler:
    instruments = telemetry.instruments
    if instruments is None:
        raise ValueError("metrics are not enabled")
    exposition = make_aiohttp_handler(instruments.registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        await telemetry.refresh()
        return await exposition(request)

    return metrics
