"""Configuration: one versioned TOML file plus environment overrides.

The file is parsed once, at start-up, into frozen dataclasses. Every problem
is reported as a :class:`ConfigError` naming the dotted key at fault, so
``gateway check-config`` can say exactly what to fix.

Supported field types: str, int, float, bool, Literal[...], ``X | None``
(TOML has no null: absent means the default), ``tuple[X, ...]`` (arrays),
``dict[str, X]`` (tables, frozen as a read-only mapping) and nested frozen
dataclasses (tables and arrays of tables).

Secrets (tenant HMAC keys) are never read here: a key names where its secret
lives (``secret_env``, ``secret_file``, or inline ``secret`` for development)
and :func:`gateway.keyring.build_keyring` reads and checks it at start-up and
in ``check-config``.

Environment overrides use ``NOPS_GATEWAY__<SECTION>__<KEY>`` (double
underscores between levels), for example ``NOPS_GATEWAY__SERVER__PORT=9000``
or ``NOPS_GATEWAY__POLICY__URL=http://opa:8181``. Values are parsed as TOML
scalars when they look like one (``9000``, ``true``, ``1.5``) and taken as
strings otherwise. Array-of-table keys (``routes``) cannot be overridden.

A value that is itself a secret (a DSN or URL with a password) can come from a
file instead, as container secrets are mounted:
``NOPS_GATEWAY_FILE__DEPENDENCIES__POSTGRES_DSN=/run/secrets/postgres_dsn``
sets ``dependencies.postgres_dsn`` to the file's text (one trailing newline
removed), always as a string. Setting both forms of one key is an error.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import limits
import yarl

from egress.addresses import parse_address
from egress.destinations import DestinationError, load_destinations

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "CONFIG_VERSION",
    "DEFAULT_CONFIG",
    "DEFAULT_REQUIRED_COMPONENTS",
    "ENV_PREFIX",
    "FILE_ENV_PREFIX",
    "HMAC_ALGORITHMS",
    "AdminConfig",
    "AdminKeyConfig",
    "AgentRouteConfig",
    "ApiKeyConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "DependenciesConfig",
    "EgressConfig",
    "FreshnessConfig",
    "IdentityConfig",
    "IssuerConfig",
    "KeyConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PolicyCacheConfig",
    "PolicyConfig",
    "PolicyShadowConfig",
    "RateLimitConfig",
    "RateLimitTierConfig",
    "RouteConfig",
    "RouteRateLimitConfig",
    "ServerConfig",
    "SignatureConfig",
    "TenantConfig",
    "TracingConfig",
    "load_config",
    "parse_config",
    "rfc3339_timestamp",
]

CONFIG_VERSION: Final = 1
ENV_PREFIX: Final = "NOPS_GATEWAY__"
#: ``NOPS_GATEWAY_FILE__<SECTION>__<KEY>=<path>``: the value is read from the file.
FILE_ENV_PREFIX: Final = "NOPS_GATEWAY_FILE__"

_ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Tenant ids and keyids end up in replay-cache keys separated by ':' and in
# logs: a small alphabet keeps both unambiguous.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TIER = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# RFC 8941 sf-key: the shape of a signature label.
_SF_KEY = re.compile(r"^[a-z*][a-z0-9_.*-]{0,63}$")
# RFC 9421 derived components a gateway can be asked to require.
_DERIVED: Final = frozenset(
    {"@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path", "@query"}
)
_FIELD_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")

#: Covered by default: content-digest only when the request has a body.
DEFAULT_REQUIRED_COMPONENTS: Final = ("@method", "@target-uri", "content-digest")
_API_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_API_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token

#: JWT algorithms verified with a public key from the issuer's JWKS.
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)
#: JWT algorithms verified with a configured shared secret (never from a JWKS).
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest request body accepted, in bytes; larger ones get 413.
    max_body_bytes: int = 1_048_576
    #: Most request header fields accepted; more is a malformed request.
    max_header_count: int = 100
    #: Seconds in-flight requests get to finish on SIGTERM.
    shutdown_timeout_s: float = 30.0
    #: Addresses of proxies whose X-Forwarded-For is trusted (exact IPs).
    trusted_proxies: tuple[str, ...] = ()
    #: Processes serving the port (SO_REUSEPORT) under a supervisor; > 1 needs Redis.
    workers: int = 1

    def validate(self, key: str) -> None:
        _require(0 < self.port < 65536, f"{key}.port", "must be between 1 and 65535")
        _require(1 <= self.workers <= 64, f"{key}.workers", "must be between 1 and 64")
        _require(self.max_body_bytes >= 0, f"{key}.max_body_bytes", "must be >= 0")
        _require(self.max_header_count > 0, f"{key}.max_header_count", "must be > 0")
        _require(self.shutdown_timeout_s >= 0, f"{key}.shutdown_timeout_s", "must be >= 0")


_DECISION_PATH: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True, slots=True)
class PolicyCacheConfig:
    """The decision cache (gateway/policy/cache.py)."""

    enabled: bool = True
    #: Most decisions held in all, and per tenant (one tenant cannot evict the others).
    max_entries: int = 10_000
    max_entries_per_tenant: int = 1_000
    #: Seconds a cached decision lives, even when the revision does not change.
    ttl_s: float = 60.0
    #: Seconds between checks of OPA's bundle revisions; a change empties the
    #: cache. 0: check before every cached answer.
    revision_check_s: float = 1.0
    #: Dotted input paths left out of the cache key (for example
    #: "source.ip"). Only for fields no policy reads: a policy that reads an
    #: excluded field would be answered from another request's decision.
    key_exclude: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        _require(self.max_entries > 0, f"{key}.max_entries", "must be > 0")
        _require(
            0 < self.max_entries_per_tenant <= self.max_entries,
            f"{key}.max_entries_per_tenant",
            "must be > 0 and <= max_entries",
        )
        _require(self.ttl_s > 0, f"{key}.ttl_s", "must be > 0")
        _require(self.revision_check_s >= 0, f"{key}.revision_check_s", "must be >= 0")
        for index, path in enumerate(self.key_exclude):
            _require(
                re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_-]+)*", path) is not None,
                f"{key}.key_exclude[{index}]",
                "must be a dotted input path such as source.ip",
            )


@dataclass(frozen=True, slots=True)
class PolicyShadowConfig:
    """A candidate policy evaluated beside the enforcing one (gateway/policy/shadow.py)."""

    enabled: bool = False
    #: Data API path of the candidate decision document.
    decision_path: str = "nops/authz_candidate/decision"
    #: OPA server holding the candidate; empty: the enforcing OPA.
    url: str = ""
    #: Fraction of requests also sent to the candidate (0..1).
    sample_rate: float = 1.0
    #: Seconds the candidate may take; a slower answer counts as an error.
    timeout_s: float = 0.5

    def validate(self, key: str) -> None:
        if self.url:
            _require_http_url(self.url, f"{key}.url")
        _require_decision_path(self.decision_path, f"{key}.decision_path")
        _require(0 <= self.sample_rate <= 1, f"{key}.sample_rate", "must be between 0 and 1")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    engine: Literal["opa"] = "opa"
    #: Address of an OPA server. Empty: the gateway starts and supervises a
    #: local ``opa run --server`` loaded from ``bundle_file`` or ``bundle_dir``.
    url: str = ""
    #: The OPA binary used for a supervised local OPA.
    opa_binary: str = ".tools/bin/opa"
    #: Rego and data loaded by a supervised local OPA (watched for changes).
    bundle_dir: str = "policies/rego"
    #: A signed bundle (scripts/build-bundle) for the supervised local OPA,
    #: instead of ``bundle_dir``; watched, so a replaced file takes effect.
    bundle_file: str = ""
    #: Public key (PEM) that verifies ``bundle_file``'s signature; required with it.
    verification_key_file: str = ""
    #: Key id the bundle was signed under (scripts/build-bundle --keyid).
    verification_key_id: str = "nops-bundle"
    signing_alg: Literal["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256"] = "ES256"
    #: Data API path of the decision document.
    decision_path: str = "nops/authz/decision"
    #: Seconds one decision may take before the request fails closed (503).
    timeout_s: float = 0.5
    cache: PolicyCacheConfig = field(default_factory=PolicyCacheConfig)
    shadow: PolicyShadowConfig = field(default_factory=PolicyShadowConfig)

    def validate(self, key: str) -> None:
        if self.url:
            _require_http_url(self.url, f"{key}.url")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _require_decision_path(self.decision_path, f"{key}.decision_path")
        if self.bundle_file:
            # SECURITY: a bundle is only ever loaded with its signature verified.
            _require(
                bool(self.verification_key_file),
                f"{key}.verification_key_file",
                "is required with bundle_file (bundles are loaded only when signed)",
            )
        self.cache.validate(f"{key}.cache")
        self.shadow.validate(f"{key}.shadow")


@dataclass(frozen=True, slots=True)
class DependenciesConfig:
    #: Shared state for a cluster (replay cache, rate limits, bus); empty: none.
    redis_url: str = ""
    #: Registry and audit store for a cluster; empty: none.
    postgres_dsn: str = ""
    #: Seconds a readiness probe waits for one dependency.
    probe_timeout_s: float = 1.0

    def validate(self, key: str) -> None:
        if self.redis_url:
            scheme = yarl.URL(self.redis_url).scheme
            _require(
                scheme in ("redis", "rediss", "unix"),
                f"{key}.redis_url",
                "must be a redis://, rediss:// or unix:// URL",
            )
        if self.postgres_dsn:
            scheme = yarl.URL(self.postgres_dsn).scheme
            _require(
                scheme in ("postgres", "postgresql"),
                f"{key}.postgres_dsn",
                "must be a postgresql:// URL",
            )
        _require(self.probe_timeout_s > 0, f"{key}.probe_timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The hash-chained audit log (docs/audit.md)."""

    enabled: bool = True
    #: "file": a local fsync'd JSONL file (one node); "postgres": a table (a cluster).
    store: Literal["file", "postgres"] = "file"
    #: The JSONL log (file store). Its directory is the audit data directory
    #: for either store: chain id, signing key and public key live there.
    path: str = ".run/audit/audit.jsonl"
    #: PostgreSQL DSN (postgres store); empty: dependencies.postgres_dsn.
    dsn: str = ""
    #: This instance's chain; empty: generated once, kept in <data dir>/chain-id.
    chain_id: str = ""
    #: Where records wait, fsync'd, while the store is down.
    spool_path: str = ".run/audit/spool.jsonl"
    #: A signed checkpoint every this many records ...
    checkpoint_every: int = 1000
    #: ... or this many seconds (when there are new records).
    checkpoint_interval_s: float = 60.0
    #: Ed25519 private key (PEM, mode 0600); empty: generated into the data directory.
    signing_key_file: str = ""
    #: Seconds per summary record of rejections anyone can cause (flood control).
    summary_window_s: float = 10.0
    #: Most records per group commit (one fsync or transaction).
    batch_max: int = 512

    def validate(self, key: str) -> None:
        _require(bool(self.path), f"{key}.path", "must not be empty")
        _require(bool(self.spool_path), f"{key}.spool_path", "must not be empty")
        _require(
            not self.chain_id or _CHAIN_ID.fullmatch(self.chain_id) is not None,
            f"{key}.chain_id",
            "must be letters, digits, '.', '_', ':' or '-' (at most 128)",
        )
        if self.dsn:
            _require(
                yarl.URL(self.dsn).scheme in ("postgres", "postgresql"),
                f"{key}.dsn",
                "must be a postgresql:// URL",
            )
        _require(self.checkpoint_every > 0, f"{key}.checkpoint_every", "must be > 0")
        _require(self.checkpoint_interval_s > 0, f"{key}.checkpoint_interval_s", "must be > 0")
        _require(self.summary_window_s > 0, f"{key}.summary_window_s", "must be > 0")
        _require(0 < self.batch_max <= 10_000, f"{key}.batch_max", "must be between 1 and 10000")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: One canonical JSON line per request.
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus ``/metrics`` on its own listener, apart from the proxied traffic."""

    enabled: bool = False
    #: Keep it on loopback (or a private interface): the admin listener has no auth.
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests).
    port: int = 9090

    def validate(self, key: str) -> None:
        _require(bool(self.host), f"{key}.host", "must not be empty")
        _require(0 <= self.port <= 65535, f"{key}.port", "must be between 0 and 65535")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry traces; ``exporter = "none"`` (the default) costs nothing."""

    exporter: Literal["none", "otlp", "console"] = "none"
    #: OTLP/HTTP traces endpoint; empty means the exporter's default (or OTEL_EXPORTER_*).
    endpoint: str = ""
    #: Fraction of traces kept, decided on the trace id (a client cannot force it).
    sample_ratio: float = 1.0
    service_name: str = "nops-gateway"

    def validate(self, key: str) -> None:
        _require(0.0 <= self.sample_ratio <= 1.0, f"{key}.sample_ratio", "must be between 0 and 1")
        _require(bool(self.service_name), f"{key}.service_name", "must not be empty")
        if self.endpoint:
            _require_http_url(self.endpoint, f"{key}.endpoint")


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


