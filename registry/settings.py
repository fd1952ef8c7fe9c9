"""The registry's settings: one frozen value object, built by the CLI from flags and env."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Final

from registry.model import DEFAULT_LIMITS, Limits
from registry.status import DEFAULT_STATUS_POLICY, StatusPolicy

__all__ = ["ADMIN_KEY_HEADER", "TENANT_HEADER", "RegistrySettings", "admin_key_digest"]

#: Set by the gateway from the caller's verified identity; callers cannot send it
#: through the gateway (it strips every X-Nops-* header a caller sends).
TENANT_HEADER: Final = "X-Nops-Tenant"
#: The admin key, for operators calling the registry directly (never via the
#: gateway, which strips X-Nops-* from callers).
ADMIN_KEY_HEADER: Final = "X-Nops-Admin-Key"
_TOPIC: Final = re.compile(r"[a-z][a-z0-9._-]{0,63}")
_MIN_ADMIN_KEY: Final = 32


def admin_key_digest(key: str) -> str:
    """The stored form of an admin key (sha256 hex); keys shorter than 32 bytes are refused."""
    if len(key.encode()) < _MIN_ADMIN_KEY:
        raise ValueError(f"the admin key must be at least {_MIN_ADMIN_KEY} bytes")
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    #: postgresql:// DSN of the registry's database.
    dsn: str
    status: StatusPolicy = DEFAULT_STATUS_POLICY
    limits: Limits = DEFAULT_LIMITS
    #: Seconds between sweeps of stored statuses.
    sweep_interval_s: float = 1.0
    sweep_batch: int = 500
    #: Bus topic the agent events go to.
    topic: str = "agents"
    #: Base URL of the bus service; empty: events are logged (LogPublisher).
    bus_url: str = ""
    bus_timeout_s: float = 5.0
    outbox_batch: int = 100
    #: Seconds the relay waits between polls when nothing woke it.
    outbox_idle_s: float = 1.0
    outbox_backoff_base_s: float = 0.5
    outbox_backoff_max_s: float = 30.0
    #: sha256 hex of the admin key; empty: the admin API is off.
    admin_key_sha256: str = field(default="", repr=False)
    max_body_bytes: int = 65_536
    #: Most agents one list page returns.
    max_page: int = 500
    #: Apply pending migrations at start.
    migrate: bool = True
    pool_max_size: int = 10

    def __post_init__(self) -> None:
        if not self.dsn.startswith(("postgres://", "postgresql://")):
            raise ValueError("dsn must be a postgresql:// URL")
        if _TOPIC.fullmatch(self.topic) is None:
            raise ValueError("topic must be 1-64 lower-case letters, digits, '.', '_' or '-'")
        if self.bus_url and not self.bus_url.startswith(("http://", "https://")):
            raise ValueError("bus_url must be an http:// or https:// URL")
        if self.admin_key_sha256 and re.fullmatch(r"[0-9a-f]{64}", self.admin_key_sha256) is None:
            raise ValueError("admin_key_sha256 must be 64 lower-case hex digits")
        for name in ("sweep_interval_s", "bus_timeout_s", "outbox_idle_s", "outbox_backoff_base_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.outbox_backoff_max_s < self.outbox_backoff_base_s:
            raise ValueError("outbox_backoff_max_s must be >= outbox_backoff_base_s")
        for name in ("sweep_batch", "outbox_batch", "max_body_bytes", "max_page", "pool_max_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
