"""Prometheus metrics on the admin listener, OpenTelemetry spans, trace ids in logs."""

from __future__ import annotations

import base64
import http.server
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.apikeys import hash_secret
from gateway.app import METRICS, METRICS_LISTENER, TELEMETRY
from gateway.config import ConfigError, parse_config
from gateway.logs import JsonFormatter
from gateway.metrics import MAX_DENIAL_REASONS, Metrics
from gateway.telemetry import Telemetry
from gateway.telemetry.prom import _Histogram
from tests.conftest import TEST_SECRETS, GatewayFactory, free_port
from tests.problems import assert_problem
from tests.promscrape import METRICS_ON, scrape, value

Client = TestClient[Any, Any]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


class TestMetricsEndpoint:
    async def test_requests_counted_by_route_status_tenant(
        self, make_gateway: GatewayFactory
    ) -> None:
        """requests_total is labelled by configured route, status and tenant; no raw paths."""
        gateway = await make_gateway(metrics=METRICS_ON)
        for path, status in [
            ("/echo/a/secret-looking-id-1", 200),
            ("/echo/b", 200),
            ("/nowhere/x", 404),
            ("/locked/x", 401),
        ]:
            response = await gateway.get(path)
            assert response.status == status, path
        samples = await scrape(gateway)
        total = "nops_gateway_requests_total"
        assert value(samples, total, route="echo", status="200", tenant="unknown") == 2
        assert value(samples, total, route="none", status="404", tenant="unknown") == 1
        assert value(samples, total, route="locked", status="401", tenant="unknown") == 1
        assert not [key for key in samples if "secret-looking-id-1" in str(key)]

    async def test_denials_stages_policy_audit_exported(self, make_gateway: GatewayFactory) -> None:
        """Denials, stage durations, the policy and audit histograms reach /metrics."""
        gateway = await make_gateway(metrics=METRICS_ON)
        assert (await gateway.get("/echo/ok")).status == 200
        assert (await gateway.get("/locked/x")).status == 401
        samples = await scrape(gateway)
        internal = gateway.app[METRICS]
        for (stage, code), count in internal.denials.items():
            assert value(samples, "nops_gateway_denials_total", stage=stage, code=code) == count
        assert internal.denials
        for stage in ("intake", "signature", "decision", "audit", "route"):
            observed = value(samples, "nops_gateway_stage_duration_seconds_count", stage=stage)
            assert observed >= 1, stage
        assert value(samples, "nops_gateway_policy_decision_seconds_count") >= 1
        assert value(samples, "nops_gateway_audit_durability_seconds_count") >= 1
        assert value(samples, "nops_gateway_upstream_duration_seconds_count", route="echo") == 1
        assert ("nops_gateway_audit_queue_depth", ()) in samples
        # One circuit per upstream route, closed while the upstream answers.
        circuits = "nops_gateway_circuit_state"
        assert value(samples, circuits, route="echo", state="closed") == 1
        assert value(samples, circuits, route="echo", state="open") == 0

    async def test_degraded_gauges(self, make_gateway: GatewayFactory) -> None:
        """Each readiness check has a degraded gauge; all healthy reads 0."""
        gateway = await make_gateway(metrics=METRICS_ON)
        samples = await scrape(gateway)
        for dependency in ("ratelimit", "opa", "audit"):
            key = ("nops_gateway_degraded", (("dependency", dependency),))
            assert samples[key] == 0.0, dependency
        gateway.app[METRICS].ratelimit_degraded = True
        samples = await scrape(gateway)
        assert value(samples, "nops_gateway_degraded", dependency="ratelimit") == 1.0

    async def test_unreachable_policy_engine_reads_degraded(
        self, make_gateway: GatewayFactory
    ) -> None:
        """A scrape runs the readiness checks first: OPA unreachable reads degraded opa."""
        gateway = await make_gateway(
            metrics=METRICS_ON, policy={"url": f"http://127.0.0.1:{free_port()}"}
        )
        samples = await scrape(gateway)
        assert value(samples, "nops_gateway_degraded", dependency="opa") == 1.0
        assert value(samples, "nops_gateway_degraded", dependency="audit") == 0.0

    async def test_metrics_never_served_on_the_proxied_port(
        self, make_gateway: GatewayFactory
    ) -> None:
        """/metrics on the gateway's own port is just a path: it goes through the pipeline."""
        gateway = await make_gateway(metrics=METRICS_ON)
        response = await gateway.get("/metrics")
        await assert_problem(response, 404, "no-route")

    async def test_rate_limit_hits_by_tenant(self, make_gateway: GatewayFactory) -> None:
        """A 429 counts under the signer's configured tenant."""
        gateway = await make_gateway(
            metrics=METRICS_ON,
            sign_as="acme-k1",
            ratelimit={"tiers": {"professional": {"tenant": "1/minute"}, "free": {}}},
        )
        statuses = [(await gateway.get("/echo/x")).status for _ in range(3)]
        assert statuses.count(429) == 2
        samples = await scrape(gateway)
        assert value(samples, "nops_gateway_ratelimit_hits_total", tenant="acme") == 2
        assert (
            value(samples, "nops_gateway_requests_total", route="echo", status="429", tenant="acme")
            == 2
        )

    async def test_gateways_keep_their_own_registries(self, make_gateway: GatewayFactory) -> None:
        """Two gateways in one process count apart, on their own ports."""
        first = await make_gateway(metrics=METRICS_ON)
        second = await make_gateway(metrics=METRICS_ON)
        assert first.app[METRICS_LISTENER].port != second.app[METRICS_LISTENER].port
        await first.get("/echo/x")
        name = "nops_gateway_requests_total"
        first_samples, second_samples = await scrape(first), await scrape(second)
        assert value(first_samples, name, route="echo", status="200", tenant="unknown") == 1
        assert value(second_samples, name, route="echo", status="200", tenant="unknown") == 0

    async def test_off_by_default(self, make_gateway: GatewayFactory) -> None:
        """Without [metrics] and [tracing] no telemetry and no listener exist."""
        gateway = await make_gateway()
        assert gateway.app[TELEMETRY] is None
        assert METRICS_LISTENER not in gateway.app


