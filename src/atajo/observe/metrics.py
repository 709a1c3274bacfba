"""All of the gateway's Prometheus metrics, in one registry owned by the app (no global state).

Names follow Prometheus conventions (``_total``, ``_seconds``) and the OpenTelemetry GenAI semantic
conventions where one exists (``gen_ai_client_operation_duration_seconds``,
``gen_ai_client_token_usage``, ``gen_ai_server_time_to_first_token_seconds``).
Labels never carry secrets or client-chosen strings: unknown model names are reported as ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
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
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class GatewayMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double every counter's output for no reader
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "atajo_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "atajo_request_duration_seconds",
            "Time from request received to response ready (streams: to the last chunk)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "atajo_gateway_overhead_seconds",
            "Time the gateway itself added (total minus waiting on providers)",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "atajo_errors", "Errors answered to clients, by error code", ["route", "code"], registry=r
        )
        self.in_flight = Gauge("atajo_requests_in_flight", "Requests being handled now", registry=r)
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration, as the gateway saw it",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name", "error_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per operation (input or output)",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["gen_ai_request_model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "atajo_upstream_attempts",
            "Calls to provider deployments, by outcome (ok or error code)",
            ["provider", "deployment", "outcome"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "atajo_upstream_attempt_duration_seconds",
            "Duration of one call to a deployment (to first chunk for streams)",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter("atajo_upstream_retries", "Retries of the same deployment", ["deployment"], registry=r)
        self.fallbacks = Counter(
            "atajo_upstream_fallbacks",
            "Moves to the next deployment or fallback model",
            ["deployment"],
            registry=r,
        )
        self.spend = Counter(
            "atajo_spend_micros",
            "Cost of answers at catalog prices, in millionths of the catalog currency",
            ["gen_ai_request_model"],
            registry=r,
        )
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
