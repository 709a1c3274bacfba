"""Budget stage, the last before the provider: prices every upstream call, and holds it to the budgets.

With budgets configured, or for a virtual key with its own ``budget_micros`` (money per calendar month), it
reserves the most the call may cost before making it (``budgets.reserve: max``:
input tokens counted, output up to ``max_tokens`` or the model's ``max_output``, on the dearest model of the
fallback chain), or a typical answer's cost (``typical``); a request that would pass a budget gets 429
``budget_exceeded`` naming it. After the call the reservation is settled with the actual usage at catalog
prices (a failed call: nothing; a stream that ends without reporting usage: the reservation stands).

Every call's cost is added to ``ctx.cost_micros`` (a cascade's two calls both count).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Literal

from atajo.budget.budgets import Budgets, Hold
from atajo.core.catalog import ModelInfo
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.routing.tokens import TokenCounter
from atajo.types import JSONObject


class BudgetStage:
    name = "budget"

    def __init__(
        self,
        budgets: Budgets | None,
        counter: TokenCounter,
        chain: Callable[[str], Sequence[ModelInfo]],
        price: Callable[[str], ModelInfo | None],
        *,
        bound: Literal["max", "typical"] = "max",
    ) -> None:
        self.budgets = budgets
        self.configured = bool(budgets)
        """Budgets are configured (else only virtual keys with a ``budget_micros`` are held to one)."""
        self.counter = counter
        self.chain = chain
        """A model name → the catalog entries of the models its call may end up on (itself, its fallbacks)."""
        self.price = price
        """An upstream model name → its catalog entry."""
        self.bound = bound

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        principal = ctx.principal
        budgeted = self.configured or (principal is not None and principal.budget_micros is not None)
        hold = await self._reserve(request, ctx) if budgeted and self.budgets is not None else None
        try:
            result = await call_next(request, ctx)
        except BaseException:
            if hold is not None and self.budgets is not None:
                self.budgets.settle(hold, 0, 0)  # the provider answered nothing billable
            raise
        if isinstance(result, Completion):
            usage = result.usage = result.usage or Usage.from_openai(result.body.get("usage"))
            self._account(ctx, hold, usage)
            return result
        result.chunks = self._watch(ctx, hold, result, result.chunks)
        return result

    async def _reserve(self, request: Request, ctx: RequestContext) -> Hold | None:
        assert self.budgets is not None
        cost = tokens = 0
        names = [info.name for info in self.chain(request.model)] or [request.model]
        for name in names:
            estimate = self.counter.estimate_cost(request, name, self.bound, ctx.token_counts)
            cost = max(cost, estimate.cost_micros)
            tokens = max(tokens, estimate.input_tokens + estimate.output_tokens)
        principal = ctx.principal
        hold = await self.budgets.reserve(
            principal.tenant if principal else "default",
            principal.key_name if principal else "anonymous",
            cost,
            tokens,
            principal.budget_micros if principal else None,
        )
        if hold is not None and hold.warnings:
            ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-budget-warning": "; ".join(hold.warnings)}
        return hold

    def _account(self, ctx: RequestContext, hold: Hold | None, usage: Usage | None) -> None:
        info = self.price(ctx.upstream_model) if ctx.upstream_model else None
        cost = info.cost_micros(usage) if info is not None and usage is not None else None
        if cost is not None:
            ctx.cost_micros = (ctx.cost_micros or 0) + cost
        if usage is not None:
            spent = ctx.provider_usage or Usage()
            ctx.provider_usage = Usage(
                spent.prompt_tokens + usage.prompt_tokens,
                spent.completion_tokens + usage.completion_tokens,
                spent.cached_tokens + usage.cached_tokens,
            )
        if hold is None or self.budgets is None:
            return
        if usage is None:
            return  # unknown usage: the reservation stands (an over-count, never an under-count)
        self.budgets.settle(hold, hold.cost_micros if cost is None else cost, usage.total_tokens)

    async def _watch(
        self, ctx: RequestContext, hold: Hold | None, stream: ChunkStream, chunks: AsyncGenerator[JSONObject, None]
    ) -> AsyncGenerator[JSONObject, None]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            self._account(ctx, hold, stream.usage)  # read by the stream's maker (the upstream stage)
