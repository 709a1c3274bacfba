"""Outermost stage: GenAI-level measurements of every request that reached the pipeline.

HTTP-level figures (status codes, the gateway's own added time) are recorded by the server, which also
sees requests rejected before the pipeline (bad JSON, oversized bodies).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from atajo.core.catalog import Catalog
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError
from atajo.observe.metrics import GatewayMetrics
from atajo.types import JSONObject


class ObserveStage:
    name = "observe"

    def __init__(self, metrics: GatewayMetrics, catalog: Catalog) -> None:
        self.metrics = metrics
        self.catalog = catalog

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        try:
            result = await call_next(request, ctx)
        except AtajoError as err:
            self._operation(request, ctx, err.code or err.type)
            raise
        if isinstance(result, Completion):
            result.usage = result.usage or Usage.from_openai(result.body.get("usage"))
            self._operation(request, ctx, "")
            self._tokens(request, ctx, result.usage)
            if ctx.cost_micros is not None:
                ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-cost-micros": str(ctx.cost_micros)}
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
                    model = self.metrics.model_label(ctx.routed_model)
                    self.metrics.ttft.labels(model).observe((ctx.first_token_ns - ctx.started_ns) / 1e9)
                if chunk.get("usage"):
                    stream.usage = Usage.from_openai(chunk["usage"])
                yield chunk
            error = ""
        except AtajoError as err:
            error = err.code or err.type
            raise
        finally:
            self._operation(request, ctx, error)
            self._tokens(request, ctx, stream.usage)

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
