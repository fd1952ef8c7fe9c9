"""Configuration: one versioned TOML file plus environment overrides.

The file is parsed once, at start-up, into frozen dataclasses. Every problem
is reported as a :class:`ConfigError` naming the dotted key at fault, so
``gateway check-config`` can say exactly what to fix.

Supported field types: str, int, float, bool, Literal[...], ``X | None``
(TOML has no null: absent means the default), ``tuple[X, ...]`` (arrays),
``dict[str, X]`` (tables, frozen as a read-only mapping) and nested frozen
dataclasses (tables and arrays of tables).

Environment overrides use ``NOPS_GATEWAY__<SECTION>__<KEY>`` (double
underscores between levels), for example ``NOPS_GATEWAY__SERVER__PORT=9000``
or ``NOPS_GATEWAY__POLICY__URL=http://opa:8181``. Values are parsed as TOML
scalars when they look like one (``9000``, ``true``, ``1.5``) and taken as
strings otherwise. Array-of-table keys (``routes``) cannot be overridden.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yarl

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "AuditConfig",
    "Config",
    "ConfigError",
    "DependenciesConfig",
    "LoggingConfig",
    "PolicyConfig",
    "RouteConfig",
    "ServerConfig",
    "load_config",
    "parse_config",
]

CONFIG_VERSION: Final = 1
ENV_PREFIX: Final = "NOPS_GATEWAY__"

_ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


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

    def validate(self, key: str) -> None:
        _require(0 < self.port < 65536, f"{key}.port", "must be between 1 and 65535")
        _require(self.max_body_bytes >= 0, f"{key}.max_body_bytes", "must be >= 0")
        _require(self.max_header_count > 0, f"{key}.max_header_count", "must be > 0")
        _require(self.shutdown_timeout_s >= 0, f"{key}.shutdown_timeout_s", "must be >= 0")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    engine: Literal["opa"] = "opa"
    #: Address of an OPA server. Empty: the gateway starts and supervises a
    #: local ``opa run --server`` loaded from ``bundle_dir``.
    url: str = ""
    #: The OPA binary used for a supervised local OPA.
    opa_binary: str = ".tools/bin/opa"
    #: Rego and data loaded by a supervised local OPA (watched for changes).
    bundle_dir: str = "policies/rego"
    #: Data API path of the decision document.
    decision_path: str = "nops/authz/decision"
    #: Seconds one decision may take before the request fails closed (503).
    timeout_s: float = 0.5

    def validate(self, key: str) -> None:
        if self.url:
            _require_http_url(self.url, f"{key}.url")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _require(
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*", self.decision_path)
            is not None,
            f"{key}.decision_path",
            "must be a slash-separated Rego reference such as nops/authz/decision",
        )


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
class RouteConfig:
    """A path prefix proxied to one upstream, after the whole pipeline."""

    name: str
    prefix: str
    upstream: str
    #: Remove ``prefix`` from the path sent upstream.
    strip_prefix: bool = False
    #: Seconds for the whole upstream exchange (headers and body).
    timeout_s: float = 30.0
    connect_timeout_s: float = 3.0

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
        _require_http_url(self.upstream, f"{key}.upstream")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _require(self.connect_timeout_s > 0, f"{key}.connect_timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class Config:
    version: int = CONFIG_VERSION
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    dependencies: DependenciesConfig = field(default_factory=DependenciesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    routes: tuple[RouteConfig, ...] = ()

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
        names: set[str] = set()
        prefixes: set[str] = set()
        for index, route in enumerate(self.routes):
            key = f"routes[{index}]"
            route.validate(key)
            _require(route.name not in names, f"{key}.name", f"duplicate route {route.name!r}")
            _require(route.prefix not in prefixes, f"{key}.prefix", "duplicate prefix")
            names.add(route.name)
            prefixes.add(route.prefix)


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
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        key = ".".join(parts)
        if not all(parts):
            raise ConfigError(key, f"malformed environment override {name}")
        node = table
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{name} overrides a value that is not a table")
            node = child
        node[parts[-1]] = _env_value(raw)


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


def _require_http_url(value: str, key: str) -> None:
    try:
        url = yarl.URL(value)
    except ValueError:
        raise ConfigError(key, "is not a valid URL") from None
    _require(url.scheme in ("http", "https"), key, "must be an http:// or https:// URL")
    _require(bool(url.host), key, "must name a host")
    _require(not url.user and not url.password, key, "must not carry credentials")
    _require(not url.query_string and not url.fragment, key, "must not carry a query or fragment")
