"""All of the gateway's Prometheus metrics, in one registry owned by the app (no global state).

Names follow Prometheus conventions (``_total``, ``_seconds``) and the OpenTelemetry GenAI semantic
conventions where one exists (``gen_ai_client_operation_duration_seconds``,
``gen_ai_client_token_usage``, ``gen_ai_server_time_to_first_token_seconds``).
Labels never carry secrets or client-chosen strings: unknown model names are reported as ``other``.

Recording is done by the small lock-free types below rather than prometheus-client's own: every metric is
touched only from its process's event loop, so the locks and per-call label resolution of the library's
types were pure cost on the hot path (the hot-path work is measured in docs/benchmarks.md).
prometheus-client still does the exposition, from a collector.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


Child = TypeVar("Child")


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1  # bucket i holds values <= buckets[i]
        self.sum += value


class _Labelled(Generic[Child]):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new()
        return child

    def _new(self) -> Child:
        raise NotImplementedError


class Counter(_Labelled[_CounterChild]):
    def _new(self) -> _CounterChild:
        return _CounterChild()

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        return family


class Histogram(_Labelled[_HistogramChild]):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, doc, labelnames)
        self.buckets = tuple(float(b) for b in buckets)

    def _new(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        bounds = [*(str(b) for b in self.buckets), "+Inf"]
        for values, child in self._children.items():
            cumulative, running = [], 0
            for bound, count in zip(bounds, child.counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            family.add_metric(list(values), cumulative, child.sum)
        return family


class Gauge:
    """An unlabelled gauge kept as a plain number."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.value = 0.0

    def collect(self) -> Metric:
        return GaugeMetricFamily(self.name, self.doc, value=self.value)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


CACHE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
FRACTION_BUCKETS = (0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1)


class CacheMetrics:
    """What the cache's tier chain reports (it implements ``atajo.cache.tiers.CacheObserver``)."""

    def __init__(self) -> None:
        self.lookups = Counter(
            "atajo_cache_lookups",
            "Cache lookups per tier, by outcome (hit, stale, miss, error, skipped)",
            ["tier", "outcome"],
        )
        self.lookup_duration = Histogram(
            "atajo_cache_lookup_duration_seconds", "Time of one lookup in one tier", ["tier"], CACHE_BUCKETS
        )
        self.writes = Counter(
            "atajo_cache_writes",
            "Writes behind the response, by outcome (ok, error, dropped, vetoed)",
            ["tier", "outcome"],
        )
        self.failures = Counter(
            "atajo_cache_tier_failures",
            "Tier operations that failed or timed out (the tier is then skipped)",
            ["tier", "operation"],
        )
        self.invalidated = Counter("atajo_cache_invalidated_entries", "Entries dropped by invalidations", ["tier"])
        self.invalidated_fraction = Histogram(
            "atajo_cache_invalidation_fraction",
            "Share of a tier's entries one invalidation dropped",
            ["tier"],
            FRACTION_BUCKETS,
        )
        self.semantic_decisions = Counter(
            "atajo_cache_semantic_decisions",
            "Semantic tier lookups by the match decision's outcome (hit, or why not: below_threshold, ambiguous, "
            "numbers, negation, below_floor, empty, error)",
            ["outcome"],
        )
        self.embed_batch = Histogram(
            "atajo_cache_semantic_embed_batch_size",
            "Texts embedded together in one run of the semantic tier's model",
            [],
            (1, 2, 4, 8, 16, 32),
        )
        self.own: list[Counter | Histogram] = [
            self.lookups,
            self.lookup_duration,
            self.writes,
            self.failures,
            self.invalidated,
            self.invalidated_fraction,
            self.semantic_decisions,
            self.embed_batch,
        ]
        self.semantic = SemanticMetrics(self)

    def lookup(self, tier: str, outcome: str, seconds: float) -> None:
        self.lookups.labels(tier, outcome).inc()
        if outcome != "skipped":
            self.lookup_duration.labels(tier).observe(seconds)

    def write(self, tier: str, outcome: str) -> None:
        self.writes.labels(tier, outcome).inc()

    def invalidation(self, tier: str, dropped: int, fraction: float) -> None:
        self.invalidated.labels(tier).inc(dropped)
        self.invalidated_fraction.labels(tier).observe(fraction)

    def failure(self, tier: str, operation: str) -> None:
        self.failures.labels(tier, operation).inc()


