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

The package holds one module per group of sections (``server``,
``dependencies``, ``policy``, ``audit``, ``telemetry``, ``ratelimit``,
``routes``, ``identity``, ``admin``), the root :class:`Config` (``root``),
the shared checks (``checks``) and the loader (``loader``). Import from
``gateway.config``: the names in ``__all__`` are its public API.
"""

from __future__ import annotations

from gateway.config.admin import AdminConfig, AdminKeyConfig
from gateway.config.audit import AuditConfig
from gateway.config.checks import ENV_PREFIX, FILE_ENV_PREFIX, ConfigError, rfc3339_timestamp
from gateway.config.dependencies import DependenciesConfig
from gateway.config.identity import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_REQUIRED_COMPONENTS,
    HMAC_ALGORITHMS,
    ApiKeyConfig,
    FreshnessConfig,
    IdentityConfig,
    IssuerConfig,
    KeyConfig,
    SignatureConfig,
    TenantConfig,
)
from gateway.config.loader import load_config, parse_config
from gateway.config.policy import PolicyCacheConfig, PolicyConfig, PolicyShadowConfig
from gateway.config.ratelimit import RateLimitConfig, RateLimitTierConfig, RouteRateLimitConfig
from gateway.config.root import CONFIG_VERSION, DEFAULT_CONFIG, Config
from gateway.config.routes import AgentRouteConfig, EgressConfig, RouteConfig
from gateway.config.server import ServerConfig
from gateway.config.telemetry import LoggingConfig, MetricsConfig, TracingConfig

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
