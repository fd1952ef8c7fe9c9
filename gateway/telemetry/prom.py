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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, TypeVar

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
        by_label: Counter[tuple[str, str, str]] = Counter()
        for (route, status, tenant), n in list(inst.requests.items()):
            by_label[(inst.route_label(route), str(status), inst.tenant_label(tenant))] += n
        yield _family(
            CounterMetricFamily,
            "requests",
            "Requests answered, by configured route, status code and configured tenant.",
            ("route", "status", "tenant"),
            sorted(by_label.items()),
        )
        hits_by_label: Counter[str] = Counter()
        for tenant, n in list(inst.ratelimit_hits.items()):
            hits_by_label[inst.tenant_label(tenant)] += n
        yield _family(
            CounterMetricFamily,
            "ratelimit_hits",
            "Requests refused by a rate limit (429), by configured tenant.",
            ("tenant",),
            _by_one(hits_by_label),
        )
        yield _histograms(
            "stage_duration_seconds",
            "Time spent in each pipeline stage (the route stage includes the upstream).",
            ("stage",),
            _by_one(inst.stage_duration),
        )
        yield _histograms(
            "upstream_duration_seconds",
            "Time from sending a request upstream to its response headers, by route.",
            ("route",),
            _by_one(inst.upstream_duration),
        )
        yield _histograms(
            "policy_decision_seconds",
            "Time to a policy decision, decision cache included.",
            (),
            [((), inst.policy_decision)],
        )
        yield _histograms(
            "audit_durability_seconds",
            "Time from appending an audit record to it being durable (group commit).",
            (),
            [((), inst.audit_durability)],
        )
        yield _family(
            GaugeMetricFamily,
            "audit_queue_depth",
            "Audit records waiting for the writer's next group commit.",
            (),
            [((), float(self.audit_queue()) if self.audit_queue is not None else 0.0)],
        )

    def _counters(self) -> Iterator[Metric]:
        m = self._metrics
        yield _family(
            CounterMetricFamily,
            "denials",
            "Requests ended by a problem response, by stage and error code.",
            ("stage", "code"),
            sorted(m.denials.items()),
        )
        yield _family(
            CounterMetricFamily,
            "denial_reasons",
            "Denial reasons (from code or policy; at most MAX_DENIAL_REASONS, then 'other').",
            ("stage", "reason"),
            sorted(m.denial_reasons.items()),
        )
        yield _family(
            CounterMetricFamily,
            "decision_cache",
            "Decision cache lookups by outcome: hit, miss, uncacheable; flush counts emptyings.",
            ("outcome",),
            _by_one(m.decision_cache),
        )
        yield _family(
            CounterMetricFamily,
            "shadow_evaluations",
            "Shadow policy evaluations by outcome: agree, disagree, error, skipped.",
            ("outcome",),
            _by_one(m.shadow_evaluations),
        )
        yield _family(
            CounterMetricFamily,
            "shadow_disagreements",
            "Shadow disagreements by enforced and shadow answer and reason.",
            ("enforced", "shadow", "reason"),
            [
                ((_allow(enforced), _allow(shadow_allow), reason), n)
                for (enforced, shadow_allow, reason), n in sorted(m.shadow_disagreements.items())
            ],
        )
        yield _family(
            CounterMetricFamily,
            "egress_would_deny",
            "Egress requests report mode let through, by the reason enforce mode would deny.",
            ("reason",),
            _by_one(m.egress_would_deny),
        )
        yield _family(
            CounterMetricFamily,
            "ratelimit_storage_errors",
            "Rate-limit storage failures, each answered from the per-node memory fallback.",
            (),
            [((), m.ratelimit_storage_errors)],
        )
        states = {"ratelimit": m.ratelimit_degraded}
        if self.degraded is not None:
            states.update(self.degraded())
        yield _family(
            GaugeMetricFamily,
            "degraded",
            "1 while a /_readyz check is not ok (on a fallback, or down): opa, audit, redis,"
            " postgres, ratelimit, registry.",
            ("dependency",),
            [((dependency,), 1.0 if flag else 0.0) for dependency, flag in sorted(states.items())],
        )
        circuit_states: list[tuple[tuple[str, str], float]] = []
        if self.circuits is not None:
            for route, breaker_states in self.circuits():
                counts = dict.fromkeys(CircuitState, 0)
                for state in breaker_states:
                    counts[state] += 1
                circuit_states.extend(((route, state.value), n) for state, n in counts.items())
        yield _family(
            GaugeMetricFamily,
            "circuit_state",
            "Upstream circuits (agent endpoints, egress destinations) by route and state.",
            ("route", "state"),
            circuit_states,
        )


_T = TypeVar("_T")
_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)


def _family(
    kind: type[_Family],
    name: str,
    doc: str,
    labels: Sequence[str],
    samples: Iterable[tuple[Sequence[str], float]],
) -> _Family:
    """A counter or gauge family ``PREFIX + name`` with one sample per (label values, value)."""
    family = kind(PREFIX + name, doc, labels=labels)
    for label_values, value in samples:
        family.add_metric(label_values, value)
    return family


def _histograms(
    name: str,
    doc: str,
    labels: Sequence[str],
    samples: Iterable[tuple[Sequence[str], _Histogram]],
) -> HistogramMetricFamily:
    """A histogram family ``PREFIX + name`` with one histogram per label values."""
    family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for label_values, histogram in samples:
        family.add_metric(label_values, histogram.buckets(), histogram.sum)
    return family


def _by_one(values: Mapping[str, _T]) -> list[tuple[tuple[str], _T]]:
    """``values`` by key, each key the one label value."""
    return [((key,), value) for key, value in sorted(values.items())]


def _allow(value: bool) -> str:
    return "allow" if value else "deny"
