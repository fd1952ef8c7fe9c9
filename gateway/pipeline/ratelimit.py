"""The ``ratelimit`` stage: per tenant, then per agent, then per route; per IP when anonymous.

A request an earlier stage attributed to a tenant (``ctx.tenant``) takes, in
order, from its tenant's quota, its agent's quota (when ``ctx.subject.agent_id``
is set) and its (tenant, route) quota, with the limits of the tenant's tier
(``[ratelimit.tiers.<tier>]``; an unknown or missing tier is the
``default_tier``) and ``[ratelimit.routes.<route>]`` overrides. Anything else
is anonymous and takes from the per-IP ``anonymous`` quota. The first quota
with nothing left refuses the request with 429 ``rate-limited``, a reason
naming it and ``Retry-After``; a refused request consumes no quota (see
:mod:`gateway.ratelimits`). When the freshness stage already took the
quotas in its one Redis call with the nonce claim (``ctx.quotas_taken``),
this stage only applies that result.

Every response to a request that got this far carries the IETF RateLimit
header fields (draft-ietf-httpapi-ratelimit-headers-11 syntax, Structured
Field lists of String items), one item per quota taken, e.g.::

    RateLimit-Policy: "tenant";q=1000;w=60, "agent";q=100;w=1
    RateLimit: "tenant";r=998;t=41, "agent";r=99;t=1

On a 429, ``Retry-After`` equals the refusing quota's ``t`` (the draft asks
that it not be earlier than the end of that window).
"""

from __future__ import annotations

import functools
import ipaddress
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import limits
from aiohttp import web
from redis.asyncio import Redis

from gateway.config import RateLimitConfig
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.ratelimits import Quota, QuotaLimiter, QuotaState

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["REASONS", "Ratelimit", "build"]

#: Policy name (in the header fields) -> denial reason.
REASONS: Final = {
    "tenant": "tenant_limit",
    "agent": "agent_limit",
    "route": "route_limit",
    "anonymous": "anonymous_limit",
}
# SECURITY: one IPv6 host usually owns a whole /64; limiting per address would
# let it rotate addresses past the anonymous limit.
_IPV6_PREFIX: Final = 64


@dataclass(frozen=True, slots=True)
class _Tier:
    tenant: limits.RateLimitItem | None
    agent: limits.RateLimitItem | None
    route: limits.RateLimitItem | None


class Ratelimit:
    name = "ratelimit"

    def __init__(self, config: RateLimitConfig, limiter: QuotaLimiter) -> None:
        self.enabled = config.enabled
        self.limiter = limiter
        self._anonymous = _item("anonymous", config.anonymous)
        self._tiers = {
            name: _Tier(
                _item("tenant", tier.tenant),
                _item("agent", tier.agent),
                _item("route", tier.route),
            )
            for name, tier in config.tiers.items()
        }
        self._default_tier = self._tiers[config.default_tier]
        self._routes = {name: _item("route", r.limit) for name, r in config.routes.items()}

    @classmethod
    def create(cls, config: RateLimitConfig, *, redis: Redis | None, metrics: Metrics) -> Ratelimit:
        return cls(config, QuotaLimiter.for_config(config, redis=redis, metrics=metrics))

    @property
    def degraded(self) -> bool:
        """True while limits are per node because the shared storage failed."""
        return self.limiter.degraded

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        if not self.enabled:
            return None
        result = ctx.quotas_taken
        if result is None:
            result = await self.limiter.take(self.quotas(ctx))
        else:
            self.limiter.shared_answered()
        if result.states:
            ctx.response_headers.update(_header_fields(result.states))
        if result.refused is not None:
            retry_after = result.states[-1].reset
            raise RateLimited(
                f"{result.refused.policy} rate limit exceeded; retry in {retry_after} s",
                reasons=[REASONS[result.refused.policy]],
                extra={"retry_after": retry_after},
                headers={"Retry-After": str(retry_after)},
            )
        return None

    def quotas(self, ctx: RequestContext) -> Sequence[Quota]:
        """The quotas ``ctx`` takes from, in order."""
        if ctx.tenant is None:
            if self._anonymous is None:
                return ()
            return (Quota("anonymous", self._anonymous, (_address_key(ctx.client_ip),)),)
        tenant = _key(ctx.tenant.id)
        tier = self._tiers.get(ctx.tenant.tier or "", self._default_tier)
        quotas = []
        if tier.tenant is not None:
            quotas.append(Quota("tenant", tier.tenant, (tenant,)))
        agent = ctx.subject.agent_id
        if tier.agent is not None and agent:
            quotas.append(Quota("agent", tier.agent, (tenant, _key(agent))))
        if ctx.route is not None:
            route = self._routes.get(ctx.route.name, tier.route)
            if route is not None:
                quotas.append(Quota("route", route, (tenant, _key(ctx.route.name))))
        return quotas


def build(deps: PipelineDeps) -> Ratelimit:
    return Ratelimit.create(deps.config.ratelimit, redis=deps.redis, metrics=deps.metrics)


def _item(policy: str, limit: str) -> limits.RateLimitItem | None:
    """The parsed limit (validated with the config), namespaced by policy in storage keys."""
    if not limit:
        return None
    parsed = limits.parse(limit)
    return type(parsed)(parsed.amount, parsed.multiples, namespace=policy)


@functools.lru_cache(maxsize=4096)
def _key(value: str) -> str:
    # Storage keys join identifiers with "/": escape so that no two
    # (tenant, agent) pairs can spell the same key.
    return urllib.parse.quote(value, safe="")


@functools.lru_cache(maxsize=4096)
def _address_key(client_ip: str) -> str:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return _key(client_ip)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return _key(str(ipaddress.IPv6Network((address, _IPV6_PREFIX), strict=False)))
    return str(address)


def _header_fields(states: Sequence[QuotaState]) -> Mapping[str, str]:
    return {
        "RateLimit-Policy": ", ".join(f'"{s.policy}";q={s.limit};w={s.window}' for s in states),
        "RateLimit": ", ".join(f'"{s.policy}";r={s.remaining};t={s.reset}' for s in states),
    }
