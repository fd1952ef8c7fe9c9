"""Agent routing: proxy to live agents found in the registry, around dead ones.

A route of ``kind = "agent"`` (prefix ``/agents/`` below) takes

- ``/agents/{agent_id}/rest`` -> ``{endpoint_url}/rest`` of that agent of the
  caller's tenant: 404 ``agent-not-found`` if there is none, 503
  ``agent-unavailable`` if it is stale or a zombie;
- ``/agents/by-capability/{capability}/rest`` -> ``{endpoint_url}/rest`` of
  one healthy agent of the tenant offering the capability, chosen at random
  in proportion to ``weight`` (weight 0 drains an agent: reachable by id,
  never chosen by capability).

The query string is kept. Every attempt has the route's ``timeout_s`` and
``connect_timeout_s``, and goes through the endpoint's circuit breaker
(:mod:`gateway.circuit`): connect failures, timeouts and 502/503/504 count
against it, and an open circuit is skipped without a call.

Retries, with jittered exponential backoff, prefer an instance not tried
yet (failover). A request is retried when it cannot have had an effect:
always when it never left the gateway (connect failure, open circuit), and
for idempotent methods (GET, HEAD, PUT, DELETE, OPTIONS) also after a
timeout, a broken exchange or a 502/503/504, as long as nothing has been
sent to the client. Request bodies are read (within
``server.max_body_bytes``) before the first attempt so that a retry can
resend them; responses stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import yarl
from aiohttp import web

from gateway.agent_directory import (
    AgentDirectory,
    AgentEndpoint,
    HttpAgentDirectory,
    RegistryUnavailable,
)
from gateway.circuit import CircuitBreaker, CircuitBreakers, Ticket
from gateway.config import AgentRouteConfig, RouteConfig
from gateway.context import RequestContext
from gateway.errors import (
    AgentNotFound,
    AgentUnavailable,
    DependencyUnavailable,
    GatewayError,
    MalformedRequest,
    MissingCredentials,
    NoRoute,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.proxy import ReverseProxy

__all__ = [
    "BY_CAPABILITY",
    "IDEMPOTENT_METHODS",
    "AgentRouter",
    "AgentTarget",
    "build_agent_routers",
    "parse_agent_target",
    "weighted_choice",
]

_log = logging.getLogger("gateway.agents")

#: The path segment after the prefix that selects by capability instead of by id.
BY_CAPABILITY: Final = "by-capability"
#: RFC 9110 §9.2.2 idempotent methods: retried after any failure.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# The registry's own rules (registry/model.py); repeated, as the gateway does not import it.
_AGENT_ID: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_CAPABILITY: Final = re.compile(r"[a-z0-9][a-z0-9._:-]{0,63}")
_RETRY_STATUSES: Final = frozenset({502, 503, 504})

Sleep = Callable[[float], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class AgentTarget:
    """What an agent route's path asks for: one agent or a capability, and the rest."""

    agent_id: str | None
    capability: str | None
    #: The raw path sent to the agent (after the id or capability), starting with "/".
    path: str

    @property
    def destination(self) -> str:
        """The policy input's ``target.destination``: the id, or ``capability:<name>``."""
        return self.agent_id if self.agent_id is not None else f"capability:{self.capability}"


def parse_agent_target(route: RouteConfig, raw_path: str) -> AgentTarget:
    """Split an agent route's raw path; 404 if it names nothing, 400 if it cannot name anything."""
    rest = raw_path.partition("?")[0][len(route.prefix) :]
    head, _, tail = rest.partition("/")
    if head == BY_CAPABILITY:
        capability, _, tail = tail.partition("/")
        if not capability:
            raise NoRoute(f"name a capability: {route.prefix}{BY_CAPABILITY}/{{capability}}/...")
        if _CAPABILITY.fullmatch(capability) is None:
            raise MalformedRequest("not a capability name", reasons=("invalid_capability",))
        return AgentTarget(None, capability, "/" + tail)
    if not head:
        raise NoRoute(f"name an agent: {route.prefix}{{agent_id}}/...")
    if _AGENT_ID.fullmatch(head) is None:
        raise MalformedRequest("not an agent id", reasons=("invalid_agent_id",))
    return AgentTarget(head, None, "/" + tail)