class TestHistogram:
    @pytest.mark.parametrize(
        ("values", "cumulative"),
        [
            pytest.param([], [0, 0, 0], id="empty"),
            pytest.param([0.1], [1, 1, 1], id="on-a-bound-counts-below-it"),
            pytest.param([0.05, 0.5, 5.0], [1, 2, 3], id="one-each"),
            pytest.param([2.0, 3.0], [0, 0, 2], id="all-above"),
        ],
    )
    def test_buckets_are_cumulative_and_inclusive(
        self, values: list[float], cumulative: list[int]
    ) -> None:
        """Bucket le=x counts observations <= x, as Prometheus defines it."""
        histogram = _Histogram((0.1, 1.0))
        for observed in values:
            histogram.observe(observed)
        assert histogram.buckets() == list(zip(("0.1", "1.0", "+Inf"), cumulative, strict=True))
        assert histogram.sum == pytest.approx(sum(values))


class TestDenialReasonCap:
    def test_reasons_past_the_cap_count_as_other(self) -> None:
        """Distinct reason labels stop at MAX_DENIAL_REASONS; the rest count as 'other'."""
        metrics = Metrics()
        for n in range(MAX_DENIAL_REASONS + 5):
            metrics.record("decision", 403, "policy-denied", (f"reason_{n}",))
        labels = {reason for _, reason in metrics.denial_reasons}
        assert len(labels) == MAX_DENIAL_REASONS + 1
        assert metrics.denial_reasons[("decision", "other")] == 5

    def test_egress_report_reasons_are_capped_too(self) -> None:
        """Report-mode reasons (from policy) stop at the same cap, then count as 'other'."""
        metrics = Metrics()
        for n in range(MAX_DENIAL_REASONS + 3):
            metrics.record_egress_would_deny(f"reason_{n}")
        metrics.record_egress_would_deny("reason_0")
        assert len(metrics.egress_would_deny) == MAX_DENIAL_REASONS + 1
        assert metrics.egress_would_deny["other"] == 3
        assert metrics.egress_would_deny["reason_0"] == 2


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in finished}


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


