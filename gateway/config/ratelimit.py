"""``[ratelimit]``: tiers, per-route limits, storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.config.checks import _require, _require_rate_limit


@dataclass(frozen=True, slots=True)
class RateLimitTierConfig:
    """Limits for the tenants of one tier; an empty string means no limit at that level."""

    #: Per tenant, across all its agents and routes.
    tenant: str = "1000/minute"
    #: Per agent of a tenant, when an earlier stage named the agent.
    agent: str = "100/second"
    #: Per tenant and route, for every route without its own ``[ratelimit.routes.<route>]``.
    route: str = ""

    def validate(self, key: str) -> None:
        for name in ("tenant", "agent", "route"):
            _require_rate_limit(getattr(self, name), f"{key}.{name}")


@dataclass(frozen=True, slots=True)
class RouteRateLimitConfig:
    #: Per tenant on this route, whatever the tenant's tier.
    limit: str

    def validate(self, key: str) -> None:
        _require(bool(self.limit), f"{key}.limit", "must not be empty")
        _require_rate_limit(self.limit, f"{key}.limit")


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """The ``ratelimit`` stage; each limit is a ``limits`` string such as ``"100/minute"``."""

    enabled: bool = True
    strategy: Literal["sliding-window-counter", "moving-window", "fixed-window"] = (
        "sliding-window-counter"
    )
    #: ``auto``: Redis (shared by every node) when ``dependencies.redis_url`` is set, else memory.
    storage: Literal["auto", "memory", "redis"] = "auto"
    #: Per client IP (IPv6 per /64) for requests no earlier stage attributed to a tenant.
    anonymous: str = "100/minute"
    #: The tier of tenants that name none, or a tier not defined here.
    default_tier: str = "free"
    tiers: dict[str, RateLimitTierConfig] = field(
        default_factory=lambda: {"free": RateLimitTierConfig()}
    )
    #: Per-route overrides of the tier's ``route`` limit, keyed by route name.
    routes: dict[str, RouteRateLimitConfig] = field(default_factory=dict)
    #: Seconds between attempts to go back to Redis after it failed (memory meanwhile).
    fallback_retry_s: float = 5.0

    def validate(self, key: str) -> None:
        _require_rate_limit(self.anonymous, f"{key}.anonymous")
        for name, tier in self.tiers.items():
            tier.validate(f"{key}.tiers.{name}")
        _require(
            self.default_tier in self.tiers,
            f"{key}.default_tier",
            f"tier {self.default_tier!r} is not defined under [{key}.tiers]",
        )
        for name, route in self.routes.items():
            route.validate(f"{key}.routes.{name}")
        _require(self.fallback_retry_s > 0, f"{key}.fallback_retry_s", "must be > 0")
