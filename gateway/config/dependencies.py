"""``[dependencies]``: the Redis and PostgreSQL a cluster shares."""

from __future__ import annotations

from dataclasses import dataclass

import yarl

from gateway.config.checks import _require


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
