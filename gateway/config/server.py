"""``[server]``: the listener and request limits."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.checks import _require


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