_DATA_CLASSES: Final = ("D0", "D1", "D2", "D3", "D4")


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


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted JWT issuer: its ``iss``, audiences, keys and claim names."""

    #: The exact ``iss`` claim value.
    issuer: str
    #: ``aud`` values accepted from this issuer; a token must name one of them.
    audiences: tuple[str, ...]
    #: Where the issuer publishes its JWK Set (https; http only on loopback).
    jwks_url: str = ""
    #: A local JWK Set file instead of ``jwks_url`` (air-gapped installs).
    jwks_file: str = ""
    #: The allow-list of ``alg`` values; never mixes HS* with asymmetric ones.
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    #: The HS* shared secret: an environment variable, a file, or (dev only) inline.
    hs_secret_env: str = ""
    hs_secret_file: str = ""
    hs_secret: str = field(default="", repr=False)
    tenant_claim: str = "tenant"
    #: A space-separated string or a list of strings.
    scope_claim: str = "scope"
    roles_claim: str = "roles"
    agent_claim: str = "agent_id"
    #: An unknown ``kid`` refreshes the JWK Set at most once per this many seconds.
    jwks_min_refresh_s: float = 30.0
    #: Keys older than this are refreshed in the background (stale ones still serve).
    jwks_max_age_s: float = 600.0
    jwks_timeout_s: float = 5.0
    jwks_max_bytes: int = 65_536

    @property
    def uses_hmac(self) -> bool:
        return any(alg in HMAC_ALGORITHMS for alg in self.algorithms)

    def validate(self, key: str) -> None:
        _require(bool(self.issuer), f"{key}.issuer", "must not be empty")
        _require(bool(self.audiences), f"{key}.audiences", "must name at least one audience")
        for index, audience in enumerate(self.audiences):
            _require(bool(audience), f"{key}.audiences[{index}]", "must not be empty")
        _require(bool(self.algorithms), f"{key}.algorithms", "must name at least one algorithm")
        supported = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS
        for index, alg in enumerate(self.algorithms):
            _require(
                alg in supported,
                f"{key}.algorithms[{index}]",
                f"unsupported algorithm {alg!r}; use one of {', '.join(sorted(supported))}",
            )
        secrets = [n for n in ("hs_secret_env", "hs_secret_file", "hs_secret") if getattr(self, n)]
        sources = [n for n in ("jwks_url", "jwks_file") if getattr(self, n)]
        if self.uses_hmac:
            # SECURITY: one key type per issuer, so no token can make the
            # gateway read a public key as an HMAC secret (RS/HS confusion).
            _require(
                all(alg in HMAC_ALGORITHMS for alg in self.algorithms),
                f"{key}.algorithms",
                "must not mix HS* with asymmetric algorithms",
            )
            _require(
                len(secrets) == 1,
                f"{key}.hs_secret_env",
                "HS* needs exactly one of hs_secret_env, hs_secret_file, hs_secret",
            )
            if sources:
                raise ConfigError(f"{key}.{sources[0]}", "has no use with HS* algorithms")
        else:
            if secrets:
                raise ConfigError(f"{key}.{secrets[0]}", "is only for HS* algorithms")
            _require(
                len(sources) == 1, f"{key}.jwks_url", "needs exactly one of jwks_url, jwks_file"
            )
            if self.jwks_url:
                _require_http_url(self.jwks_url, f"{key}.jwks_url")
                url = yarl.URL(self.jwks_url)
                _require(
                    url.scheme == "https" or url.host in _LOOPBACK_HOSTS,
                    f"{key}.jwks_url",
                    "must be https:// (http:// only on a loopback address)",
                )
        for name in ("tenant_claim", "scope_claim", "roles_claim", "agent_claim"):
            _require(bool(getattr(self, name)), f"{key}.{name}", "must not be empty")
        _require(self.jwks_min_refresh_s > 0, f"{key}.jwks_min_refresh_s", "must be > 0")
        _require(
            self.jwks_max_age_s >= self.jwks_min_refresh_s,
            f"{key}.jwks_max_age_s",
            "must be >= jwks_min_refresh_s",
        )
        _require(self.jwks_timeout_s > 0, f"{key}.jwks_timeout_s", "must be > 0")
        _require(self.jwks_max_bytes > 0, f"{key}.jwks_max_bytes", "must be > 0")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    #: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    leeway_s: float = 30.0
    issuers: tuple[IssuerConfig, ...] = ()

    def validate(self, key: str) -> None:
        _require(0 <= self.leeway_s <= 300, f"{key}.leeway_s", "must be between 0 and 300")
        seen: set[str] = set()
        for index, issuer in enumerate(self.issuers):
            issuer.validate(f"{key}.issuers[{index}]")
            _require(
                issuer.issuer not in seen, f"{key}.issuers[{index}].issuer", "duplicate issuer"
            )
            seen.add(issuer.issuer)


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """A per-agent API key, presented as ``Authorization: ApiKey <id>.<secret>``."""

    id: str
    tenant: str
    #: ``sha256:<hex>`` of the secret part (``python -m gateway.apikeys hash``).
    hash: str
    agent_id: str | None = None
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        _require(
            _API_KEY_ID.fullmatch(self.id) is not None,
            f"{key}.id",
            "must be 1-64 letters, digits, '_' or '-'",
        )
        _require(bool(self.tenant), f"{key}.tenant", "must not be empty")
        _require(
            _API_KEY_HASH.fullmatch(self.hash) is not None,
            f"{key}.hash",
            "must be sha256:<64 lower-case hex digits>",
        )
        for index, scope in enumerate(self.scopes):
            _require(_SCOPE.fullmatch(scope) is not None, f"{key}.scopes[{index}]", "not a scope")


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One HMAC key of a tenant; the secret is named here, read by the keyring.

    Exactly one of ``secret_env`` (an environment variable), ``secret_file``
    (a file path) or ``secret`` (inline, for development only) gives the key
    bytes, always base64 (RFC 4648, standard alphabet) of at least 32 bytes.
    """

    #: Globally unique; the ``keyid`` signature parameter names it.
    keyid: str
    #: The only algorithm this key verifies; the message never chooses it.
    alg: Literal["hmac-sha256"] = "hmac-sha256"
    secret: str = field(default="", repr=False)
    secret_env: str = ""
    secret_file: str = ""
    #: RFC 3339 date-times with an offset; empty: unbounded.
    not_before: str = ""
    not_after: str = ""
    #: The agent this key belongs to; empty: a tenant-wide key. A request
    #: signed with an agent's key is that agent's: its per-agent quota is
    #: taken before identity, and a credential naming another agent is refused.
    agent_id: str = ""

    def validate(self, key: str) -> None:
        _require(
            _IDENTIFIER.fullmatch(self.keyid) is not None,
            f"{key}.keyid",
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
        if self.agent_id:
            _require(
                _IDENTIFIER.fullmatch(self.agent_id) is not None,
                f"{key}.agent_id",
                "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        sources = [n for n in ("secret", "secret_env", "secret_file") if getattr(self, n)]
        _require(
            len(sources) == 1,
            key,
            "exactly one of secret_env, secret_file or secret must be set",
        )
        if self.secret_env:
            _require(
                not self.secret_env.startswith(ENV_PREFIX),
                f"{key}.secret_env",
                f"must not start with {ENV_PREFIX} (reserved for config overrides)",
            )
        begin = _rfc3339(self.not_before, f"{key}.not_before")
        end = _rfc3339(self.not_after, f"{key}.not_after")
        if begin is not None and end is not None:
            _require(begin < end, f"{key}.not_after", "must be later than not_before")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant: who signs, on which tier, with which keys."""

    id: str
    #: Names the rate-limit tier and reaches the policy as input.tenant.tier.
    tier: str = "free"
    #: Overrides signature.grace_s for this tenant's keys.
    grace_s: int | None = None
    keys: tuple[KeyConfig, ...] = ()

    def validate(self, key: str) -> None:
        _require(
            _IDENTIFIER.fullmatch(self.id) is not None,
            f"{key}.id",
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
        _require(
            _TIER.fullmatch(self.tier) is not None,
            f"{key}.tier",
            "must be lower-case letters, digits, '_' or '-', starting with a letter",
        )
        if self.grace_s is not None:
            _require(self.grace_s >= 0, f"{key}.grace_s", "must be >= 0")
        for index, item in enumerate(self.keys):
            item.validate(f"{key}.keys[{index}]")


@dataclass(frozen=True, slots=True)
class SignatureConfig:
    """RFC 9421 verification: what a signature must cover, and key rotation."""

    #: Components every signature must cover. ``content-digest`` is required
    #: only when the request has a body; ``@target-uri`` is also satisfied by
    #: ``@authority`` + ``@path`` + ``@query`` together.
    required_components: tuple[str, ...] = DEFAULT_REQUIRED_COMPONENTS
    #: The signature label to verify. Empty: any label, but the request must
    #: carry exactly one signature.
    label: str = ""
    #: Seconds a key past its not_after still verifies (rotation grace).
    grace_s: int = 0

    def validate(self, key: str) -> None:
        for index, name in enumerate(self.required_components):
            item = f"{key}.required_components[{index}]"
            if name.startswith("@"):
                _require(name in _DERIVED, item, f"must be one of {', '.join(sorted(_DERIVED))}")
            else:
                _require(
                    _FIELD_NAME.fullmatch(name) is not None,
                    item,
                    "must be a lower-case header field name or a derived component",
                )
        _require(
            len(set(self.required_components)) == len(self.required_components),
            f"{key}.required_components",
            "lists a component twice",
        )
        if self.label:
            _require(
                _SF_KEY.fullmatch(self.label) is not None,
                f"{key}.label",
                "must be an RFC 8941 key (lower-case letters, digits, '_-.*')",
            )
        _require(self.grace_s >= 0, f"{key}.grace_s", "must be >= 0")


@dataclass(frozen=True, slots=True)
class FreshnessConfig:
    """``created`` / ``expires`` checks and the replay (nonce) store."""

    #: Seconds a signature's ``created`` may lie in the future (clock skew).
    max_skew_s: int = 300
    #: Seconds a signature stays valid after its ``created``.
    max_age_s: int = 300
    #: ``auto``: Redis when dependencies.redis_url is set, else memory.
    nonce_store: Literal["auto", "memory", "redis"] = "auto"
    #: Most nonces the memory store holds; when full, signed requests fail
    #: closed with 503 until entries expire.
    memory_max_nonces: int = 1_000_000

    @property
    def nonce_ttl_s(self) -> int:
        """How long a claimed nonce is remembered: the whole acceptance window."""
        return self.max_skew_s + self.max_age_s

    def validate(self, key: str) -> None:
        _require(self.max_skew_s >= 0, f"{key}.max_skew_s", "must be >= 0")
        _require(self.max_age_s > 0, f"{key}.max_age_s", "must be > 0")
        _require(self.memory_max_nonces > 0, f"{key}.memory_max_nonces", "must be > 0")


_ADMIN_KEY_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ADMIN_KEY_HASH: Final = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class AdminKeyConfig:
    """One admin API key: ``Authorization: Bearer <id>.<secret>``.

    Only the SHA-256 of the secret is configured (``hash = "sha256:<hex>"``);
    ``python -m gateway.admin.keys --role ROLE`` makes a new id, secret and hash.
    """

    id: str
    role: Literal["SUPER_ADMIN", "ADMIN", "OPERATOR", "VIEWER"]
    hash: str

    def validate(self, key: str) -> None:
        _require(
            _ADMIN_KEY_ID.fullmatch(self.id) is not None,
            f"{key}.id",
            "must be 1-64 letters, digits, '_' or '-' (no '.')",
        )
        _require(
            _ADMIN_KEY_HASH.fullmatch(self.hash) is not None,
            f"{key}.hash",
            'must be "sha256:" and 64 lower-case hex digits',
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin plane under /_admin/ (gateway/admin), guarded by casbin RBAC."""

    enabled: bool = True
    keys: tuple[AdminKeyConfig, ...] = ()
    #: The agent registry's admin API (``GET /_admin/registry/agents``, role
    #: OPERATOR): its base URL and the environment variable holding its admin
    #: key (``X-Nops-Admin-Key``). Empty: registry admin is not offered.
    registry_url: str = ""
    registry_key_env: str = ""

    def validate(self, key: str) -> None:
        if self.registry_url:
            _require_http_url(self.registry_url, f"{key}.registry_url")
            _require(
                bool(self.registry_key_env),
                f"{key}.registry_key_env",
                "is required with registry_url (the variable holding the registry's admin key)",
            )
        ids: set[str] = set()
        for index, admin_key in enumerate(self.keys):
            admin_key.validate(f"{key}.keys[{index}]")
            _require(admin_key.id not in ids, f"{key}.keys[{index}].id", "duplicate key id")
            ids.add(admin_key.id)


@dataclass(frozen=True, slots=True)
class Config:
    version: int = CONFIG_VERSION
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    dependencies: DependenciesConfig = field(default_factory=DependenciesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    signature: SignatureConfig = field(default_factory=SignatureConfig)
    freshness: FreshnessConfig = field(default_factory=FreshnessConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    routes: tuple[RouteConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    api_keys: tuple[ApiKeyConfig, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    egress: EgressConfig = field(default_factory=EgressConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def validate(self) -> None:
        _require(
            self.version == CONFIG_VERSION,
            "version",
            f"unsupported config version {self.version!r}; this gateway reads {CONFIG_VERSION}",
        )
        self.server.validate("server")
        self.policy.validate("policy")
        self.dependencies.validate("dependencies")
        self.audit.validate("audit")
        _require(
            not (self.audit.enabled and self.audit.store == "postgres")
            or bool(self.audit.dsn or self.dependencies.postgres_dsn),
            "audit.dsn",
            "the postgres store needs audit.dsn or dependencies.postgres_dsn",
        )
        self.admin.validate("admin")
        self.metrics.validate("metrics")
        self.tracing.validate("tracing")
        names: set[str] = set()
        prefixes: set[str] = set()
        for index, route in enumerate(self.routes):
            key = f"routes[{index}]"
            route.validate(key)
            _require(route.name not in names, f"{key}.name", f"duplicate route {route.name!r}")
            _require(route.prefix not in prefixes, f"{key}.prefix", "duplicate prefix")
            names.add(route.name)
            prefixes.add(route.prefix)
        self.identity.validate("identity")
        self.egress.validate("egress")
        key_ids: set[str] = set()
        for index, api_key in enumerate(self.api_keys):
            api_key.validate(f"api_keys[{index}]")
            _require(api_key.id not in key_ids, f"api_keys[{index}].id", "duplicate API key id")
            key_ids.add(api_key.id)
        self.signature.validate("signature")
        self.freshness.validate("freshness")
        _require(
            self.freshness.nonce_store != "redis" or bool(self.dependencies.redis_url),
            "freshness.nonce_store",
            "redis needs dependencies.redis_url",
        )
        self.ratelimit.validate("ratelimit")
        for name in self.ratelimit.routes:
            _require(name in names, f"ratelimit.routes.{name}", f"no route is named {name!r}")
        _require(
            self.ratelimit.storage != "redis" or bool(self.dependencies.redis_url),
            "ratelimit.storage",
            "'redis' needs dependencies.redis_url",
        )
        self._validate_tenants()

    def _validate_tenants(self) -> None:
        tenant_ids: set[str] = set()
        keyids: set[str] = set()
        for index, tenant in enumerate(self.tenants):
            key = f"tenants[{index}]"
            tenant.validate(key)
            _require(tenant.id not in tenant_ids, f"{key}.id", f"duplicate tenant {tenant.id!r}")
            tenant_ids.add(tenant.id)
            for number, item in enumerate(tenant.keys):
                _require(
                    item.keyid not in keyids,
                    f"{key}.keys[{number}].keyid",
                    f"duplicate keyid {item.keyid!r} (keyids are global)",
                )
                keyids.add(item.keyid)


DEFAULT_CONFIG: Final = Config()


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or only defaults when None), apply environment overrides."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError("<file>", f"{path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from None
    _apply_env(table, os.environ if environ is None else environ)
    return parse_config(table)


def parse_config(table: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML table."""
    config: Config = _build(Config, table, "")
    config.validate()
    return config


def _apply_env(table: dict[str, Any], environ: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        elif name.startswith(FILE_ENV_PREFIX):
            parts = [p.lower() for p in name[len(FILE_ENV_PREFIX) :].split("__")]
        else:
            continue
        key = ".".join(parts)
        if not all(parts):
            raise ConfigError(key, f"malformed environment override {name}")
        if key in seen:
            raise ConfigError(key, f"set by both {seen[key]} and {name}")
        seen[key] = name
        if name.startswith(FILE_ENV_PREFIX):
            value: Any = _secret_file_value(raw, key, name)
        else:
            value = _env_value(raw)
        node = table
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{name} overrides a value that is not a table")
            node = child
        node[parts[-1]] = value


def _secret_file_value(path: str, key: str, name: str) -> str:
    """The text of the file ``name`` points at: a secret, never echoed in an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(key, f"{name}: cannot read {path}: {reason}") from None
    value = text.removesuffix("\n").removesuffix("\r")
    _require(bool(value), key, f"{name}: {path} is empty")
    return value


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(prefix or "<root>", "must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(_join(prefix, key), "unknown key")
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        key = _join(prefix, name)
        if name in table:
            values[name] = _coerce(hints[name], table[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, key)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(key, "must be an array")
        return tuple(_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, allowed))}")
        return value
    if origin is dict:
        value_type = typing.get_args(hint)[1]
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table")
        return types.MappingProxyType(
            {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
        )
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config type {hint!r} at {key}")
        return _coerce(args[0], value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, "must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {key}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _require_decision_path(value: str, key: str) -> None:
    _require(
        _DECISION_PATH.fullmatch(value) is not None,
        key,
        "must be a slash-separated Rego reference such as nops/authz/decision",
    )


def _require_rate_limit(value: str, key: str) -> None:
    """Empty (no limit) or exactly one ``limits`` rate such as ``100/minute``."""
    if not value:
        return
    try:
        items = limits.parse_many(value)
    except ValueError:
        raise ConfigError(key, f"{value!r} is not a rate limit such as '100/minute'") from None
    _require(len(items) == 1, key, "must be one rate limit such as '100/minute', not several")
    _require(items[0].amount > 0, key, "must allow at least one request per window")


def _rfc3339(value: str, key: str) -> datetime.datetime | None:
    """An RFC 3339 date-time with an offset, or None for an empty value."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(key, "must be an RFC 3339 date-time, e.g. 2026-01-31T00:00:00Z") from None
    _require(parsed.tzinfo is not None, key, "must carry an offset (Z or +hh:mm)")
    return parsed


def rfc3339_timestamp(value: str) -> float | None:
    """Seconds since the epoch for a validated RFC 3339 value (None if empty)."""
    parsed = _rfc3339(value, "<date-time>")
    return parsed.timestamp() if parsed is not None else None


def _require_http_url(value: str, key: str) -> None:
    try:
        url = yarl.URL(value)
    except ValueError:
        raise ConfigError(key, "is not a valid URL") from None
    _require(url.scheme in ("http", "https"), key, "must be an http:// or https:// URL")
    _require(bool(url.host), key, "must name a host")
    _require(not url.user and not url.password, key, "must not carry credentials")
    _require(not url.query_string and not url.fragment, key, "must not carry a query or fragment")
