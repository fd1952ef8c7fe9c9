"""``[[routes]]`` (upstream, agent and egress routes) and ``[egress]``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from egress.addresses import parse_address
from egress.destinations import DestinationError, load_destinations
from gateway.config.checks import _SCOPE, ConfigError, _require, _require_http_url

_ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_DATA_CLASSES: Final = ("D0", "D1", "D2", "D3", "D4")


@dataclass(frozen=True, slots=True)
class AgentRouteConfig:
    """How a ``kind = "agent"`` route finds agents in the registry and calls them."""

    #: Base URL of the registry service (``GET /agents/{id}``, ``GET /agents?capability=``).
    registry_url: str
    #: Seconds a registry answer is reused before asking again.
    cache_ttl_s: float = 2.0
    #: Seconds past the TTL a cached answer still serves while the registry is unreachable.
    stale_if_error_s: float = 30.0
    #: Seconds one registry lookup may take.
    registry_timeout_s: float = 1.0
    #: Further attempts after the first: for idempotent methods on any failure,
    #: for every method when the request never left (connect failure, open circuit).
    retries: int = 2
    #: Jittered exponential backoff between attempts: base, doubling, capped.
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    #: Consecutive failures (connect errors, timeouts, 502/503/504) that open an
    #: endpoint's circuit.
    circuit_failures: int = 5
    #: Seconds an open circuit refuses calls before letting a trial through (half-open).
    circuit_open_s: float = 5.0
    #: Trial calls let through at once while half-open.
    circuit_half_open_max: int = 1

    def validate(self, key: str) -> None:
        _require_http_url(self.registry_url, f"{key}.registry_url")
        _require(self.cache_ttl_s >= 0, f"{key}.cache_ttl_s", "must be >= 0")
        _require(self.stale_if_error_s >= 0, f"{key}.stale_if_error_s", "must be >= 0")
        _require(self.registry_timeout_s > 0, f"{key}.registry_timeout_s", "must be > 0")
        _require(0 <= self.retries <= 10, f"{key}.retries", "must be between 0 and 10")
        _require(self.backoff_base_s > 0, f"{key}.backoff_base_s", "must be > 0")
        _require(
            self.backoff_max_s >= self.backoff_base_s,
            f"{key}.backoff_max_s",
            "must be >= backoff_base_s",
        )
        _require(self.circuit_failures >= 1, f"{key}.circuit_failures", "must be >= 1")
        _require(self.circuit_open_s > 0, f"{key}.circuit_open_s", "must be > 0")
        _require(self.circuit_half_open_max >= 1, f"{key}.circuit_half_open_max", "must be >= 1")


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """Egress routes (``kind = "egress"``): destinations, classes, modes, caps (docs/egress.md)."""

    #: The versioned destinations file (egress/destinations.py); "" = none.
    destinations_file: str = ""
    #: "enforce", or "report" (a class-gate denial is logged and audited as
    #: enforce_would_deny, and the request goes on). A destination's own mode wins.
    mode: Literal["enforce", "report"] = "enforce"
    #: The class of a request without ``X-Data-Class``, unless its tenant has one below.
    default_class: Literal["D0", "D1", "D2", "D3", "D4"] = "D1"
    #: Per tenant id: the class of its requests without ``X-Data-Class``.
    tenant_default_class: dict[str, str] = field(default_factory=dict)
    #: The gateway's own addresses (besides loopback): never dialled, even internal.
    self_addresses: tuple[str, ...] = ()
    #: Largest response body relayed, in bytes; larger is 502 (response_too_large).
    max_response_bytes: int = 10_485_760
    #: Attempts after the first, with the agent routes' rules (gateway/agents.py).
    retries: int = 1
    backoff_s: float = 0.05
    circuit_failures: int = 5
    circuit_open_s: float = 5.0
    circuit_half_open_max: int = 1

    def validate(self, key: str) -> None:
        for tenant, label in self.tenant_default_class.items():
            _require(
                label in _DATA_CLASSES,
                f"{key}.tenant_default_class.{tenant}",
                "must be one of D0..D4",
            )
        for index, text in enumerate(self.self_addresses):
            _require(
                parse_address(text) is not None, f"{key}.self_addresses[{index}]", "not an address"
            )
        _require(self.max_response_bytes > 0, f"{key}.max_response_bytes", "must be > 0")
        _require(self.retries >= 0, f"{key}.retries", "must be >= 0")
        _require(self.backoff_s >= 0, f"{key}.backoff_s", "must be >= 0")
        _require(self.circuit_failures >= 1, f"{key}.circuit_failures", "must be >= 1")
        _require(self.circuit_open_s > 0, f"{key}.circuit_open_s", "must be > 0")
        _require(self.circuit_half_open_max >= 1, f"{key}.circuit_half_open_max", "must be >= 1")
        if self.destinations_file:
            try:
                load_destinations(self.destinations_file)
            except DestinationError as exc:
                raise ConfigError(f"{key}.{exc.key}", exc.message) from None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A path prefix proxied, after the whole pipeline, to one upstream or to agents."""

    name: str
    prefix: str
    #: kind = "upstream": the base URL requests are proxied to.
    upstream: str = ""
    #: "upstream" (one fixed upstream) or "agent" (``/prefix/{agent_id}/...`` and
    #: ``/prefix/by-capability/{capability}/...``, looked up in the registry).
    #: "egress" (``/prefix/{destination}/...`` to a named destination of
    #: ``[egress]``, through the classification gate and the SSRF guard).
    kind: Literal["upstream", "agent", "egress"] = "upstream"
    #: kind = "agent": the registry and the retry and circuit-breaker settings.
    agent: AgentRouteConfig | None = None
    #: Remove ``prefix`` from the path sent upstream.
    strip_prefix: bool = False
    #: Seconds for the whole upstream exchange (headers and body).
    timeout_s: float = 30.0
    connect_timeout_s: float = 3.0
    #: Unsigned requests get 401 missing-signature. When false, unsigned
    #: requests pass as anonymous, but a signature that is present must verify.
    require_signature: bool = True
    #: Credentials the identity stage demands: "none" (anonymous), "jwt"
    #: (a bearer token), "api_key", or "jwt_or_api_key". Secure by default.
    auth: Literal["none", "jwt", "jwt_or_api_key", "api_key"] = "jwt"
    #: Scopes the credential must all carry (403 insufficient-scope otherwise).
    scopes: tuple[str, ...] = ()
    #: Pass the caller's Authorization header upstream. Off: a credential the
    #: gateway verified is removed, and the upstream gets X-Nops-* identity.
    forward_authorization: bool = False
    #: kind = "upstream": consecutive failures (connect errors, timeouts,
    #: 502/503/504) that open the route's circuit; while open, requests are
    #: refused without a call (503 circuit-open) for ``circuit_open_s``, then
    #: ``circuit_half_open_max`` trials decide. Agent routes set theirs under
    #: ``agent``, egress under ``[egress]``.
    circuit_failures: int = 5
    circuit_open_s: float = 5.0
    circuit_half_open_max: int = 1

    def validate(self, key: str) -> None:
        _require(
            _ROUTE_NAME.fullmatch(self.name) is not None,
            f"{key}.name",
            "must be lower-case letters, digits, '_', '-' or '.', starting with a letter",
        )
        _require(
            self.prefix.startswith("/") and self.prefix.endswith("/"),
            f"{key}.prefix",
            "must start and end with '/'",
        )
        if self.kind == "agent":
            _require(not self.upstream, f"{key}.upstream", "an agent route has no fixed upstream")
            if self.agent is None:
                raise ConfigError(f"{key}.agent", 'kind = "agent" needs an agent table')
            self.agent.validate(f"{key}.agent")
            # SECURITY: agents are looked up per tenant; an anonymous caller has none.
            _require(self.auth != "none", f"{key}.auth", 'an agent route cannot be auth = "none"')
            _require(
                not self.strip_prefix,
                f"{key}.strip_prefix",
                "agent routes always send the path after the agent id",
            )
        elif self.kind == "egress":
            # SECURITY: the destination's URL comes from [egress], never from here or the caller.
            _require(not self.upstream, f"{key}.upstream", "an egress route has no fixed upstream")
            _require(self.agent is None, f"{key}.agent", 'is only for kind = "agent" routes')
            _require(self.auth != "none", f"{key}.auth", 'an egress route cannot be auth = "none"')
            _require(not self.strip_prefix, f"{key}.strip_prefix", "egress routes always strip")
            _require(
                not self.forward_authorization,
                f"{key}.forward_authorization",
                "the caller's credential never leaves through egress",
            )
        else:
            _require_http_url(self.upstream, f"{key}.upstream")
            _require(self.agent is None, f"{key}.agent", 'is only for kind = "agent" routes')
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _require(self.connect_timeout_s > 0, f"{key}.connect_timeout_s", "must be > 0")
        _require(self.circuit_failures >= 1, f"{key}.circuit_failures", "must be >= 1")
        _require(self.circuit_open_s > 0, f"{key}.circuit_open_s", "must be > 0")
        _require(self.circuit_half_open_max >= 1, f"{key}.circuit_half_open_max", "must be >= 1")
        for index, scope in enumerate(self.scopes):
            _require(_SCOPE.fullmatch(scope) is not None, f"{key}.scopes[{index}]", "not a scope")
        _require(
            not self.scopes or self.auth != "none",
            f"{key}.scopes",
            'an anonymous route (auth = "none") cannot require scopes',
        )
