"""The root table, :class:`Config`: every section, and the checks across them.

Section classes are imported at run time, not only for type checking: the
loader resolves these annotations with :func:`typing.get_type_hints`, which
reads this module's globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from gateway.config.admin import AdminConfig
from gateway.config.audit import AuditConfig
from gateway.config.checks import _require
from gateway.config.dependencies import DependenciesConfig
from gateway.config.identity import (
    ApiKeyConfig,
    FreshnessConfig,
    IdentityConfig,
    SignatureConfig,
    TenantConfig,
)
from gateway.config.policy import PolicyConfig
from gateway.config.ratelimit import RateLimitConfig
from gateway.config.routes import EgressConfig, RouteConfig
from gateway.config.server import ServerConfig
from gateway.config.telemetry import LoggingConfig, MetricsConfig, TracingConfig

CONFIG_VERSION: Final = 1


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
