"""Agent status from heartbeat age: healthy -> stale -> zombie.

An agent is ``healthy`` while its last heartbeat is younger than
``stale_after_s``, ``stale`` until ``zombie_after_s``, then ``zombie``; a
heartbeat makes it healthy again. Reads derive the status from
``heartbeat_at`` and the clock at read time (:meth:`StatusPolicy.sql`), so
the API and the gateway never act on a status older than the request. The
:class:`Sweeper` keeps the stored ``status`` column in step in the
background, in small batches of short transactions that skip rows a
request holds (``FOR UPDATE SKIP LOCKED``), so it never blocks a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from registry.db import STORE_ERRORS
from registry.loop import BackgroundLoop
from registry.model import Status, utc

__all__ = ["DEFAULT_STATUS_POLICY", "StatusPolicy", "Sweeper"]

_log = logging.getLogger("registry.status")


@dataclass(frozen=True, slots=True)
class StatusPolicy:
    """Heartbeat TTLs, in seconds."""

    stale_after_s: float = 15.0
    zombie_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.stale_after_s < self.zombie_after_s:
            raise ValueError("need 0 < stale_after_s < zombie_after_s")

    def status_at(self, heartbeat_at: float, now: float) -> Status:
        age = now - heartbeat_at
        if age >= self.zombie_after_s:
            return "zombie"
        if age >= self.stale_after_s:
            return "stale"
        return "healthy"

    def thresholds(self, now: float) -> tuple[datetime, datetime]:
        """(stale_before, zombie_before): heartbeats at or before these are stale, zombie."""
        moment = utc(now)
        return (
            moment - timedelta(seconds=self.stale_after_s),
            moment - timedelta(seconds=self.zombie_after_s),
        )

    @staticmethod
    def sql(stale_param: int, zombie_param: int, column: str = "heartbeat_at") -> str:
        """The status as an SQL expression over bound ``thresholds`` parameters."""
        return (
            f"(CASE WHEN {column} <= ${zombie_param} THEN 'zombie'"
            f" WHEN {column} <= ${stale_param} THEN 'stale' ELSE 'healthy' END)"
        )


DEFAULT_STATUS_POLICY: Final = StatusPolicy()

_SWEEP: Final = f"""
WITH due AS (
    SELECT tenant, id FROM registry.agents
    WHERE (status = 'healthy' AND heartbeat_at <= $1)
       OR (status <> 'zombie' AND heartbeat_at <= $2)
    ORDER BY heartbeat_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE registry.agents AS a SET status = {StatusPolicy.sql(1, 2, "a.heartbeat_at")}
FROM due WHERE a.tenant = due.tenant AND a.id = due.id
RETURNING a.status
"""


class Sweeper(BackgroundLoop):
    """Moves stored statuses along as heartbeats age; one task per process."""

    task_name = "registry-sweeper"

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        policy: StatusPolicy = DEFAULT_STATUS_POLICY,
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = 1.0,
        batch_size: int = 500,
    ) -> None:
        super().__init__()
        self._pool = pool
        self._policy = policy
        self._clock = clock
        self._interval = interval_s
        self._batch = batch_size

    async def sweep_once(self) -> dict[str, int]:
        """Bring every due agent's stored status up to date; counts by new status."""
        stale_before, zombie_before = self._policy.thresholds(self._clock())
        moved: dict[str, int] = {}
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_SWEEP, stale_before, zombie_before, self._batch)
            for row in rows:
                moved[row["status"]] = moved.get(row["status"], 0) + 1
            if len(rows) < self._batch:
                break
        if moved:
            _log.info("agent statuses swept", extra={"moved": moved})
        return moved

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except STORE_ERRORS as exc:
                _log.warning("sweep failed; retrying", extra={"error": type(exc).__name__})
            await asyncio.sleep(self._interval)