class SemanticMetrics:
    """What the semantic tier reports (``atajo.cache.semantic.tier.SemanticObserver``), in the cache's
    families under ``tier="semantic"`` plus its own decision and batch-size families."""

    def __init__(self, cache: CacheMetrics) -> None:
        self._cache = cache

    def lookup(self, outcome: str, seconds: float) -> None:
        self._cache.semantic_decisions.labels(outcome).inc()
        self._cache.lookups.labels(
            "semantic", "hit" if outcome == "hit" else "error" if outcome == "error" else "miss"
        ).inc()
        self._cache.lookup_duration.labels("semantic").observe(seconds)

    def embed_batch(self, size: int) -> None:
        self._cache.embed_batch.labels().observe(size)

    def write(self, outcome: str) -> None:
        self._cache.writes.labels("semantic", outcome).inc()


BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


class CoalesceMetrics:
    """What the coalesce stage's batcher and lease report (``BatchObserver``, ``LeaseObserver``)."""

    def __init__(self) -> None:
        self.batch_size = Histogram(
            "atajo_coalesce_batch_size", "Requests sent together in one upstream call, per batch", ["cause"],
            BATCH_SIZE_BUCKETS,
        )  # fmt: skip
        self.batch_wait = Histogram(
            "atajo_coalesce_added_wait_seconds",
            "Time a request waited for its batch to be sent (the latency batching added)",
            ["cause"],
            WAIT_BUCKETS,
        )
        self.leases = Counter(
            "atajo_coalesce_leases",
            "Cross-instance leases, by outcome (acquired, waited_hit, waited_timeout, error)",
            ["outcome"],
        )
        self.own: list[Counter | Histogram] = [self.batch_size, self.batch_wait, self.leases]

    def batch(self, items: int, waits_s: Sequence[float]) -> None:
        self.batch_size.labels("batching").observe(items)
        wait = self.batch_wait.labels("batching")
        for seconds in waits_s:
            wait.observe(seconds)

    def lease(self, outcome: str) -> None:
        self.leases.labels(outcome).inc()


