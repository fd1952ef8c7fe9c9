"""Prometheus instruments on a per-app registry, and the in-process counters exported beside them.

Each gateway app owns one :class:`prometheus_client.CollectorRegistry`, so
many gateways in one process (the test suite) never share or clash over a
series. Two kinds of series live on it:

* instruments updated on the request path (``requests_total``, the duration
  histograms, ``ratelimit_hits_total``). Label children are cached in plain
  dicts keyed by their (bounded) label values, so a request pays a dict
  lookup, not ``labels()``'s validation and lock;
* the counters :class:`gateway.metrics.Metrics` already keeps (denials,
  decision cache, shadow policies, egress report mode, rate-limit fallback),
  read at scrape time by :class:`_InProcessCollector`, so the code that
  counts them (and the tests and the admin plane that read them) stays as
  it is, and nothing is counted twice.

Every label value comes from configuration or code (route names, tenant ids,
stage names, error and reason codes), never from request data: unknown
values fold into ``"none"``, ``"unknown"`` or ``"other"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.circuit import CircuitState
from gateway.metrics import Metrics

__all__ = ["LATENCY_BUCKETS", "PREFIX", "GatewayInstruments"]

PREFIX: Final = "nops_gateway_"
#: Seconds, from 100 µs (a cached decision) to 10 s (a slow upstream).
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Circuits by (route name) -> breakers whose states are counted at scrape time.
CircuitSource = Callable[[], Iterable[tuple[str, Iterable[CircuitState]]]]
#: Dependencies by name -> True while degraded, read at scrape time.
DegradedSource = Callable[[], dict[str, bool]]


class GatewayInstruments:
    """The instruments of one app, on its own registry."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        route_names: Iterable[str],
        tenant_ids: Iterable[str],
    ) -> None:
        self.registry = CollectorRegistry()
        self._routes = frozenset(route_names)
        self._tenants = frozenset(tenant_ids)
        registry = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "Requests answered, by configured route, status code and configured tenant.",
            ("route", "status", "tenant"),
            registry=registry,
        )
        self.ratelimit_hits = Counter(
            PREFIX + "ratelimit_hits",
            "Requests refused by a rate limit (429), by configured tenant.",
            ("tenant",),
            registry=registry,
        )
        self.stage_duration = Histogram(
            PREFIX + "stage_duration_seconds",
            "Time spent in each pipeline stage (the route stage includes the upstream).",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.policy_decision = Histogram(
            PREFIX + "policy_decision_seconds",
            "Time to a policy decision, decision cache included.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audit_durability = Histogram(
            PREFIX + "audit_durability_seconds",
            "Time from appending an audit record to it being durable (group commit).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            PREFIX + "upstream_duration_seconds",
            "Time from sending a request upstream to its response headers, by route.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audit_queue_depth = Gauge(
            PREFIX + "audit_queue_depth",
            "Audit records waiting for the writer's next group commit.",
            registry=registry,
        )
        self._in_process = _InProcessCollector(metrics)
        registry.register(self._in_process)
        # Cached label children: the request path never calls labels().
        self._request_children: dict[tuple[str, int, str], Counter] = {}
        self._stage_children: dict[str, Histogram] = {}
        self._upstream_children: dict[str, Histogram] = {}
        self._ratelimit_children: dict[str, Counter] = {}

    # -- label values ----------------------------------------------------------

    def route_label(self, name: str | None) -> str:
        return name if name is not None and name in self._routes else "none"

    def tenant_label(self, tenant: str | None) -> str:
        if tenant is None:
            return "unknown"
        return tenant if tenant in self._tenants else "other"

    # -- the request path ------------------------------------------------------

    def count_request(self, route: str | None, status: int, tenant: str | None) -> None:
        key = (route or "none", status, tenant or "unknown")
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(
                self.route_label(route), str(status), self.tenant_label(tenant)
            )
            self._request_children[key] = child
        child.inc()

    def count_ratelimit_hit(self, tenant: str | None) -> None:
        key = tenant or "unknown"
        child = self._ratelimit_children.get(key)
        if child is None:
            child = self._ratelimit_children[key] = self.ratelimit_hits.labels(
                self.tenant_label(tenant)
            )
        child.inc()

    def stage_histogram(self, stage: str) -> Histogram:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_duration.labels(stage)
        return child

    def upstream_histogram(self, route: str) -> Histogram:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self.upstream_duration.labels(
                self.route_label(route)
            )
        return child

    # -- scrape-time sources ---------------------------------------------------

    def watch_circuits(self, source: CircuitSource) -> None:
        self._in_process.circuits = source

    def watch_degraded(self, source: DegradedSource) -> None:
        self._in_process.degraded = source

    def watch_audit_queue(self, depth: Callable[[], int]) -> None:
        self.audit_queue_depth.set_function(lambda: float(depth()))


class _InProcessCollector(Collector):
    """Exports :class:`Metrics` and scrape-time state (circuits, degraded dependencies)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.circuits: CircuitSource | None = None
        self.degraded: DegradedSource | None = None

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        denials = CounterMetricFamily(
            PREFIX + "denials",
            "Requests ended by a problem response, by stage and error code.",
            labels=("stage", "code"),
        )
        for (stage, code), n in sorted(m.denials.items()):
            denials.add_metric((stage, code), n)
        yield denials
        reasons = CounterMetricFamily(
            PREFIX + "denial_reasons",
            "Denial reasons (from code or policy; at most MAX_DENIAL_REASONS, then 'other').",
            labels=("stage", "reason"),
        )
        for (stage, reason), n in sorted(m.denial_reasons.items()):
            reasons.add_metric((stage, reason), n)
        yield reasons
        cache = CounterMetricFamily(
            PREFIX + "decision_cache",
            "Decision cache lookups by outcome: hit, miss, uncacheable; flush counts emptyings.",
            labels=("outcome",),
        )
        for outcome, n in sorted(m.decision_cache.items()):
            cache.add_metric((outcome,), n)
        yield cache
        shadow = CounterMetricFamily(
            PREFIX + "shadow_evaluations",
            "Shadow policy evaluations by outcome: agree, disagree, error, skipped.",
            labels=("outcome",),
        )
        for outcome, n in sorted(m.shadow_evaluations.items()):
            shadow.add_metric((outcome,), n)
        yield shadow
        disagreements = CounterMetricFamily(
            PREFIX + "shadow_disagreements",
            "Shadow disagreements by enforced and shadow answer and reason.",
            labels=("enforced", "shadow", "reason"),
        )
        for (enforced, shadow_allow, reason), n in sorted(m.shadow_disagreements.items()):
            disagreements.add_metric((_allow(enforced), _allow(shadow_allow), reason), n)
        yield disagreements
        would_deny = CounterMetricFamily(
            PREFIX + "egress_would_deny",
            "Egress requests report mode let through, by the reason enforce mode would deny.",
            labels=("reason",),
        )
        for reason, n in sorted(m.egress_would_deny.items()):
            would_deny.add_metric((reason,), n)
        yield would_deny
        storage_errors = CounterMetricFamily(
            PREFIX + "ratelimit_storage_errors",
            "Rate-limit storage failures, each answered from the per-node memory fallback.",
        )
        storage_errors.add_metric((), m.ratelimit_storage_errors)
        yield storage_errors
        degraded = GaugeMetricFamily(
            PREFIX + "degraded",
            "1 while a dependency runs degraded (ratelimit: memory fallback; audit: spooling;"
            " policy: engine unhealthy).",
            labels=("dependency",),
        )
        states = {"ratelimit": m.ratelimit_degraded}
        if self.degraded is not None:
            states.update(self.degraded())
        for dependency, flag in sorted(states.items()):
            degraded.add_metric((dependency,), 1.0 if flag else 0.0)
        yield degraded
        circuits = GaugeMetricFamily(
            PREFIX + "circuit_state",
            "Upstream circuits (agent endpoints, egress destinations) by route and state.",
            labels=("route", "state"),
        )
        if self.circuits is not None:
            for route, breaker_states in self.circuits():
                counts = dict.fromkeys(CircuitState, 0)
                for state in breaker_states:
                    counts[state] += 1
                for state, n in counts.items():
                    circuits.add_metric((route, state.value), n)
        yield circuits


def _allow(value: bool) -> str:
    return "allow" if value else "deny"
