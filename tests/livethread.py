"""Live services for synchronous callers (schemathesis): an aiohttp app served from a thread.

schemathesis and Hypothesis drive the API from plain, blocking test
functions, so the service under test cannot share the test's event loop.
:class:`LiveServer` runs one on its own loop in a daemon thread, on a free
loopback port, with the real runner (``cleanup_ctx`` and all), and stops it
when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

__all__ = ["LiveServer", "Served"]

#: An async context manager that yields the app to serve (and cleans up what it set up).
Served = Callable[[], AbstractAsyncContextManager[web.Application]]


class LiveServer:
    """Serve the app ``serve()`` yields on 127.0.0.1 from a thread; ``url`` once started."""

    def __init__(
        self, serve: Served, *, runner: type[web.AppRunner] = web.AppRunner, **runner_kwargs: Any
    ) -> None:
        self._serve = serve
        self._runner_cls = runner
        self._runner_kwargs = runner_kwargs
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> LiveServer:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the live server did not start in time")
        if self._error is not None:
            raise RuntimeError("the live server failed to start") from self._error
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or lost at stop
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self._serve() as app, _served(app, self._runner_cls, self._runner_kwargs) as url:
            self.url = url
            self._ready.set()
            await self._stop.wait()


@contextlib.asynccontextmanager
async def _served(
    app: web.Application, runner_cls: type[web.AppRunner], kwargs: dict[str, Any]
) -> AsyncIterator[str]:
    runner = runner_cls(app, **kwargs)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]  # the bound port of the port-0 site
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
