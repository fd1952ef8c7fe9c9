"""Agents in PostgreSQL (asyncpg), always scoped to one tenant.

Every query of :class:`AgentStore` takes the tenant as its first bound
parameter and filters on it: there is no method that reads or writes
another tenant's agent, only :meth:`AgentStore.list_all` for the admin
API. Each change and its outbox event are one transaction. Status is
derived at read time from ``heartbeat_at`` and the injected clock.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

from registry import outbox
from registry.db import Conn
from registry.errors import AgentExists, InvalidCursor
from registry.model import AGENT_ID, Agent, AgentSpec, Status, utc, validate_tenant
from registry.status import DEFAULT_STATUS_POLICY, StatusPolicy

__all__ = ["AgentPage", "AgentStore", "decode_cursor", "encode_cursor"]

# Columns a PATCH may set; the SET clause is built only from these names.
_MUTABLE_COLUMNS: Final = ("name", "version", "capabilities", "endpoint_url", "labels", "weight")
# $1 and $2 are always the stale and zombie thresholds in reads.
_COLUMNS: Final = (
    "tenant, id, name, version, capabilities, endpoint_url, heartbeat_at, labels, weight,"
    f" created_at, updated_at, {StatusPolicy.sql(1, 2)} AS status"
)


@dataclass(frozen=True, slots=True)
class AgentPage:
    agents: list[Agent]
    #: Opaque; pass back as ``cursor`` for the next page. None on the last page.
    next_cursor: str | None


def encode_cursor(tenant: str, agent_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([tenant, agent_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """(tenant, id) after which the next page starts; :class:`InvalidCursor` if garbled."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidCursor("the cursor is not one this registry issued", field="cursor") from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(part, str) for part in value)
        or AGENT_ID.fullmatch(value[1]) is None
    ):
        raise InvalidCursor("the cursor is not one this registry issued", field="cursor")
    validate_tenant(value[0])
    return value[0], value[1]


