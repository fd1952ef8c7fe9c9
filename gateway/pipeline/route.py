"""The ``route`` stage: forward an allowed request to its upstream, or to an agent.

A ``kind = "upstream"`` route has one circuit breaker (:mod:`gateway.circuit`):
connect failures, timeouts and 502/503/504 answers count against it, and while
it is open requests end with 503 ``circuit-open`` (and ``Retry-After``)
without a call. Agent and egress routes keep a breaker per endpoint or
destination in their own routers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from aiohttp import web

from gateway.agents import AgentRouter, build_agent_routers
from gateway.circuit import CircuitBreaker, CircuitBreakers
from gateway.config import RouteConfig
from gateway.context import RequestContext
from gateway.egress_route import EgressRouter, build_egress_routers
from gateway.errors import CircuitOpen, NoRoute, UpstreamTimeout, UpstreamUnavailable
from gateway.proxy import ReverseProxy

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Route", "build", "upstream_breakers"]

#: Upstream answers that count as failures of the upstream.
_FAILURE_STATUSES: Final = frozenset({502, 503, 504})


class Route:
    name = "route"

    def __init__(
        self,
        proxy: ReverseProxy,
        agents: dict[str, AgentRouter] | None = None,
        egress: dict[str, EgressRouter] | None = None,
        breakers: dict[str, CircuitBreaker] | None = None,
    ) -> None:
        self._proxy = proxy
        #: Agent routers by route name (routes of kind = "agent").
        self.agents = agents or {}
        #: Egress routers by route name (routes of kind = "egress").
        self.egress = egress or {}
        #: Circuit breakers by route name (routes of kind = "upstream").
        self.breakers = breakers or {}

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        if ctx.route is None:
            raise NoRoute()
        if ctx.route.kind == "agent":
            return await self.agents[ctx.route.name].forward(ctx)
        if ctx.route.kind == "egress":
            return await self.egress[ctx.route.name].forward(ctx)
        breaker = self.breakers.get(ctx.route.name)
        if breaker is None:
            return await self._proxy.forward(ctx, ctx.route)
        return await self._forward(ctx, ctx.route, breaker)

    async def _forward(
        self, ctx: RequestContext, route: RouteConfig, breaker: CircuitBreaker
    ) -> web.StreamResponse:
        ticket = breaker.allow()
        if ticket is None:
            raise CircuitOpen.retry_in(
                f"upstream {route.name} is failing; the request was not sent", breaker.retry_in
            )
        try:
            response = await self._proxy.forward(ctx, route)
        except (UpstreamUnavailable, UpstreamTimeout):
            breaker.failure(ticket)
            raise
        except BaseException:
            breaker.release(ticket)  # the caller's doing (body too large, went away)
            raise
        if ctx.upstream_status in _FAILURE_STATUSES:
            breaker.failure(ticket)
        else:
            breaker.success(ticket)
        return response

    async def close(self) -> None:
        for router in self.agents.values():
            await router.close()


def upstream_breakers(routes: Sequence[RouteConfig]) -> dict[str, CircuitBreaker]:
    """One breaker per ``kind = "upstream"`` route, with that route's settings."""
    breakers: dict[str, CircuitBreaker] = {}
    for route in routes:
        if route.kind == "upstream":
            factory = CircuitBreakers(
                failure_threshold=route.circuit_failures,
                open_s=route.circuit_open_s,
                half_open_max=route.circuit_half_open_max,
            )
            breakers[route.name] = factory.get(route.name, label=route.name)
    return breakers


def build(deps: PipelineDeps) -> Route:
    return Route(
        deps.proxy,
        build_agent_routers(deps.config.routes, deps.proxy, deps.http),
        build_egress_routers(deps.config),
        upstream_breakers(deps.config.routes),
    )
