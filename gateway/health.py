"""Liveness (``/health``) and readiness (``/_readyz``) endpoints.

Readiness asks every configured dependency in parallel, each within
``dependencies.probe_timeout_s``, and answers 503 naming those that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import orjson
from aiohttp import web
from redis.asyncio import Redis

from gateway.config import DependenciesConfig
from gateway.context import REQUEST_CONTEXT
from gateway.errors import DependencyUnavailable
from gateway.policy.engine import PolicyEngine
from gateway.problem import problem_response
from gateway.workers import current_worker

__all__ = ["Probe", "ReadinessChecker", "health"]

Probe = Callable[[], Awaitable[bool]]


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")


@dataclass(frozen=True, slots=True)
class ReadinessChecker:
    probes: dict[str, Probe]
    timeout_s: float

    @classmethod
    def for_config(
        cls, deps: DependenciesConfig, engine: PolicyEngine, redis: Redis | None
    ) -> ReadinessChecker:
        probes: dict[str, Probe] = {"opa": engine.healthy}
        if redis is not None:
            probes["redis"] = lambda: _redis_ok(redis)
        if deps.postgres_dsn:
            probes["postgres"] = lambda: _postgres_ok(deps.postgres_dsn, deps.probe_timeout_s)
        return cls(probes, deps.probe_timeout_s)

    async def check(self) -> dict[str, str]:
        names = list(self.probes)
        results = await asyncio.gather(*(self._run(self.probes[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def _run(self, probe: Probe) -> str:
        try:
            async with asyncio.timeout(self.timeout_s):
                return "ok" if await probe() else "unhealthy"
        except TimeoutError:
            return "timeout"
        except Exception:  # noqa: BLE001 - any failure of a probe means "not ready"
            return "unreachable"

    async def handle(self, request: web.Request) -> web.Response:
        checks = await self.check()
        failed = sorted(name for name, state in checks.items() if state != "ok")
        if failed:
            error = DependencyUnavailable(
                f"not ready: {', '.join(failed)} unavailable",
                extra={"checks": checks, "unavailable": failed},
            )
            return problem_response(error, request_id=request[REQUEST_CONTEXT].request_id)
        document: dict[str, object] = {"status": "ready", "checks": checks}
        worker = current_worker()
        if worker is not None:
            # Which of the supervisor's processes answered (docs: multi-worker).
            document["worker"] = worker
        body = orjson.dumps(document)
        return web.Response(body=body, content_type="application/json")


async def _redis_ok(client: Redis) -> bool:
    return bool(await client.ping())


async def _postgres_ok(dsn: str, timeout_s: float) -> bool:
    connection = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        return bool(await connection.fetchval("SELECT 1") == 1)
    finally:
        with contextlib.suppress(Exception):
            await connection.close(timeout=timeout_s)
