"""The ``route`` stage: forward an allowed request to its upstream, or to an agent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.agents import AgentRouter, build_agent_routers
from gateway.context import RequestContext
from gateway.egress_route import EgressRouter, build_egress_routers
from gateway.errors import NoRoute
from gateway.proxy import ReverseProxy

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Route", "build"]


class Route:
    name = "route"

    def __init__(
        self,
        proxy: ReverseProxy,
        agents: dict[str, AgentRouter] | None = None,
        egress: dict[str, EgressRouter] | None = None,
    ) -> None:
        self._proxy = proxy
        #: Agent routers by route name (routes of kind = "agent").
        self.agents = agents or {}
        #: Egress routers by route name (routes of kind = "egress").
        self.egress = egress or {}

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        if ctx.route is None:
            raise NoRoute()
        if ctx.route.kind == "agent":
            return await self.agents[ctx.route.name].forward(ctx)
        if ctx.route.kind == "egress":
            return await self.egress[ctx.route.name].forward(ctx)
        return await self._proxy.forward(ctx, ctx.route)

    async def close(self) -> None:
        for router in self.agents.values():
            await router.close()


def build(deps: PipelineDeps) -> Route:
    return Route(
        deps.proxy,
        build_agent_routers(deps.config.routes, deps.proxy, deps.http),
        build_egress_routers(deps.config),
    )
