"""Registry events through a transactional outbox, drained to the bus.

Every change writes its event (``agent.registered``, ``agent.updated``,
``agent.heartbeat``, ``agent.deregistered``) into ``registry.outbox`` in the
same transaction as the change itself, so an event exists if and only if the
change committed. The :class:`OutboxRelay` drains the outbox in ``seq``
order to an :class:`EventPublisher` and deletes what was delivered. When the
bus is down, events stay in the outbox and the head is retried with jittered
exponential backoff; nothing is lost, and nothing overtakes an older event.
Delivery is at least once: the event id is the bus's ``Idempotency-Key``, so
a redelivery after a crash is a no-op there. An event the bus refuses for
good (a 400/413/415/422) is marked ``failed_at`` and kept for an operator,
so one bad event cannot block the rest.

One relay drains at a time across replicas (a transaction-level advisory
lock per batch); the others find the lock taken and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final, Protocol

import aiohttp
import asyncpg
import orjson

from registry.db import STORE_ERRORS, Conn
from registry.loop import BackgroundLoop
from registry.model import Agent, utc

__all__ = [
    "EVENT_TYPES",
    "EventPublisher",
    "HttpBusPublisher",
    "LogPublisher",
    "OutboxRelay",
    "PublishError",
    "agent_event",
    "bus_draft",
    "enqueue",
]

_log = logging.getLogger("registry.outbox")

EVENT_TYPES: Final = frozenset(
    {"agent.registered", "agent.updated", "agent.heartbeat", "agent.deregistered"}
)
_LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"nops.registry.outbox").digest()[:8], "big", signed=True
)
# Bus answers that no retry can fix: the event itself is refused.
_PERMANENT: Final = frozenset({400, 413, 415, 422})


class PublishError(Exception):
    """The event was not delivered; ``permanent`` if retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class EventPublisher(Protocol):
    """Delivers one event to a topic, or raises :class:`PublishError`."""

    async def publish(self, tenant: str, topic: str, event: Mapping[str, Any]) -> None: ...


class LogPublisher:
    """The default without a bus: one log line per event (type, id, tenant, agent)."""

    async def publish(self, tenant: str, topic: str, event: Mapping[str, Any]) -> None:
        _log.info(
            "event",
            extra={
                "topic": topic,
                "tenant": tenant,
                "event_type": event.get("type"),
                "event_id": event.get("id"),
                "agent": event.get("subject"),
            },
        )


