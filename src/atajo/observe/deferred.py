"""What the deferred lane spent and saved, recorded per request.

``DeferredMetrics.record`` is the one function the lane's worker hands each request's :class:`DeferredCost`
to. It feeds Prometheus today; the cost ledger (being built apart) is meant to take the same records, by
pointing the worker's ``record`` at a function that calls both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import Metric

from atajo.core.batches import DeferredCost
from atajo.observe.metrics import Counter


class DeferredMetrics:
    def __init__(self, model_label: Callable[[str | None], str]) -> None:
        self.model_label = model_label
        self.requests = Counter(
            "atajo_batch_requests",
            "Deferred (batch) requests answered, by how they went upstream: batch_api or pipeline",
            ["gen_ai_request_model", "path"],
        )
        self.spend = Counter(
            "atajo_batch_spend_micros",
            "Cost of deferred requests at the price paid (the provider's batch price through a Batch API), in "
            "millionths of the catalog currency",
            ["gen_ai_request_model"],
        )
        self.saved = Counter(
            "atajo_batch_saved_micros",
            "What deferred requests saved against the synchronous price (the Batch API discount), in millionths "
            "of the catalog currency",
            ["gen_ai_request_model"],
        )

    def record(self, cost: DeferredCost) -> None:
        model = self.model_label(cost.model)
        self.requests.labels(model, "batch_api" if cost.via_batch_api else "pipeline").inc()
        self.spend.labels(model).inc(cost.cost_micros)
        self.saved.labels(model).inc(cost.saved_micros)

    def collect(self) -> Iterable[Metric]:
        return [self.requests.collect(), self.spend.collect(), self.saved.collect()]
