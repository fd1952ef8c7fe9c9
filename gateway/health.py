"""Liveness (``/health``) and readiness (``/_readyz``) endpoints.

Readiness runs every check in parallel, each within
``dependencies.probe_timeout_s``. A check is *critical* when the gateway
cannot serve safely without it (it fails closed: OPA, the audit log) and
*degradable* when the gateway keeps serving on a fallback (Redis: rate
limits per node in memory; PostgreSQL: the audit spool and the registry
cache). A probe answers ``ok``, ``degraded`` (working, on a fallback) or
``unhealthy``; one that raises is ``unreachable``, one that is too slow
``timeout``. The node's readiness follows:

==============  ======  =======================================================
readiness       HTTP    when
==============  ======  =======================================================
``ready``       200     every check ``ok``
``degraded``    200     a check ``degraded``, or a degradable check down: the
                        node serves what it can, so a load balancer keeps it
``unavailable`` 503     a critical check down: the node refuses everything, so
                        a load balancer should send traffic elsewhere
==============  ======  =======================================================

The 200 body is ``{"status": <readiness>, "readiness": <readiness>, "checks":
{name: state}, "degraded": [names]}``; the 503 body is a problem+json
``dependency-unavailable`` carrying ``readiness``, ``checks``,
``unavailable`` and ``degraded`` (its ``status`` is the HTTP status, as RFC
9457 defines it). See docs/operations.md, "Degraded modes".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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

__all__ = [
    "Check",
    "CheckState",
    "Probe",
    "Readiness",
    "ReadinessChecker",
    "ReadinessReport",
    "fallback_probe",
    "health",
]


class CheckState(enum.StrEnum):
    OK = "ok"
    #: Working, on a fallback (audit spooling, rate limits in memory, registry cache).
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


class Readiness(enum.StrEnum):
    READY = "ready"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"


#: A probe answers True (ok), False (unhealthy) or a :class:`CheckState`.
Probe = Callable[[], Awaitable[bool | CheckState]]


@dataclass(frozen=True, slots=True)
class Check:
    probe: Probe
    #: Down means the node cannot serve (fails closed); else it serves degraded.
    critical: bool


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    checks: dict[str, CheckState]
    #: Critical checks that are down.
    unavailable: tuple[str, ...]
    #: Checks on a fallback, and degradable checks that are down.
    degraded: tuple[str, ...]

    @property
    def readiness(self) -> Readiness:
        if self.unavailable:
            return Readiness.UNAVAILABLE
        return Readiness.DEGRADED if self.degraded else Readiness.READY


def fallback_probe(on_fallback: Callable[[], bool]) -> Probe:
    """A probe that says ``degraded`` while ``on_fallback()`` is true, else ``ok``."""

    async def probe() -> CheckState:
        return CheckState.DEGRADED if on_fallback() else CheckState.OK

    return probe


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")


@dataclass(frozen=True, slots=True)
class ReadinessChecker:
    timeout_s: float
    checks: dict[str, Check] = field(default_factory=dict)

    @classmethod
    def for_config(
        cls, deps: DependenciesConfig, engine: PolicyEngine, redis: Redis | None
    ) -> ReadinessChecker:
        checker = cls(deps.probe_timeout_s)
        # SECURITY: no decision without OPA: the node cannot serve.
        checker.add("opa", engine.healthy, critical=True)
        if redis is not None:
            # The replay cache fails closed per request; rate limits fall back to memory.
            checker.add("redis", lambda: _redis_ok(redis), critical=False)
        if deps.postgres_dsn:
            # The audit log spools and the registry answers from its cache.
            checker.add(
                "postgres",
                lambda: _postgres_ok(deps.postgres_dsn, deps.probe_timeout_s),
                critical=False,
            )
        return checker

    def add(self, name: str, probe: Probe, *, critical: bool) -> None:
        self.checks[name] = Check(probe, critical)

    async def check(self) -> ReadinessReport:
        names = list(self.checks)
        states = await asyncio.gather(*(self._run(self.checks[n].probe) for n in names))
        checks = dict(zip(names, states, strict=True))
        unavailable: list[str] = []
        degraded: list[str] = []
        for name, state in checks.items():
            if state is CheckState.OK:
                continue
            if state is not CheckState.DEGRADED and self.checks[name].critical:
                unavailable.append(name)
            else:
                degraded.append(name)
        return ReadinessReport(checks, tuple(sorted(unavailable)), tuple(sorted(degraded)))

    async def _run(self, probe: Probe) -> CheckState:
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await probe()
        except TimeoutError:
            return CheckState.TIMEOUT
        except Exception:  # noqa: BLE001 - any failure of a probe means "down"
            return CheckState.UNREACHABLE
        if isinstance(answer, CheckState):
            return answer
        return CheckState.OK if answer else CheckState.UNHEALTHY

    async def handle(self, request: web.Request) -> web.Response:
        report = await self.check()
        readiness = report.readiness
        checks = {name: str(state) for name, state in report.checks.items()}
        if readiness is Readiness.UNAVAILABLE:
            error = DependencyUnavailable(
                f"not ready: {', '.join(report.unavailable)} unavailable",
                extra={
                    "readiness": str(readiness),
                    "checks": checks,
                    "unavailable": list(report.unavailable),
                    "degraded": list(report.degraded),
                },
            )
            return problem_response(error, request_id=request[REQUEST_CONTEXT].request_id)
        body: dict[str, object] = {
            "status": str(readiness),
            "readiness": str(readiness),
            "checks": checks,
            "degraded": list(report.degraded),
        }
        worker = current_worker()
        if worker is not None:
            # Which of the supervisor's processes answered (docs: multi-worker).
            body["worker"] = worker
        return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _redis_ok(client: Redis) -> bool:
    return bool(await client.ping())


async def _postgres_ok(dsn: str, timeout_s: float) -> bool:
    connection = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        return bool(await connection.fetchval("SELECT 1") == 1)
    finally:
        with contextlib.suppress(Exception):
            await connection.close(timeout=timeout_s)
