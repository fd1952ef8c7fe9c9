"""Metrics and traces of one gateway app (issue #9).

:class:`Telemetry` is built once per app from ``[metrics]`` and ``[tracing]``;
when both are off the app holds None and the request path does nothing more
than it did before. The pieces:

* the edge middleware calls :meth:`Telemetry.begin` for each request: a
  server span (continuing the caller's W3C trace context), the trace id for
  the log line, and :meth:`RequestObservation.finish` counts the request;
* :meth:`Telemetry.instrument` wraps each pipeline stage (a child span and
  the stage histogram) and registers the circuits for ``circuit_state``;
* :meth:`Telemetry.observe_engine` wraps the policy engine (``policy.decide``
  span, ``policy_decision_seconds``);
* code that calls out (the audit append, the proxy, the agent router, the
  egress forwarder) wraps the call in :func:`operation`, which finds the
  request's telemetry in a context variable, opens a span, times it, and
  lets :func:`inject_trace` put ``traceparent``/``tracestate`` on the
  outgoing request. With telemetry off :func:`operation` returns one shared
  no-op context manager.

prometheus-client and the OpenTelemetry SDK are imported only when the
matching section is on, so neither costs start-up time or memory otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import web

from gateway.config import Config
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.logs import TRACE_ID
from gateway.metrics import Metrics
from gateway.policy.engine import Decision, PolicyEngine

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from gateway.pipeline import Pipeline, Stage
    from gateway.telemetry.prom import GatewayInstruments
    from gateway.telemetry.tracing import Tracing

__all__ = [
    "Operation",
    "RequestObservation",
    "Telemetry",
    "current",
    "inject_trace",
    "operation",
]

Operation = Literal["audit", "upstream"]

#: The telemetry of the app serving the current request (set by the edge).
_CURRENT: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar(
    "telemetry", default=None
)
#: True while the current request's server span is recorded (sampled): child
#: spans are only made then; an unsampled request pays for no span but its own.
_RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar("recording", default=False)
_NOOP: Final = contextlib.nullcontext()
_RATE_LIMITED: Final = "rate-limited"


def current() -> Telemetry | None:
    """The telemetry of the request being handled, if any is on."""
    return _CURRENT.get()


def operation(kind: Operation, route: str = "") -> AbstractContextManager[None]:
    """Span and time one outgoing call of the current request (a no-op when off)."""
    telemetry = _CURRENT.get()
    if telemetry is None:
        return _NOOP
    return telemetry.operation(kind, route)


def inject_trace(headers: MutableMapping[str, str]) -> None:
    """Put the current span's trace context on an outgoing request's ``headers``.

    With tracing off the headers are left as they are (a caller's own
    ``traceparent``, where forwarded, passes through unchanged).
    """
    telemetry = _CURRENT.get()
    if telemetry is not None and telemetry.tracing is not None:
        telemetry.tracing.inject(headers)


class Telemetry:
    """The instruments and the tracer of one app."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.instruments: GatewayInstruments | None = None
        self.tracing: Tracing | None = None
        #: Run before each scrape: dependency name -> degraded (the /_readyz checks).
        self.readiness: Callable[[], Awaitable[dict[str, bool]]] | None = None
        self._degraded_now: dict[str, bool] = {}
        if config.metrics.enabled:
            from gateway.telemetry.prom import GatewayInstruments

            self.instruments = GatewayInstruments(
                metrics,
                route_names=(route.name for route in config.routes),
                tenant_ids=(tenant.id for tenant in config.tenants),
            )
            self.instruments.watch_degraded(self._degraded)
        if config.tracing.exporter != "none" or span_exporter is not None:
            from gateway.telemetry.tracing import Tracing

            self.tracing = Tracing(config.tracing, span_exporter)

    @classmethod
    def for_config(
        cls, config: Config, metrics: Metrics, *, span_exporter: SpanExporter | None = None
    ) -> Telemetry | None:
        """None when both metrics and tracing are off (the request path then skips it)."""
        tracing = config.tracing.exporter != "none" or span_exporter is not None
        if not config.metrics.enabled and not tracing:
            return None
        return cls(config, metrics, span_exporter=span_exporter)

    # -- per request -----------------------------------------------------------

    def begin(self, ctx: RequestContext) -> RequestObservation:
        """Start observing one request; the caller must :meth:`~RequestObservation.close`."""
        return RequestObservation(self, ctx)

    def operation(self, kind: Operation, route: str = "") -> AbstractContextManager[None]:
        return _TimedOperation(self, kind, route)

    # -- wiring ----------------------------------------------------------------

    def instrument(self, pipeline: Pipeline) -> Pipeline:
        """The same pipeline with each stage observed; circuits registered for metrics."""
        from gateway.pipeline import Pipeline

        if self.instruments is not None:
            self.instruments.watch_circuits(lambda: _circuits(pipeline))
        return Pipeline([ObservedStage(stage, self) for stage in pipeline.stages])

    def observe_engine(self, engine: PolicyEngine) -> PolicyEngine:
        return ObservedEngine(engine, self)

    def watch_audit_queue(self, depth: Callable[[], int]) -> None:
        if self.instruments is not None:
            self.instruments.watch_audit_queue(depth)

    async def refresh(self) -> None:
        """Ask the readiness checks (each within its probe timeout) before a scrape."""
        if self.readiness is not None:
            self._degraded_now = await self.readiness()

    def _degraded(self) -> dict[str, bool]:
        return self._degraded_now

    async def close(self) -> None:
        """Flush buffered spans (in a thread: the exporter blocks on its HTTP call)."""
        if self.tracing is not None:
            import asyncio

            await asyncio.to_thread(self.tracing.shutdown)


