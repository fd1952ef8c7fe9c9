"""The ``route`` stage: forward an allowed request to its upstream."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import NoRoute
from gateway.proxy import ReverseProxy

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Route", "build"]


class Route:
    name = "route"

    def __init__(self, proxy: ReverseProxy) -> None:
        self._proxy = proxy

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        if ctx.route is None:
            raise NoRoute()
        return await self._proxy.forward(ctx, ctx.route)


def build(deps: PipelineDeps) -> Route:
    return Route(deps.proxy)
