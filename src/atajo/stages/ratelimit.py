"""Rate-limit stage: admission before the cache. Per request: the key may use the model (403 otherwise); the
request and its estimated tokens fit every bucket of its key, tenant, model and the gateway (429 with
``Retry-After`` otherwise, or only a log line and a count in shadow mode); the ``x-ratelimit-*`` headers go
on the answer, whatever it is.

Cache hits count: a request is a request (it costs the gateway work, and a client's quota should not depend
on what others asked before). Their tokens do not: no provider was called, so the reservation is given back.
After the call the token reservation is settled against the provider's usage (a stream's, when it ends); a
failed call gives it back. (The upstream error rate of the adaptive multipliers is fed by the upstream stage,
per attempt.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from functools import partial

from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError, PermissionDenied, RateLimited
from atajo.limits.limiter import Admission, Limiter
from atajo.types import JSONObject

Estimate = Callable[[Request], int]


class RateLimitStage:
    name = "ratelimit"

    def __init__(self, limiter: Limiter, estimate: Estimate) -> None:
        self.limiter = limiter
        self.estimate = estimate

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        principal = ctx.principal
        if principal is None:
            return await call_next(request, ctx)
        if principal.models is not None and request.model not in principal.models:
            raise PermissionDenied(
                f"This key may not use the model `{request.model}`.", param="model", code="model_not_allowed"
            )
        scopes = self.limiter.scopes(principal, request.model)
        admission = (
            await self.limiter.admit(principal, request.model, partial(self.estimate, request), scopes)
            if scopes
            else None
        )
        if admission is None or not admission.checks:  # no limit applies: nothing to charge
            return await call_next(request, ctx)
        headers = admission.headers()
        if headers:
            ctx.extra_headers = {**(ctx.extra_headers or {}), **headers}
        if not admission.allowed:
            raise RateLimited(admission.message(), retry_after_s=admission.retry_after_s())
        try:
            result = await call_next(request, ctx)
        except AtajoError:
            await self.limiter.settle(admission, 0)
            raise
        if isinstance(result, Completion):
            await self.limiter.settle(admission, self._used(ctx, admission, result.usage))
            return result
        result.chunks = self._settle_after(ctx, result, result.chunks, admission)
        return result

    @staticmethod
    def _used(ctx: RequestContext, admission: Admission, usage: Usage | None) -> int:
        """Tokens the provider spent on this request: none for a cache hit or a shared call; the estimate when
        the provider reported no usage. The usage was read once, below (the provider adapter, the budget
        stage, or for a stream where it was made)."""
        if ctx.cache_status.startswith(("hit", "stale")) or ctx.coalesced:
            return 0
        return usage.total_tokens if usage is not None else admission.reserved_tokens

    async def _settle_after(
        self,
        ctx: RequestContext,
        stream: ChunkStream,
        chunks: AsyncGenerator[JSONObject, None],
        admission: Admission,
    ) -> AsyncGenerator[JSONObject, None]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            await self.limiter.settle(admission, self._used(ctx, admission, stream.usage))