class RequestObservation:
    """One request's server span, trace id and request count."""

    __slots__ = (
        "_ctx_token",
        "_otel_token",
        "_recording_token",
        "_span",
        "_telemetry",
        "_trace_token",
    )

    def __init__(self, telemetry: Telemetry, ctx: RequestContext) -> None:
        self._telemetry = telemetry
        self._ctx_token = _CURRENT.set(telemetry)
        self._span: Span | None = None
        self._otel_token: object | None = None
        self._trace_token: contextvars.Token[str | None] | None = None
        self._recording_token: contextvars.Token[bool] | None = None
        tracing = telemetry.tracing
        if tracing is not None:
            from opentelemetry import context as otel_context
            from opentelemetry import trace

            request = ctx.request
            parent: Context = tracing.extract(request.headers)
            span = tracing.tracer.start_span(
                f"{request.method} gateway",
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes={
                    "http.request.method": request.method,
                    "nops.request_id": ctx.request_id,
                },
            )
            self._span = span
            self._otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
            self._trace_token = TRACE_ID.set(tracing.trace_id(span))
            self._recording_token = _RECORDING.set(span.is_recording())

    def finish(self, ctx: RequestContext, status: int, error: GatewayError | None) -> None:
        """Count the request and end its span (before the access line is written)."""
        route = ctx.route.name if ctx.route is not None else None
        tenant = ctx.tenant.id if ctx.tenant is not None else None
        instruments = self._telemetry.instruments
        if instruments is not None:
            instruments.count_request(route, status, tenant)
            if error is not None and error.code == _RATE_LIMITED:
                instruments.count_ratelimit_hit(tenant)
        span = self._span
        if span is not None:
            from opentelemetry.trace import StatusCode

            attributes: dict[str, Any] = {
                "http.response.status_code": status,
                "http.route": route or "none",
                "nops.stage": ctx.stage if error is not None else "done",
            }
            if tenant is not None:
                attributes["nops.tenant"] = tenant
            decision = ctx.decision
            if decision is not None:
                attributes["nops.decision"] = "allow" if decision.allow else "deny"
                attributes["nops.decision_id"] = decision.decision_id
            if error is not None:
                attributes["nops.error"] = error.code
                if error.reasons:
                    attributes["nops.reason"] = error.reasons[0]
                decision_id = error.extra.get("decision_id")
                if isinstance(decision_id, str):
                    attributes["nops.decision_id"] = decision_id
                    attributes.setdefault("nops.decision", "deny")
            span.update_name(f"{ctx.request.method} {route or 'none'}")
            span.set_attributes(attributes)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
            span.end()

    def close(self) -> None:
        """Leave the request's trace context (after the access line is written)."""
        if self._otel_token is not None:
            from opentelemetry import context as otel_context

            otel_context.detach(self._otel_token)  # type: ignore[arg-type]
        if self._trace_token is not None:
            TRACE_ID.reset(self._trace_token)
        if self._recording_token is not None:
            _RECORDING.reset(self._recording_token)
        _CURRENT.reset(self._ctx_token)