def _agent(row: asyncpg.Record) -> Agent:
    return Agent(
        tenant=row["tenant"],
        id=row["id"],
        name=row["name"],
        version=row["version"],
        capabilities=tuple(row["capabilities"]),
        endpoint_url=row["endpoint_url"],
        status=row["status"],
        heartbeat_at=row["heartbeat_at"],
        labels=row["labels"],
        weight=row["weight"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class AgentStore:
    """Create, read, list, update, delete and heartbeat agents of one tenant at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        policy: StatusPolicy = DEFAULT_STATUS_POLICY,
        clock: Callable[[], float] = time.time,
        topic: str = "agents",
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._clock = clock
        self._topic = topic
        self._on_event = on_event or (lambda: None)

    @property
    def policy(self) -> StatusPolicy:
        return self._policy

    async def register(self, tenant: str, spec: AgentSpec) -> Agent:
        """Insert a new agent (healthy, heartbeat now); :class:`AgentExists` if the id is taken."""
        now = self._clock()
        agent = await self._change(
            "agent.registered",
            "INSERT INTO registry.agents (tenant, id, name, version, capabilities,"
            " endpoint_url, status, heartbeat_at, labels, weight, created_at, updated_at)"
            " VALUES ($3, $4, $5, $6, $7, $8, 'healthy', $9, $10, $11, $9, $9)"
            f" ON CONFLICT (tenant, id) DO NOTHING RETURNING {_COLUMNS}",
            now,
            tenant,
            spec.id,
            spec.name or spec.id,
            spec.version,
            list(spec.capabilities),
            spec.endpoint_url,
            utc(now),
            dict(spec.labels),
            spec.weight,
        )
        if agent is None:
            raise AgentExists(f"agent {spec.id!r} is already registered", field="id")
        return agent

    async def get(self, tenant: str, agent_id: str) -> Agent | None:
        now = self._clock()
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM registry.agents WHERE tenant = $3 AND id = $4",
                *self._policy.thresholds(now),
                tenant,
                agent_id,
            )
        return _agent(row) if row is not None else None

    async def list_agents(
        self,
        tenant: str,
        *,
        capability: str | None = None,
        status: Status | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> AgentPage:
        """One page of the tenant's agents, by id."""
        after = ""
        if cursor is not None:
            cursor_tenant, after = decode_cursor(cursor)
            if cursor_tenant != tenant:
                raise InvalidCursor("the cursor belongs to another listing", field="cursor")
        return await self._page(
            "tenant = $3 AND id > $4", [tenant, after], capability, status, limit, "id"
        )

    async def list_all(
        self,
        *,
        tenant: str | None = None,
        capability: str | None = None,
        status: Status | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> AgentPage:
        """Admin only: agents of every tenant (or one), by (tenant, id)."""
        after = decode_cursor(cursor) if cursor is not None else ("", "")
        where = "(tenant, id) > ($3, $4)"
        args: list[Any] = [after[0], after[1]]
        if tenant is not None:
            where += " AND tenant = $5"
            args.append(tenant)
        return await self._page(where, args, capability, status, limit, "tenant, id")

    async def _page(
        self,
        where: str,
        args: list[Any],
        capability: str | None,
        status: Status | None,
        limit: int,
        order: str,
    ) -> AgentPage:
        now = self._clock()
        args = [*self._policy.thresholds(now), *args]
        if capability is not None:
            args.append(capability)
            where += f" AND capabilities @> ARRAY[${len(args)}]::text[]"
        if status is not None:
            args.append(status)
            where += f" AND {StatusPolicy.sql(1, 2)} = ${len(args)}"
        args.append(limit + 1)
        query = (
            f"SELECT {_COLUMNS} FROM registry.agents WHERE {where}"
            f" ORDER BY {order} LIMIT ${len(args)}"
        )
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(query, *args)
        agents = [_agent(row) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(agents[-1].tenant, agents[-1].id) if more else None
        return AgentPage(agents, next_cursor)

    async def update(self, tenant: str, agent_id: str, changes: Mapping[str, Any]) -> Agent | None:
        """Set the given mutable fields; None if there is no such agent."""
        columns = [name for name in _MUTABLE_COLUMNS if name in changes]
        if not columns:
            raise ValueError("nothing to update")
        now = self._clock()
        values = [
            list(changes[c])
            if c == "capabilities"
            else dict(changes[c])
            if c == "labels"
            else changes[c]
            for c in columns
        ]
        assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(columns, 6))
        return await self._change(
            "agent.updated",
            f"UPDATE registry.agents SET {assignments}, updated_at = $5"
            f" WHERE tenant = $3 AND id = $4 RETURNING {_COLUMNS}",
            now,
            tenant,
            agent_id,
            utc(now),
            *values,
        )

    async def heartbeat(self, tenant: str, agent_id: str) -> Agent | None:
        """Record a heartbeat now: the agent is healthy again. None if unknown."""
        now = self._clock()
        return await self._change(
            "agent.heartbeat",
            "UPDATE registry.agents SET heartbeat_at = $5, status = 'healthy'"
            f" WHERE tenant = $3 AND id = $4 RETURNING {_COLUMNS}",
            now,
            tenant,
            agent_id,
            utc(now),
        )

    async def deregister(self, tenant: str, agent_id: str) -> Agent | None:
        """Delete the agent; the record as it was, or None if unknown."""
        return await self._change(
            "agent.deregistered",
            f"DELETE FROM registry.agents WHERE tenant = $3 AND id = $4 RETURNING {_COLUMNS}",
            self._clock(),
            tenant,
            agent_id,
        )

    async def _change(
        self, event_type: str, statement: str, now: float, tenant: str, agent_id: str, *values: Any
    ) -> Agent | None:
        """Run ``statement`` on one agent and enqueue its outbox event, in one transaction.

        The statement binds the stale and zombie thresholds as $1 and $2, the tenant
        as $3, the agent id as $4 and ``values`` from $5, and returns ``_COLUMNS``.
        None (and no event) if it returns no row.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                statement, *self._policy.thresholds(now), tenant, agent_id, *values
            )
            if row is None:
                return None
            agent = _agent(row)
            await self._event(conn, event_type, agent, now)
        self._on_event()
        return agent

    async def _event(self, conn: Conn, event_type: str, agent: Agent, now: float) -> None:
        await outbox.enqueue(
            conn, outbox.agent_event(event_type, agent, now), topic=self._topic, now=now
        )
