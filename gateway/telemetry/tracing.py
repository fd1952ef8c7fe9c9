"""OpenTelemetry traces for one gateway app; imported only when tracing is on.

Each app builds its own :class:`~opentelemetry.sdk.trace.TracerProvider`
and never installs it globally, so several gateways in one process (tests)
keep their spans apart. W3C trace context (``traceparent``/``tracestate``)
is read from the client with the W3C propagator itself, not the global one
(which an embedding process could have replaced).

Sampling is decided here, on the trace id: a client's ``traceparent`` keeps
the trace id (the caller's trace continues) but its *sampled* flag does not
force a trace to be recorded; at the perimeter, an untrusted caller must not
be able to switch on the cost of tracing for every request it sends.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import __version__
from gateway.config import TracingConfig

__all__ = ["Tracing"]

_PROPAGATOR: Final = TraceContextTextMapPropagator()


class Tracing:
    """A tracer, its provider, and the W3C propagator."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        ratio: Sampler = TraceIdRatioBased(config.sample_ratio)
        # SECURITY: a remote parent's sampled flag is not trusted (see module docstring).
        sampler = ParentBased(ratio, remote_parent_sampled=ratio, remote_parent_not_sampled=ratio)
        resource = Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
        )
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        if exporter is not None:
            # Given by the caller (tests): every span is exported as it ends.
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif config.exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            otlp = OTLPSpanExporter(endpoint=config.endpoint or None)
            self.provider.add_span_processor(BatchSpanProcessor(otlp))
        self.tracer = self.provider.get_tracer("nops-gateway", __version__)

    @staticmethod
    def extract(headers: Mapping[str, str]) -> otel_context.Context:
        """The caller's trace context (an empty one when absent or malformed)."""
        return _PROPAGATOR.extract(headers)

    @staticmethod
    def inject(headers: MutableMapping[str, str]) -> None:
        """Write the current span's ``traceparent``/``tracestate`` into ``headers``."""
        _PROPAGATOR.inject(headers)

    @staticmethod
    def trace_id(span: trace.Span) -> str | None:
        context = span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def shutdown(self) -> None:
        """Flush what is buffered and stop the exporters."""
        self.provider.shutdown()
