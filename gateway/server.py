"""Serving: the runner, protocol-level errors, signals and graceful shutdown.

aiohttp answers requests it cannot parse (bad framing, invalid header
tokens) itself, with a text body that quotes the offending bytes and without
our headers. :class:`GatewayRunner` makes those answers problem+json with the
security headers and a request id like every other response, and never
echoes what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import (
    GatewayError,
    InternalError,
    MalformedRequest,
    PayloadTooLarge,
)
from gateway.logs import REQUEST_ID
from gateway.middleware import SECURITY_HEADERS
from gateway.problem import problem_response

__all__ = ["GatewayRunner", "serve"]

_log = logging.getLogger("gateway.server")

_PROTOCOL_ERRORS: Final[dict[int, type[GatewayError]]] = {
    400: MalformedRequest,
    413: PayloadTooLarge,
    431: MalformedRequest,
}


class _ProblemRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        request_id = uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        try:
            # Logs (as JSON, without a trace) and refuses if a response already began.
            super().handle_error(request, status, exc, None)
        finally:
            REQUEST_ID.reset(token)
        cls = _PROTOCOL_ERRORS.get(status, InternalError)
        # SECURITY: a fixed detail; aiohttp's message quotes the request's bytes.
        detail = "the request is not valid HTTP/1.1" if cls is not InternalError else None
        response = problem_response(cls(detail), request_id=request_id)
        response.headers.update(SECURITY_HEADERS)
        response.headers["X-Request-Id"] = request_id
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose protocol errors are problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The subclass adds no state, only the connection handler class.
        server.__class__ = _ProblemServer
        return server


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    reuse_port: bool = False,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully.

    On a signal the listener closes, in-flight requests get up to
    ``shutdown_timeout`` seconds to finish, then ``cleanup_ctx`` runs.
    """
    runner = GatewayRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        _settle_heap()
        _log.info("listening", extra={"address": site.name})
        if ready is not None:
            ready.set()
        await stop.wait()
        _log.info("shutting down", extra={"grace_s": shutdown_timeout})
    finally:
        # Signals stay handled while in-flight requests drain: a second
        # SIGTERM must not cut them off.
        try:
            await runner.cleanup()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)


def _settle_heap() -> None:
    """Move everything alive after start-up out of the cyclic GC's reach.

    Modules, config, keys, compiled policies and pools live for the whole
    process; left in the collector's oldest generation, every full collection
    walks them all again (with the per-request cycles, since removed, such
    collections paused the loop for 67-79 ms under load). ``gc.freeze``
    leaves them to reference counting, so a full collection walks only what
    requests created (ADR 0021).
    """
    gc.collect()
    gc.freeze()
