"""The aiohttp application factory.

Resources are created and closed in ``cleanup_ctx`` (in order: Redis, the
policy engine, the upstream client session, the gateway's own outbound
session, the audit log, the pipeline), so a graceful shutdown lets in-flight
requests finish before anything they use is closed; the audit log then writes
its summaries and a final checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from gateway.admin import register_admin_routes
from gateway.apidocs import OPENAPI_PREFIX, openapi_document
from gateway.auditing import AuditRecorder, audit_recorder
from gateway.config import Config, PolicyConfig
from gateway.context import REQUEST_CONTEXT
from gateway.health import CheckState, ReadinessChecker, fallback_probe, health
from gateway.metrics import Metrics
from gateway.middleware import ON_OUTCOME, edge_middleware, set_security_headers
from gateway.pipeline import Pipeline, PipelineDeps, build_pipeline
from gateway.pipeline.ratelimit import Ratelimit
from gateway.pipeline.route import Route
from gateway.policy.engine import PolicyEngine
from gateway.policy.stack import POLICY_STACK, EnforcingEngine, open_policy_stack
from gateway.policy.supervisor import LocalBundle, LocalOpa
from gateway.proxy import ReverseProxy
from gateway.telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from gateway.telemetry.listener import MetricsListener

__all__ = [
    "AUDIT",
    "CONFIG",
    "ENGINE",
    "LOCAL_OPA",
    "METRICS",
    "METRICS_LISTENER",
    "PIPELINE",
    "REDIS",
    "TELEMETRY",
    "create_app",
]

_log = logging.getLogger("gateway.app")

CONFIG: Final = web.AppKey("config", Config)
ENGINE: Final = web.AppKey("engine", PolicyEngine)
PIPELINE: Final = web.AppKey("pipeline", Pipeline)
METRICS: Final = web.AppKey("metrics", Metrics)
#: The shared Redis client, or None on a single node without Redis.
REDIS: Final[web.AppKey[Redis | None]] = web.AppKey("redis")
#: The audit recorder, or None when audit.enabled is false.
AUDIT: Final[web.AppKey[AuditRecorder | None]] = web.AppKey("audit")
#: The OPA the gateway supervises, or None when policy.url names one.
LOCAL_OPA: Final[web.AppKey[LocalOpa | None]] = web.AppKey("local_opa")
_HTTP: Final = web.AppKey("http_session", aiohttp.ClientSession)
#: The gateway's own outbound calls (JWKS): no cookies, apart from the proxy's pool.
_OUTBOUND: Final = web.AppKey("outbound_session", aiohttp.ClientSession)
_READINESS: Final = web.AppKey("readiness", ReadinessChecker)
_CLOCK: Final[web.AppKey[Callable[[], float]]] = web.AppKey("clock")
#: Metrics and tracing, or None when both are off.
TELEMETRY: Final[web.AppKey[Telemetry | None]] = web.AppKey("telemetry")
#: The /metrics listener while it runs (its ``port`` is the bound one).
METRICS_LISTENER: Final[web.AppKey[MetricsListener]] = web.AppKey("metrics_listener")


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    span_exporter: SpanExporter | None = None,
) -> web.Application:
    """Build the gateway application for ``config``; nothing starts until it runs.

    ``clock`` (wall-clock seconds) is what the pipeline judges time by; tests pin it.
    ``span_exporter`` turns tracing on with that exporter, whatever ``[tracing]``
    says (tests pass an in-memory one).
    """
    metrics = Metrics()
    telemetry = Telemetry.for_config(config, metrics, span_exporter=span_exporter)
    app = web.Application(
        middlewares=[
            edge_middleware(
                metrics=metrics,
                trusted_proxies=config.server.trusted_proxies,
                access_log=config.logging.access_log,
                telemetry=telemetry,
            )
        ],
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[TELEMETRY] = telemetry
    app[_CLOCK] = clock
    app.on_response_prepare.append(set_security_headers)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_policy_engine)
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_outbound_session)
    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_pipeline)
    app.cleanup_ctx.append(_telemetry)
    app.router.add_get("/health", health)
    app.router.add_get("/_readyz", _readyz)
    app.router.add_get(OPENAPI_PREFIX + "/{document}", openapi_document, allow_head=False)
    # The admin plane: explicit routes, before the catch-all, outside the pipeline.
    register_admin_routes(app, config, metrics)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[PIPELINE].handle(request[REQUEST_CONTEXT])


async def _readyz(request: web.Request) -> web.StreamResponse:
    return await request.app[_READINESS].handle(request)


async def _policy_engine(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    local: LocalOpa | None = None
    enforcing: EnforcingEngine | None = None
    url = config.policy.url
    if config.policy.engine == "embedded":
        # Imported only when selected: wasmtime stays out of an OPA gateway.
        try:
            from gateway.policy.embedded import EmbeddedEngine
        except ImportError as exc:
            raise RuntimeError(
                "policy.engine = \"embedded\" needs wasmtime: pip install 'nops-gateway[embedded]'"
            ) from exc

        embedded = EmbeddedEngine(
            _opa_binary(config.policy),
            Path(config.policy.bundle_dir),
            decision_path=config.policy.decision_path,
            bundle=_bundle(config.policy),
        )
        await embedded.start()
        enforcing = embedded
    elif not url:
        local = LocalOpa(
            _opa_binary(config.policy),
            Path(config.policy.bundle_dir),
            bundle=_bundle(config.policy),
        )
        await local.start()
        url = local.url
    app[LOCAL_OPA] = local
    try:
        async with open_policy_stack(
            config.policy, url, app[METRICS], enforcing=enforcing, supervised=local is not None
        ) as stack:
            if local is not None and stack.cache is not None:
                # SECURITY: no hit while the supervised OPA is down (fails closed, ADR 0018).
                local.on_exit.append(stack.cache.recheck)
            app[POLICY_STACK] = stack
            app[ENGINE] = stack.engine
            app[_READINESS] = ReadinessChecker.for_config(
                config.dependencies, stack.engine, app[REDIS]
            )
            yield
    finally:
        if local is not None:
            await local.stop()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    url = app[CONFIG].dependencies.redis_url
    if not url:
        app[REDIS] = None
        yield
        return
    timeout = app[CONFIG].dependencies.probe_timeout_s
    client: Redis = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    app[REDIS] = client
    try:
        yield
    finally:
        await client.aclose()


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=256, ttl_dns_cache=30)
    # SECURITY: no cookie jar; a shared jar would replay one client's upstream
    # cookies on another client's requests.
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app[_HTTP] = session
        yield


async def _outbound_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=32, ttl_dns_cache=30)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app[_OUTBOUND] = session
        yield


async def _audit(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.audit.enabled:
        _log.warning("audit log disabled: decisions are not recorded")
        app[AUDIT] = None
        yield
        return
    async with audit_recorder(config, clock=app[_CLOCK]) as recorder:
        app[AUDIT] = recorder
        app[ON_OUTCOME] = recorder.record_outcome
        log = recorder.log

        async def audit_state() -> CheckState:
            if not await log.probe():
                return CheckState.UNHEALTHY
            return CheckState.DEGRADED if log.spooling else CheckState.OK

        # Unavailable while decisions cannot be recorded (store and spool
        # failing); degraded while they wait in the spool.
        app[_READINESS].add("audit", audit_state, critical=True)
        yield


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    telemetry = app[TELEMETRY]
    engine = app[ENGINE]
    if telemetry is not None:
        engine = telemetry.observe_engine(engine)
    proxy = ReverseProxy(
        app[_HTTP],
        max_body_bytes=config.server.max_body_bytes,
        trusted_proxies=frozenset(config.server.trusted_proxies),
    )
    pipeline = build_pipeline(
        PipelineDeps(
            config=config,
            engine=engine,
            proxy=proxy,
            redis=app[REDIS],
            metrics=app[METRICS],
            clock=app[_CLOCK],
            http=app[_OUTBOUND],
            audit=app[AUDIT],
        )
    )
    _add_fallback_checks(app[_READINESS], pipeline)
    app[PIPELINE] = telemetry.instrument(pipeline) if telemetry is not None else pipeline
    try:
        yield
    finally:
        await app[PIPELINE].close()


async def _telemetry(app: web.Application) -> AsyncIterator[None]:
    """The /metrics listener and scrape-time probes; flushes traces at shutdown."""
    telemetry = app[TELEMETRY]
    if telemetry is None:
        yield
        return
    readiness = app[_READINESS]

    async def dependencies() -> dict[str, bool]:
        # The /_readyz checks: degraded = on a fallback, or down.
        report = await readiness.check()
        return {name: state is not CheckState.OK for name, state in report.checks.items()}

    telemetry.readiness = dependencies
    recorder = app[AUDIT]
    if recorder is not None:
        log = recorder.log
        telemetry.watch_audit_queue(lambda: log.queue_depth)
    listener: MetricsListener | None = None
    try:
        if telemetry.instruments is not None:
            from gateway.telemetry.listener import MetricsListener

            listener = MetricsListener(app[CONFIG].metrics, telemetry)
            await listener.start()
            app[METRICS_LISTENER] = listener
        yield
    finally:
        if listener is not None:
            await listener.stop()
        await telemetry.close()


def _add_fallback_checks(readiness: ReadinessChecker, pipeline: Pipeline) -> None:
    """Readiness checks for the stages that keep serving on a fallback."""
    ratelimit = next((s for s in pipeline.stages if isinstance(s, Ratelimit)), None)
    if ratelimit is not None and ratelimit.enabled and ratelimit.limiter.shared is not None:
        limiter = ratelimit.limiter
        readiness.add("ratelimit", fallback_probe(lambda: limiter.degraded), critical=False)
    route = next((s for s in pipeline.stages if isinstance(s, Route)), None)
    if route is not None and route.agents:
        routers = tuple(route.agents.values())
        readiness.add(
            "registry",
            fallback_probe(lambda: any(r.registry_degraded for r in routers)),
            critical=False,
        )


def _bundle(policy: PolicyConfig) -> LocalBundle | None:
    if not policy.bundle_file:
        return None
    return LocalBundle(
        Path(policy.bundle_file),
        Path(policy.verification_key_file),
        key_id=policy.verification_key_id,
        signing_alg=policy.signing_alg,
    )


def _opa_binary(policy: PolicyConfig) -> Path:
    configured = Path(policy.opa_binary)
    if configured.is_file():
        return configured
    found = shutil.which("opa")
    return Path(found) if found else configured
