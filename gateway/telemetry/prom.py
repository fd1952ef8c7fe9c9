"""Prometheus series of one app: plain counters on the request path, formatted at scrape time.

Each gateway app owns one :class:`prometheus_client.CollectorRegistry`, so
many gateways in one process (the test suite) never share or clash over a
series. The request path never touches prometheus-client: it adds to plain
ints and lists (one event loop, so no locks), a :class:`_Histogram` finds its
bucket with :func:`bisect.bisect_left`, and one collector turns everything
into metric families when ``/metrics`` is scraped (which runs on the same
event loop). prometheus-client's own ``Counter``/``Histogram`` take a lock
per increment and cost ~1 µs per observation, ten times this. The same
collector exports the counters :class:`gateway.metrics.Metrics` already
keeps (denials, decision cache, shadow policies, egress report mode,
rate-limit fallback), so the code that counts them, and the tests and the
admin plane that read them, stay as they are.

Every label value comes from configuration or code (route names, tenant ids,
stage names, error and reason codes), never from request data: unknown
values fold into ``"none"``, ``"unknown"`` or ``"other"`` at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


class _Histogram:
    """Bucket counts and a sum; ``observe`` is a bisect and two additions."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._bounds = tuple(bounds)
        #: Per bucket (not cumulative); the last one is +Inf.
        self.counts = [0] * (len(self._bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, ending with +Inf."""
        total = 0
        pairs: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, self._bounds), "+Inf"), self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


class GatewayInstruments:
    """The request-path counters of one app and the registry that exports them."""

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
        #: Requests by (route name or None, status, tenant id or None).
        self.requests: Counter[tuple[str | None, int, str | None]] = Counter()
        self.ratelimit_hits: Counter[str | None] = Counter()
        self.stage_duration: dict[str, _Histogram] = {}
        #: By route label (a configured route name, or "none").
        self.upstream_duration: dict[str, _Histogram] = {}
        self.policy_decision = _Histogram()
        self.audit_durability = _Histogram()
        self._in_process = _InProcessCollector(self, metrics)
        self.registry.register(self._in_process)

    # -- label values (applied at scrape time) -----------------------------------

    def route_label(self, name: str | None) -> str:
        return name if name is not None and name in self._routes else "none"

    def tenant_label(self, tenant: str | None) -> str:
        if tenant is None:
            return "unknown"
        return tenant if tenant in self._tenants else "other"

    # -- the request path ------------------------------------------------------

    def count_request(self, route: str | None, status: int, tenant: str | None) -> None:
        self.requests[(route, status, tenant)] += 1

    def count_ratelimit_hit(self, tenant: str | None) -> None:
        self.ratelimit_hits[tenant] += 1

    def stage_histogram(self, stage: str) -> _Histogram:
        histogram = self.stage_duration.get(stage)
        if histogram is None:
            histogram = self.stage_duration[stage] = _Histogram()
        return histogram

    def upstream_histogram(self, route: str) -> _Histogram:
        label = route if route in self._routes else "none"
        histogram = self.upstream_duration.get(label)
        if histogram is None:
            histogram = self.upstream_duration[label] = _Histogram()
        return histogram

    # -- scrape-time sources ---------------------------------------------------

    def watch_circuits(self, source: CircuitSource) -> None:
        self._in_process.circuits = source

    def watch_degraded(self, source: DegradedSource) -> None:
        self._in_process.degraded = source

    def watch_audit_queue(self, depth: Callable[[], int]) -> None:
        self._in_process.audit_queue = depth


class _InProcessCollector(Collector):
    """Exports :class:`Metrics` and scrape-time state (circuits, degraded dependencies)."""

    def __init__(self, instruments: GatewayInstruments, metrics: Metrics) -> None:
        self._instruments = instruments
        self._metrics = metrics
        self.circuits: CircuitSource | None = None
        self.degraded: DegradedSource | None = None
        self.audit_queue: Callable[[], int] | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._request_path()
        yield from self._counters()

    def _request_path(self) -> Iterator[Metric]:
        inst = self._instruments
        requests = CounterMetricFamily(
            PREFIX + "requests",
            "Requests answered, by configured route, status code and configured tenant.",
            labels=("route", "status", "tenant"),
        )
        by_label: Counter[tuple[str, str, str]] = Counter()
        for (route, status, tenant), n in list(inst.requests.items()):
            by_label[(inst.route_label(route), str(status), inst.tenant_label(tenant))] += n
        for labels, n in sorted(by_label.items()):
            requests.add_metric(labels, n)
        yield requests
        hits = CounterMetricFamily(
            PREFIX + "ratelimit_hits",
            "Requests refused by a rate limit (429), by configured tenant.",
            labels=("tenant",),
        )
        hits_by_label: Counter[str] = Counter()
        for tenant, n in list(inst.ratelimit_hits.items()):
            hits_by_label[inst.tenant_label(tenant)] += n
        for tenant_label, n in sorted(hits_by_label.items()):
            hits.add_metric((tenant_label,), n)
        yield hits
        stages = HistogramMetricFamily(
            PREFIX + "stage_duration_seconds",
            "Time spent in each pipeline stage (the route stage includes the upstream).",
            labels=("stage",),
        )
        for stage, histogram in sorted(inst.stage_duration.items()):
            stages.add_metric((stage,), histogram.buckets(), histogram.sum)
        yield stages
        upstream = HistogramMetricFamily(
            PREFIX + "upstream_duration_seconds",
            "Time from sending a request upstream to its response headers, by route.",
            labels=("route",),
        )
        for route, histogram in sorted(inst.upstream_duration.items()):
            upstream.add_metric((route,), histogram.buckets(), histogram.sum)
        yield upstream
        for name, doc, histogram in (
            (
                "policy_decision_seconds",
                "Time to a policy decision, decision cache included.",
                inst.policy_decision,
            ),
            (
                "audit_durability_seconds",
                "Time from appending an audit record to it being durable (group commit).",
                inst.audit_durability,
            ),
        ):
            family = HistogramMetricFamily(PREFIX + name, doc)
            family.add_metric((), histogram.buckets(), histogram.sum)
            yield family
        depth = GaugeMetricFamily(
            PREFIX + "audit_queue_depth",
            "Audit records waiting for the writer's next group commit.",
        )
        depth.add_metric((), float(self.audit_queue()) if self.audit_queue is not None else 0.0)
        yield depth

    def _counters(self) -> Iterator[Metric]:
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
            "1 while a /_readyz check is not ok (on a fallback, or down): opa, audit, redis,"
            " postgres, ratelimit, registry.",
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