class BudgetMetrics:
    """What budgets report (``atajo.budget.budgets.BudgetObserver``)."""

    def __init__(self) -> None:
        self.rejections = Counter(
            "atajo_budget_rejections", "Requests refused because a budget would be exceeded", ["budget"]
        )
        self.alerts = Counter("atajo_budget_alerts", "Budgets passing their soft limit (alert_at)", ["budget"])
        self.store_errors = Counter(
            "atajo_budget_store_errors", "Budget store calls that failed, by operation (reserve, settle)", ["operation"]
        )
        self._used: dict[tuple[str, str], tuple[int, int]] = {}
        self.own: list[Counter | Histogram] = [self.rejections, self.alerts, self.store_errors]

    def rejected(self, budget: str) -> None:
        self.rejections.labels(budget).inc()

    def alert(self, budget: str) -> None:
        self.alerts.labels(budget).inc()

    def used(self, budget: str, unit: str, value: int, limit: int) -> None:
        self._used[budget, unit] = (value, limit)

    def store_error(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    def collect_used(self) -> Iterable[Metric]:
        yield gauge_family(
            "atajo_budget_used_ratio",
            "Share of each budget spent or reserved in its current window, as last seen by this instance",
            ["budget", "unit"],
            [([b, u], value / limit if limit else 0.0) for (b, u), (value, limit) in self._used.items()],
        )


class LedgerMetrics:
    """What the cost ledger reports (``atajo.observe.ledger.LedgerObserver``)."""

    def __init__(self) -> None:
        self.written = Counter("atajo_ledger_records_written", "Ledger rows written to the database", [])
        self.failures = Counter(
            "atajo_ledger_write_failures", "Ledger batch writes that failed (their rows wait for the next try)", []
        )
        self.dropped = Counter("atajo_ledger_dropped", "Ledger rows dropped: too many waiting to be written", [])
        self.own: list[Counter | Histogram] = [self.written, self.failures, self.dropped]

    def ledger_written(self, rows: int) -> None:
        self.written.labels().inc(rows)

    def ledger_failed(self) -> None:
        self.failures.labels().inc()

    def ledger_dropped(self, rows: int) -> None:
        self.dropped.labels().inc(rows)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.guard_flags = Counter(
            "atajo_guard_flags",
            "Requests the guard flagged, by kind (prompt_injection_override, _reveal, _persona, _mode, _delimiter)",
            ["kind"],
        )
        self.requests = Counter(
            "atajo_requests", "HTTP requests answered, by route and status code", ["route", "status"]
        )
        self.request_duration = Histogram(
            "atajo_request_duration_seconds",
            "Time from request received to response ready (streams: to the last chunk)",
            ["route"],
            LATENCY_BUCKETS,
        )
        self.overhead = Histogram(
            "atajo_gateway_overhead_seconds",
            "Time the gateway itself added (total minus waiting on providers)",
            ["route"],
            OVERHEAD_BUCKETS,
        )
        self.errors = Counter("atajo_errors", "Errors answered to clients, by error code", ["route", "code"])
        self.in_flight = Gauge("atajo_requests_in_flight", "Requests being handled now")
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration, as the gateway saw it",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name", "error_type"],
            LATENCY_BUCKETS,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per operation (input or output)",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            TOKEN_BUCKETS,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["gen_ai_request_model"],
            LATENCY_BUCKETS,
        )
        self.attempts = Counter(
            "atajo_upstream_attempts",
            "Calls to provider deployments, by outcome (ok or error code)",
            ["provider", "deployment", "outcome"],
        )
        self.attempt_duration = Histogram(
            "atajo_upstream_attempt_duration_seconds",
            "Duration of one call to a deployment (to first chunk for streams)",
            ["provider"],
            LATENCY_BUCKETS,
        )
        self.retries = Counter("atajo_upstream_retries", "Retries of the same deployment", ["deployment"])
        self.fallbacks = Counter(
            "atajo_upstream_fallbacks", "Moves to the next deployment or fallback model", ["deployment"]
        )
        self.spend = Counter(
            "atajo_spend_micros",
            "Cost of answers at catalog prices, in millionths of the catalog currency",
            ["gen_ai_request_model"],
        )
        self.cache_saved = Counter(
            "atajo_cache_saved_micros",
            "What answers served from the cache would have cost at catalog prices, in millionths of the currency",
            ["gen_ai_request_model"],
        )
        self.route_decisions = Counter(
            "atajo_route_decisions",
            "Requests for a routed name (model: auto), by that name and the model chosen",
            ["group", "gen_ai_request_model"],
        )
        self.cascade = Counter(
            "atajo_route_cascade",
            "Cascaded requests by outcome: kept (the cheap answer passed its checks), or the check that escalated",
            ["outcome"],
        )
        self.cache = CacheMetrics()
        self.coalesce = CoalesceMetrics()
        self.budget = BudgetMetrics()
        self.ledger = LedgerMetrics()
        self._own: list[Counter | Histogram | Gauge] = [
            self.requests, self.request_duration, self.overhead, self.errors, self.in_flight,
            self.operation_duration, self.token_usage, self.ttft, self.attempts, self.attempt_duration,
            self.retries, self.fallbacks, self.spend, self.cache_saved, self.route_decisions, self.cascade,
            self.guard_flags, *self.cache.own, *self.coalesce.own, *self.budget.own, *self.ledger.own,
        ]  # fmt: skip
        self.add_collector(lambda: (m.collect() for m in self._own))
        self.add_collector(self.budget.collect_used)
        self._model_names: frozenset[str] = frozenset()

    def set_model_names(self, names: Iterable[str]) -> None:
        self._model_names = frozenset(names)

    def model_label(self, model: str | None) -> str:
        return model if model in self._model_names else "other"

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register a callback that reports state owned elsewhere (pool, breakers) at scrape time."""
        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def counter_family(name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def gauge_family(name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family