class _TimedOperation:
    """Times one outgoing call; while the request is sampled, also a span around it."""

    __slots__ = ("_kind", "_route", "_span", "_span_scope", "_start", "_telemetry")

    def __init__(self, telemetry: Telemetry, kind: Operation, route: str) -> None:
        self._telemetry = telemetry
        self._kind = kind
        self._route = route
        self._span: Span | None = None
        self._span_scope: AbstractContextManager[Span] | None = None
        self._start = 0.0

    def __enter__(self) -> None:
        tracing = self._telemetry.tracing
        if tracing is not None and _RECORDING.get():
            from opentelemetry.trace import SpanKind

            upstream = self._kind == "upstream"
            scope = tracing.tracer.start_as_current_span(
                f"upstream {self._route}" if upstream else "audit.append",
                kind=SpanKind.CLIENT if upstream else SpanKind.INTERNAL,
                attributes={"nops.route": self._route} if self._route else None,
                # SECURITY: no exception message or stack trace in span events.
                record_exception=False,
                set_status_on_exception=False,
            )
            self._span = scope.__enter__()
            self._span_scope = scope
        self._start = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._start
        instruments = self._telemetry.instruments
        if instruments is not None:
            if self._kind == "audit":
                instruments.audit_durability.observe(elapsed)
            else:
                instruments.upstream_histogram(self._route).observe(elapsed)
        if self._span_scope is not None and self._span is not None:
            if exc is not None:
                _failed(self._span, exc)
            self._span_scope.__exit__(exc_type, exc, traceback)


class ObservedStage:
    """A pipeline stage with its span and its duration histogram."""

    __slots__ = ("_histogram", "_stage", "_telemetry", "name")

    def __init__(self, stage: Stage, telemetry: Telemetry) -> None:
        self.name = stage.name
        self._stage = stage
        self._telemetry = telemetry
        instruments = telemetry.instruments
        self._histogram = instruments.stage_histogram(stage.name) if instruments else None

    def __getattr__(self, name: str) -> Any:
        # The wrapped stage's own attributes (route.agents ...) stay reachable.
        return getattr(self._stage, name)

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        histogram = self._histogram
        tracing = self._telemetry.tracing
        start = time.perf_counter()
        try:
            if tracing is None or not _RECORDING.get():
                return await self._stage.run(ctx)
            with tracing.tracer.start_as_current_span(
                f"stage {self.name}",
                attributes={"nops.stage": self.name},
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await self._stage.run(ctx)
                except GatewayError as exc:
                    span.set_attribute("nops.error", exc.code)
                    if exc.reasons:
                        span.set_attribute("nops.reason", exc.reasons[0])
                    raise
        finally:
            if histogram is not None:
                histogram.observe(time.perf_counter() - start)

    async def close(self) -> None:
        close = getattr(self._stage, "close", None)
        if close is not None:
            await close()


class ObservedEngine:
    """A policy engine whose decisions are timed and traced."""

    def __init__(self, engine: PolicyEngine, telemetry: Telemetry) -> None:
        self._engine = engine
        self._telemetry = telemetry

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        instruments = self._telemetry.instruments
        tracing = self._telemetry.tracing
        start = time.perf_counter()
        try:
            if tracing is None or not _RECORDING.get():
                return await self._engine.decide(document, decision_id)
            with tracing.tracer.start_as_current_span(
                "policy.decide",
                attributes={"nops.decision_id": decision_id},
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    decision = await self._engine.decide(document, decision_id)
                except BaseException as exc:
                    _failed(span, exc)
                    raise
                span.set_attributes(
                    {
                        "nops.decision": "allow" if decision.allow else "deny",
                        "nops.decision.cached": decision.cached,
                        "nops.policy_revision": decision.revision,
                    }
                )
                return decision
        finally:
            if instruments is not None:
                instruments.policy_decision.observe(time.perf_counter() - start)

    async def healthy(self) -> bool:
        return await self._engine.healthy()

    async def close(self) -> None:
        await self._engine.close()


def _failed(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by the exception's type or code only, never its message."""
    from opentelemetry.trace import StatusCode

    span.set_status(StatusCode.ERROR)
    code = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
    span.set_attribute("error.type", code)


def _circuits(pipeline: Pipeline) -> Iterator[tuple[str, list[Any]]]:
    for stage in pipeline.stages:
        # Upstream routes: one breaker each (the route stage's ``breakers``).
        single = getattr(stage, "breakers", None)
        if isinstance(single, dict):
            for route, breaker in single.items():
                yield route, [breaker.state]
        # Agent and egress routes: one breaker per endpoint or destination.
        for attribute in ("agents", "egress"):
            routers = getattr(stage, attribute, None)
            if not isinstance(routers, dict):
                continue
            for route, router in routers.items():
                yield route, router.breakers.states()