class TestTracing:
    async def test_span_tree_continues_the_callers_trace(
        self, make_gateway: GatewayFactory, spans: InMemorySpanExporter
    ) -> None:
        """Server span under the caller's traceparent; stages, policy, audit, upstream below."""
        gateway = await make_gateway(span_exporter=spans)
        response = await gateway.get("/echo/x", headers={"traceparent": CLIENT_TRACEPARENT})
        assert response.status == 200
        echoed = await response.json()
        tree = by_name(spans.get_finished_spans())
        server = tree["GET echo"]
        assert format(server.context.trace_id, "032x") == CLIENT_TRACE
        assert parent_of(server) == 0x00F067AA0BA902B7
        assert server.attributes is not None
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["nops.decision"] == "allow"
        assert server.attributes["nops.stage"] == "done"
        for stage in ("intake", "signature", "decision", "audit", "route"):
            assert parent_of(tree[f"stage {stage}"]) == server.context.span_id, stage
        assert parent_of(tree["policy.decide"]) == tree["stage decision"].context.span_id
        assert parent_of(tree["audit.append"]) == tree["stage audit"].context.span_id
        upstream = tree["upstream echo"]
        assert parent_of(upstream) == tree["stage route"].context.span_id
        # The upstream got the same trace, with the gateway's upstream span as parent.
        sent = echoed["headers"]["traceparent"]
        assert sent == f"00-{CLIENT_TRACE}-{upstream.context.span_id:016x}-01"

    async def test_denial_span_names_stage_and_reason(
        self, make_gateway: GatewayFactory, spans: InMemorySpanExporter
    ) -> None:
        """A denied request's spans carry the stage and error code, with status attributes."""
        gateway = await make_gateway(span_exporter=spans)
        assert (await gateway.get("/locked/x")).status == 401
        tree = by_name(spans.get_finished_spans())
        server = tree["GET locked"]
        assert server.attributes is not None
        assert server.attributes["nops.stage"] == "signature"
        assert server.attributes["nops.error"] == "missing-signature"
        assert server.attributes["http.response.status_code"] == 401
        assert "stage decision" not in tree

    async def test_no_secret_in_span_attributes(
        self, make_gateway: GatewayFactory, spans: InMemorySpanExporter
    ) -> None:
        """A signed request leaves no key, signature or token in any span attribute."""
        gateway = await make_gateway(span_exporter=spans, sign_as="acme-k1")
        response = await gateway.get(
            "/echo/x", headers={"Authorization": "Bearer not-a-real-token-abc123"}
        )
        assert response.status in (200, 401)
        sent = await response.json() if response.status == 200 else {"headers": {}}
        key = TEST_SECRETS["acme-k1"]
        forbidden = ["not-a-real-token-abc123", key.hex(), base64.b64encode(key).decode()]
        forbidden += [
            v for k, v in sent["headers"].items() if k in ("signature", "signature-input")
        ]
        finished = spans.get_finished_spans()
        assert finished
        for span in finished:
            for name, attribute in (span.attributes or {}).items():
                for secret in forbidden:
                    assert secret not in str(attribute), (span.name, name)

    async def test_unsampled_caller_flag_does_not_stop_recording(
        self, make_gateway: GatewayFactory, spans: InMemorySpanExporter
    ) -> None:
        """The gateway, not the caller's flags, decides sampling; the trace id is kept."""
        gateway = await make_gateway(span_exporter=spans)
        unsampled = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-00"
        await gateway.get("/echo/x", headers={"traceparent": unsampled})
        server = by_name(spans.get_finished_spans())["GET echo"]
        assert format(server.context.trace_id, "032x") == CLIENT_TRACE

    async def test_callers_sampled_flag_cannot_force_recording(
        self, make_gateway: GatewayFactory, spans: InMemorySpanExporter
    ) -> None:
        """With sample_ratio 0 nothing is recorded, yet the trace id still flows upstream."""
        gateway = await make_gateway(span_exporter=spans, tracing={"sample_ratio": 0.0})
        response = await gateway.get("/echo/x", headers={"traceparent": CLIENT_TRACEPARENT})
        sent = (await response.json())["headers"]["traceparent"]
        assert spans.get_finished_spans() == ()
        assert sent.startswith(f"00-{CLIENT_TRACE}-")
        assert sent.endswith("-00")

    async def test_access_line_carries_trace_id(
        self, make_gateway: GatewayFactory, spans: InMemorySpanExporter
    ) -> None:
        """The canonical request line has request_id, trace_id, stage, reason."""
        lines: list[dict[str, Any]] = []
        formatter = JsonFormatter()

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.name == "gateway.request":
                    import orjson

                    lines.append(orjson.loads(formatter.format(record)))

        handler = Capture()
        logger = logging.getLogger("gateway.request")
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.INFO)
        try:
            gateway = await make_gateway(span_exporter=spans)
            await gateway.get("/locked/x", headers={"traceparent": CLIENT_TRACEPARENT})
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        [line] = lines
        assert line["trace_id"] == CLIENT_TRACE
        assert line["stage"] == "signature"
        assert line["error"] == "missing-signature"
        assert line["reason"] == "signature_missing"
        assert len(line["request_id"]) == 32


class TestTracingOff:
    async def test_callers_traceparent_passes_through_untouched(
        self, make_gateway: GatewayFactory
    ) -> None:
        """With tracing off the gateway neither starts spans nor rewrites traceparent."""
        gateway = await make_gateway()
        response = await gateway.get("/echo/x", headers={"traceparent": CLIENT_TRACEPARENT})
        echoed = await response.json()
        assert echoed["headers"]["traceparent"] == CLIENT_TRACEPARENT


