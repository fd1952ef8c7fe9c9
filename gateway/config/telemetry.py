"""``[logging]``, ``[metrics]`` and ``[tracing]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config.checks import _require, _require_http_url


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