class HttpBusPublisher:
    """``POST {bus_url}/topics/{topic}/messages`` on the bus service (issue #7).

    The event id is the ``Idempotency-Key``; the tenant goes in
    ``X-Nops-Tenant``, as the gateway would set it. 2xx is delivered; 409
    (the key was seen already) counts as delivered too.
    """

    def __init__(self, session: aiohttp.ClientSession, bus_url: str, *, timeout_s: float = 5.0):
        self._session = session
        self._base = bus_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def publish(self, tenant: str, topic: str, event: Mapping[str, Any]) -> None:
        url = f"{self._base}/topics/{topic}/messages"
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": str(event["id"]),
            "X-Nops-Tenant": tenant,
        }
        try:
            async with self._session.post(
                url, data=orjson.dumps(bus_draft(event)), headers=headers, timeout=self._timeout
            ) as response:
                if 200 <= response.status < 300 or response.status == 409:
                    return
                raise PublishError(
                    f"bus answered {response.status}", permanent=response.status in _PERMANENT
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PublishError(f"bus unreachable: {type(exc).__name__}") from None


#: Event fields that map onto the bus envelope itself; the rest is its payload.
_ENVELOPE_FIELDS = ("id", "type", "time")


def bus_draft(event: Mapping[str, Any]) -> dict[str, Any]:
    """The bus envelope draft (``bus/schemas/envelope.v1.json``) carrying ``event``.

    ``id``, ``type`` and ``time`` become the envelope's own; ``source``,
    ``subject`` and ``data`` travel as its payload. The tenant is not sent in
    the body: the bus takes it from the caller (``X-Nops-Tenant``).
    """
    draft: dict[str, Any] = {"version": 1, **{k: event[k] for k in _ENVELOPE_FIELDS if k in event}}
    draft["payload"] = {
        k: v for k, v in event.items() if k not in _ENVELOPE_FIELDS and k != "tenant"
    }
    return draft


def agent_event(event_type: str, agent: Agent, now: float) -> dict[str, Any]:
    """The event body for a change to ``agent`` (the agent as it is after it)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    data = agent.to_json()
    return {
        "id": str(uuid.uuid4()),
        "type": event_type,
        "source": "nops-registry",
        "time": utc(now).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "tenant": agent.tenant,
        "subject": agent.id,
        "data": data,
    }


async def enqueue(conn: Conn, event: Mapping[str, Any], *, topic: str, now: float) -> None:
    """Write ``event`` to the outbox; call inside the transaction of the change."""
    moment = utc(now)
    await conn.execute(
        "INSERT INTO registry.outbox (event_id, tenant, topic, event, created_at, next_attempt_at)"
        " VALUES ($1, $2, $3, $4, $5, $5)",
        uuid.UUID(str(event["id"])),
        event["tenant"],
        topic,
        event,
        moment,
    )


class OutboxRelay(BackgroundLoop):
    """Drains the outbox to a publisher, oldest first, with backoff while it fails."""

    task_name = "registry-outbox-relay"

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        publisher: EventPublisher,
        *,
        clock: Callable[[], float] = time.time,
        batch_size: int = 100,
        idle_s: float = 1.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self._pool = pool
        self._publisher = publisher
        self._clock = clock
        self._batch = batch_size
        self._idle = idle_s
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Drain soon: an event was just committed."""
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        """Seconds before retry number ``attempts``: exponential, capped, half jittered."""
        ceiling = min(self._max, self._base * 2.0 ** max(attempts - 1, 0))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def pending(self) -> int:
        """Events waiting to be delivered (not counting refused ones)."""
        async with self._pool.acquire() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM registry.outbox WHERE failed_at IS NULL"
            )
            return count

    async def drain_once(self) -> int:
        """Deliver due events in order until the batch ends or one fails; how many went."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_KEY):
                return 0  # another replica is draining
            rows = await conn.fetch(
                "SELECT seq, tenant, topic, event, attempts, next_attempt_at FROM registry.outbox"
                " WHERE failed_at IS NULL ORDER BY seq LIMIT $1",
                self._batch,
            )
            delivered: list[int] = []
            now = self._clock()
            for row in rows:
                if row["next_attempt_at"] > utc(now):
                    break  # the head is backing off; nothing may overtake it
                try:
                    await self._publisher.publish(row["tenant"], row["topic"], row["event"])
                except PublishError as exc:
                    await self._failed(conn, row, exc, now)
                    if not exc.permanent:
                        break
                    continue
                delivered.append(row["seq"])
            if delivered:
                await conn.execute("DELETE FROM registry.outbox WHERE seq = ANY($1)", delivered)
            return len(delivered)

    async def _failed(self, conn: Conn, row: asyncpg.Record, exc: PublishError, now: float) -> None:
        attempts = row["attempts"] + 1
        if exc.permanent:
            _log.error(
                "event refused by the bus; kept in the outbox as failed",
                extra={"seq": row["seq"], "error": str(exc)},
            )
            await conn.execute(
                "UPDATE registry.outbox SET attempts = $2, last_error = $3, failed_at = $4"
                " WHERE seq = $1",
                row["seq"],
                attempts,
                str(exc),
                utc(now),
            )
            return
        delay = self.backoff(attempts)
        _log.warning(
            "event not delivered; will retry",
            extra={
                "seq": row["seq"],
                "attempts": attempts,
                "retry_in_s": round(delay, 3),
                "error": str(exc),
            },
        )
        await conn.execute(
            "UPDATE registry.outbox SET attempts = $2, last_error = $3, next_attempt_at = $4"
            " WHERE seq = $1",
            row["seq"],
            attempts,
            str(exc),
            utc(now) + timedelta(seconds=delay),
        )

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before draining: a wake during the drain is kept
            try:
                sent = await self.drain_once()
            except STORE_ERRORS as exc:
                _log.warning("outbox drain failed; retrying", extra={"error": type(exc).__name__})
                sent = 0
            if sent:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle)