class TestBusTraceContext:
    async def test_published_message_carries_the_trace(
        self, make_gateway: GatewayFactory, bus_http: Client, spans: InMemorySpanExporter
    ) -> None:
        """A message published through the gateway keeps the gateway's trace context."""
        secret = "s3cret-bus-trace-0123456789abcdef"
        gateway = await make_gateway(
            span_exporter=spans,
            routes=[
                {
                    "name": "bus",
                    "prefix": "/bus/",
                    "upstream": str(bus_http.make_url("")).rstrip("/"),
                    "strip_prefix": True,
                    "auth": "api_key",
                    "require_signature": False,
                }
            ],
            api_keys=[{"id": "acme-agent", "tenant": "acme", "hash": hash_secret(secret)}],
        )
        credential = {"Authorization": f"ApiKey acme-agent.{secret}"}
        published = await gateway.post(
            "/bus/topics/traced/messages",
            json={"type": "trace.test", "payload": {}},
            headers={**credential, "traceparent": CLIENT_TRACEPARENT},
        )
        assert published.status == 201
        message_id = (await published.json())["id"]
        group = f"g{time.monotonic_ns()}"
        consumed = await gateway.get(
            f"/bus/topics/traced/subscriptions/{group}/messages?consumer=c&max=50",
            headers=credential,
        )
        body = await consumed.json()
        assert consumed.status == 200, body
        [mine] = [m for m in body["messages"] if m["id"] == message_id]
        upstream = next(s for s in spans.get_finished_spans() if s.name == "upstream bus")
        assert mine["envelope"]["traceparent"] == (
            f"00-{CLIENT_TRACE}-{upstream.context.span_id:016x}-01"
        )


BAD_CONFIG = [
    ("metrics-port", {"metrics": {"port": 70000}}, "metrics.port"),
    ("metrics-host", {"metrics": {"host": ""}}, "metrics.host"),
    ("ratio-above-one", {"tracing": {"sample_ratio": 1.5}}, "tracing.sample_ratio"),
    ("unknown-exporter", {"tracing": {"exporter": "jaeger"}}, "tracing.exporter"),
    (
        "endpoint-credentials",
        {"tracing": {"endpoint": "http://u:p@collector:4318/v1/traces"}},
        "tracing.endpoint",
    ),
    ("no-service-name", {"tracing": {"service_name": ""}}, "tracing.service_name"),
]


class TestConfig:
    @pytest.mark.parametrize(
        ("table", "key"), [case[1:] for case in BAD_CONFIG], ids=[case[0] for case in BAD_CONFIG]
    )
    def test_bad_values_name_their_key(self, table: dict[str, Any], key: str) -> None:
        """check-config names the [metrics]/[tracing] key at fault."""
        with pytest.raises(ConfigError) as raised:
            parse_config({"version": 1, **table})
        assert raised.value.key == key

    def test_defaults_are_off(self) -> None:
        """No listener and no tracer unless configured."""
        config = parse_config({"version": 1})
        assert not config.metrics.enabled
        assert config.tracing.exporter == "none"
        assert Telemetry.for_config(config, Metrics()) is None


class _Collector(http.server.BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector: keeps each POSTed body."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A real HTTP server in its own thread (the exporter's thread blocks on it)."""
    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", _Collector.received
    server.shutdown()
    server.server_close()


class TestOtlpExport:
    async def test_spans_reach_the_collector_by_shutdown(
        self,
        make_gateway: GatewayFactory,
        otlp_collector: tuple[str, list[tuple[str, str, bytes]]],
    ) -> None:
        """exporter = "otlp" batches spans and flushes them when the gateway stops."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        endpoint, received = otlp_collector
        gateway = await make_gateway(
            tracing={"exporter": "otlp", "endpoint": endpoint, "service_name": "gw-under-test"}
        )
        response = await gateway.get("/echo/x", headers={"traceparent": CLIENT_TRACEPARENT})
        assert response.status == 200
        await gateway.close()  # the batch processor flushes at shutdown
        names: set[str] = set()
        services: set[str] = set()
        for path, content_type, body in received:
            assert path == "/v1/traces"
            assert content_type == "application/x-protobuf"
            export = ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        services.add(attribute.value.string_value)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        names.add(span.name)
                        assert span.trace_id.hex() == CLIENT_TRACE
        assert services == {"gw-under-test"}
        assert {"GET echo", "stage decision", "policy.decide", "upstream echo"} <= names
