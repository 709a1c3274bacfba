"""Outermost stage: GenAI-level measurements of every request that reached the pipeline, and its ledger row.

HTTP-level figures (status codes, the gateway's own added time) are recorded by the server, which also
sees requests rejected before the pipeline (bad JSON, oversized bodies, unknown keys); those reach neither
the metrics here nor the ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

from atajo.core.catalog import Catalog, ModelInfo
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError
from atajo.observe.ledger import Ledger, LedgerRecord
from atajo.observe.metrics import GatewayMetrics
from atajo.types import JSONObject


class ObserveStage:
    name = "observe"

    def __init__(
        self,
        metrics: GatewayMetrics,
        catalog: Catalog,
        *,
        ledger: Ledger | None = None,
        baseline: Callable[[str], ModelInfo | None] | None = None,
        routed: frozenset[str] = frozenset(),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.catalog = catalog
        self.ledger = ledger
        self.baseline = baseline or (lambda _: None)
        """The requested model name → the catalog entry its baseline cost is priced at (for a routed name:
        its ``baseline`` model)."""
        self.routed = routed
        self.wall_clock = wall_clock

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        try:
            result = await call_next(request, ctx)
        except AtajoError as err:
            self._operation(request, ctx, err.code or err.type)
            self._record(request, ctx, None, err.code or err.type)
            raise
        except asyncio.CancelledError:
            self._record(request, ctx, None, "cancelled")
            raise
        except Exception:
            self._record(request, ctx, None, "internal_error")
            raise
        if isinstance(result, Completion):
            result.usage = result.usage or Usage.from_openai(result.body.get("usage"))
            if ctx.response_model is None and result.raw is None:
                ctx.response_model = result.body.get("model")
            self._operation(request, ctx, "")
            self._tokens(request, ctx, result.usage)
            if ctx.cost_micros is not None:
                ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-cost-micros": str(ctx.cost_micros)}
            self._record(request, ctx, result.usage, "ok")
            return result
        result.chunks = self._watch(request, ctx, result, result.chunks)
        return result

    async def _watch(
        self, request: Request, ctx: RequestContext, stream: ChunkStream, chunks: AsyncGenerator[JSONObject, None]
    ) -> AsyncGenerator[JSONObject, None]:
        error = "cancelled"
        try:
            async for chunk in chunks:
                if ctx.first_token_ns is None:
                    ctx.first_token_ns = time.perf_counter_ns()
                    ctx.response_model = ctx.response_model or chunk.get("model")
                    model = self.metrics.model_label(ctx.routed_model)
                    self.metrics.ttft.labels(model).observe((ctx.first_token_ns - ctx.started_ns) / 1e9)
                yield chunk
            error = ""
        except AtajoError as err:
            error = err.code or err.type
            raise
        finally:
            await chunks.aclose()  # inner stages settle (budgets) before this request's row is written
            self._operation(request, ctx, error)
            self._tokens(request, ctx, stream.usage)
            self._record(request, ctx, stream.usage, error or "ok")

    def _operation(self, request: Request, ctx: RequestContext, error_type: str) -> None:
        model = self.metrics.model_label(ctx.routed_model or request.model)
        self.metrics.operation_duration.labels(request.operation, model, ctx.provider or "none", error_type).observe(
            ctx.elapsed_ns() / 1e9
        )

    def _tokens(self, request: Request, ctx: RequestContext, usage: Usage | None) -> None:
        if usage is None or ctx.coalesced or ctx.cache_status.startswith(("hit", "stale")):
            return  # answered from the cache or shared from another request: no provider tokens were used
        model = self.metrics.model_label(ctx.routed_model or request.model)
        info = self.catalog.get(ctx.upstream_model) if ctx.upstream_model else None
        if ctx.cost_micros is None and info is not None:
            ctx.cost_micros = info.cost_micros(usage)  # else the budget stage priced every call (a cascade's two)
        if ctx.cost_micros is not None:
            self.metrics.spend.labels(model).inc(ctx.cost_micros)
        self.metrics.token_usage.labels(request.operation, model, "input").observe(usage.prompt_tokens)
        if request.operation == "chat":
            self.metrics.token_usage.labels(request.operation, model, "output").observe(usage.completion_tokens)

    def _record(self, request: Request, ctx: RequestContext, usage: Usage | None, outcome: str) -> None:
        if self.ledger is None:
            return
        saved_by_cache = ctx.cache_status.startswith(("hit", "stale"))
        cost = 0 if saved_by_cache or ctx.coalesced else ctx.cost_micros or 0
        baseline_info = self.baseline(request.model)
        baseline = baseline_info.cost_micros(usage) if baseline_info is not None and usage is not None else cost
        if saved_by_cache:
            cause = "cache"
        elif ctx.coalesced:
            cause = "coalescing"
        elif request.model in self.routed:
            cause = "routing"
        else:
            cause = "none"
        tokens = ctx.provider_usage or usage or Usage()
        principal = ctx.principal
        self.ledger.record(
            LedgerRecord(
                at=self.wall_clock(),
                request_id=ctx.request_id,
                tenant=principal.tenant if principal else "default",
                key_name=principal.key_name if principal else "anonymous",
                operation=request.operation,
                requested_model=request.model,
                routed_model=ctx.routed_model,
                response_model=ctx.response_model,
                prompt_tokens=tokens.prompt_tokens,
                completion_tokens=tokens.completion_tokens,
                cached_tokens=tokens.cached_tokens,
                cost_micros=cost,
                baseline_micros=baseline,
                cache_status=ctx.cache_status,
                cause=cause,
                latency_ms=round(ctx.elapsed_ns() / 1e6, 3),
                outcome=outcome,
                stream=request.stream,
            )
        )