def weighted_choice(candidates: Sequence[AgentEndpoint], rng: random.Random) -> AgentEndpoint:
    """One candidate, with probability proportional to its weight (all weights > 0)."""
    return rng.choices(candidates, weights=[c.weight for c in candidates])[0]


class _Call:
    """One attempt's circuit ticket: judged once, released if never judged."""

    def __init__(self, breaker: CircuitBreaker, ticket: Ticket) -> None:
        self._breaker = breaker
        self._ticket = ticket
        self._open = True

    def succeeded(self) -> None:
        if self._open:
            self._open = False
            self._breaker.success(self._ticket)

    def failed(self) -> None:
        if self._open:
            self._open = False
            self._breaker.failure(self._ticket)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._breaker.release(self._ticket)


class AgentRouter:
    """Forwards one agent route's requests to agents, with retries and failover."""

    def __init__(
        self,
        route: RouteConfig,
        proxy: ReverseProxy,
        directory: AgentDirectory,
        *,
        breakers: CircuitBreakers | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        owned_session: aiohttp.ClientSession | None = None,
    ) -> None:
        if route.agent is None:
            raise ValueError(f"route {route.name} is not an agent route")
        self._route = route
        self._config: AgentRouteConfig = route.agent
        self._proxy = proxy
        self._directory = directory
        self._breakers = breakers or CircuitBreakers(
            failure_threshold=route.agent.circuit_failures,
            open_s=route.agent.circuit_open_s,
            half_open_max=route.agent.circuit_half_open_max,
        )
        self._rng = rng or random.Random()  # noqa: S311 - load spreading and jitter, not secrets
        self._sleep = sleep
        self._owned_session = owned_session

    @classmethod
    def for_route(
        cls, route: RouteConfig, proxy: ReverseProxy, session: aiohttp.ClientSession | None
    ) -> AgentRouter:
        """A router reading the route's registry over ``session`` (or its own session)."""
        if route.agent is None:
            raise ValueError(f"route {route.name} is not an agent route")
        owned = None
        if session is None:
            owned = session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        directory = HttpAgentDirectory(session, route.agent)
        return cls(route, proxy, directory, owned_session=owned)

    @property
    def breakers(self) -> CircuitBreakers:
        return self._breakers

    @property
    def registry_degraded(self) -> bool:
        """True while the registry fails (answers from the cache, or 503)."""
        return self._directory.degraded

    async def close(self) -> None:
        if self._owned_session is not None:
            await self._owned_session.close()

    def backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1, 2, ...): full jitter below a doubling cap."""
        ceiling = min(
            self._config.backoff_max_s, self._config.backoff_base_s * 2.0 ** (attempt - 1)
        )
        return self._rng.uniform(0, ceiling)

    async def forward(self, ctx: RequestContext) -> web.StreamResponse:
        route = self._route
        target = ctx.agent_target or parse_agent_target(route, ctx.request.raw_path)
        if ctx.tenant is None:
            # Config refuses auth = "none" on agent routes; this is the second line.
            raise MissingCredentials("agent routes need a tenant", reasons=("tenant_required",))
        tenant = ctx.tenant.id
        request = ctx.request
        body = ctx.body
        if body is None and request.body_exists:
            body = await request.read()
        idempotent = request.method in IDEMPOTENT_METHODS
        query = request.raw_path.partition("?")[2]
        tried: set[str] = set()
        failure: GatewayError | None = None
        attempts = self._config.retries + 1
        for attempt in range(attempts):
            if attempt:
                await self._sleep(self.backoff(attempt))
            try:
                endpoint, call = await self._choose(tenant, target, tried)
            except AgentUnavailable:
                if failure is not None:
                    raise failure from None
                raise
            tried.add(endpoint.key)
            url = _join(endpoint.url, target.path, query)
            try:
                result = await self._attempt(
                    ctx, endpoint, url, body, call, idempotent, more=attempt + 1 < attempts
                )
            finally:
                call.close()
            if isinstance(result, web.StreamResponse):
                return result
            failure, retryable = result
            if not retryable:
                break
            _log.info(
                "agent attempt failed",
                extra={"agent": endpoint.id, "attempt": attempt + 1, "error": failure.code},
            )
        assert failure is not None  # noqa: S101 - the loop ran and did not return
        raise failure

    async def _choose(
        self, tenant: str, target: AgentTarget, tried: set[str]
    ) -> tuple[AgentEndpoint, _Call]:
        if target.agent_id is not None:
            endpoint = await self._lookup(self._directory.agent(tenant, target.agent_id))
            if endpoint is None:
                raise AgentNotFound(f"no agent {target.agent_id!r}", reasons=("unknown_agent",))
            if endpoint.status != "healthy":
                raise AgentUnavailable(
                    f"agent {target.agent_id!r} is {endpoint.status}",
                    reasons=(f"agent_{endpoint.status}",),
                )
            groups = [[endpoint]]
        else:
            assert target.capability is not None  # noqa: S101 - one of the two is set
            found = await self._lookup(self._directory.healthy(tenant, target.capability))
            live = [e for e in found if e.status == "healthy" and e.weight > 0]
            if not live:
                raise AgentUnavailable(
                    f"no healthy agent offers {target.capability!r}",
                    reasons=("no_healthy_agent",),
                )
            # Fail over: instances not tried yet first, then the others again.
            groups = [[e for e in live if e.key not in tried], [e for e in live if e.key in tried]]
        for group in groups:
            while group:
                endpoint = group[0] if len(group) == 1 else weighted_choice(group, self._rng)
                breaker = self._breakers.get((tenant, endpoint.key), label=endpoint.key)
                ticket = breaker.allow()
                if ticket is not None:
                    return endpoint, _Call(breaker, ticket)
                group.remove(endpoint)
        raise AgentUnavailable(
            "the circuit of every matching agent is open", reasons=("circuit_open",)
        )

    async def _lookup(self, lookup: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await lookup
        except RegistryUnavailable as exc:
            _log.warning("agent registry unavailable", extra={"reason": exc.reason})
            raise DependencyUnavailable(
                "the agent registry is unavailable", reasons=("registry_unavailable",)
            ) from None

    async def _attempt(
        self,
        ctx: RequestContext,
        endpoint: AgentEndpoint,
        url: yarl.URL,
        body: bytes | None,
        call: _Call,
        idempotent: bool,
        *,
        more: bool,
    ) -> web.StreamResponse | tuple[GatewayError, bool]:
        """The response, or (the failure, whether a retry is allowed)."""
        route = self._route
        limits = aiohttp.ClientTimeout(total=route.timeout_s, connect=route.connect_timeout_s)
        slow = f"agent {endpoint.id} did not answer within {route.timeout_s:g} s"
        try:
            upstream = await self._proxy.send(ctx, url, body=body, limits=limits)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            call.failed()
            # Nothing left the gateway: safe to try elsewhere whatever the method.
            return UpstreamUnavailable(f"agent {endpoint.id} is unreachable"), True
        except TimeoutError:
            call.failed()
            return UpstreamTimeout(slow), idempotent
        except aiohttp.ClientError:
            call.failed()
            return UpstreamUnavailable(f"agent {endpoint.id} broke the exchange"), idempotent
        try:
            if upstream.status in _RETRY_STATUSES and idempotent and more:
                call.failed()
                return UpstreamUnavailable(f"agent {endpoint.id} answered {upstream.status}"), True
            try:
                response = await self._proxy.relay(ctx, upstream, route)
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                call.failed()
                return exc, idempotent  # nothing reached the client yet
            if upstream.status in _RETRY_STATUSES:
                call.failed()
            else:
                call.succeeded()
            return response
        finally:
            upstream.release()


def _join(base: yarl.URL, path: str, query: str) -> yarl.URL:
    target = str(base.origin()) + base.raw_path.rstrip("/") + path
    return yarl.URL(target + ("?" + query if query else ""), encoded=True)


def build_agent_routers(
    routes: Sequence[RouteConfig], proxy: ReverseProxy, session: aiohttp.ClientSession | None
) -> dict[str, AgentRouter]:
    """One router per agent route, by route name."""
    return {
        route.name: AgentRouter.for_route(route, proxy, session)
        for route in routes
        if route.kind == "agent"
    }
