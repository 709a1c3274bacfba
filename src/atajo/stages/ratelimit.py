"""Rate-limit stage: admission before the cache. Per request: the key may use the model (403 otherwise); the
request and its estimated tokens fit every bucket of its key, tenant, model and the gateway (429 with
``Retry-After`` otherwise, or only a log line and a count in shadow mode); the ``x-ratelimit-*`` headers go
on the answer, whatever it is.

Cache hits count: a request is a request (it costs the gateway work, and a client's quota should not depend
on what others asked before). Their tokens do not: no provider was called, so the reservation is given back.
After the call the token reservation is settled against the provider's usage (a stream's, when it ends); a
failed call gives it back. Outcomes of upstream calls feed the upstream error rate of the adaptive
multipliers.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from functools import partial

from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError, PermissionDenied, RateLimited, UpstreamError, UpstreamRejected
from atajo.limits.limiter import Admission, Limiter
from atajo.types import JSONObject

Estimate = Callable[[Request], int]
UpstreamOutcome = Callable[[str, bool], None]
"""(model, ok): one upstream call's outcome, for the adaptive upstream multiplier."""


class RateLimitStage:
    name = "ratelimit"

    def __init__(self, limiter: Limiter, estimate: Estimate, upstream_outcome: UpstreamOutcome | None = None) -> None:
        self.limiter = limiter
        self.estimate = estimate
        self.upstream_outcome = upstream_outcome

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
        if admission is None or not admission.checks:  # no limit applies: nothing to charge; outcomes still count
            try:
                result = await call_next(request, ctx)
            except UpstreamError as err:
                if not isinstance(err, UpstreamRejected):
                    self._outcome(request, ctx, ok=False)
                raise
            if isinstance(result, Completion):
                self._outcome(request, ctx, ok=True)
            return result
        headers = admission.headers()
        if headers:
            ctx.extra_headers = {**(ctx.extra_headers or {}), **headers}
        if not admission.allowed:
            raise RateLimited(admission.message(), retry_after_s=admission.retry_after_s())
        try:
            result = await call_next(request, ctx)
        except AtajoError as err:
            if isinstance(err, UpstreamError) and not isinstance(err, UpstreamRejected):
                self._outcome(request, ctx, ok=False)
            await self.limiter.settle(admission, 0)
            raise
        if isinstance(result, Completion):
            await self.limiter.settle(admission, self._used(ctx, admission, result.usage, result))
            self._outcome(request, ctx, ok=True)
            return result
        result.chunks = self._settle_after(request, ctx, result, result.chunks, admission)
        return result

    def _outcome(self, request: Request, ctx: RequestContext, *, ok: bool) -> None:
        if self.upstream_outcome is not None and ctx.attempts and not ctx.cache_status.startswith(("hit", "stale")):
            self.upstream_outcome(request.model, ok)

    @staticmethod
    def _used(
        ctx: RequestContext, admission: Admission, usage: Usage | None, completion: Completion | None = None
    ) -> int:
        """Tokens the provider spent on this request: none for a cache hit or a shared call; the estimate when
        the provider reported no usage."""
        if ctx.cache_status.startswith(("hit", "stale")) or ctx.coalesced:
            return 0
        if usage is None and completion is not None and admission.reserved_tokens:
            usage = Usage.from_openai(completion.body.get("usage"))
        return usage.total_tokens if usage is not None else admission.reserved_tokens

    async def _settle_after(
        self,
        request: Request,
        ctx: RequestContext,
        stream: ChunkStream,
        chunks: AsyncGenerator[JSONObject, None],
        admission: Admission,
    ) -> AsyncGenerator[JSONObject, None]:
        ok = False
        try:
            async for chunk in chunks:
                yield chunk
            ok = True
        finally:
            await chunks.aclose()
            await self.limiter.settle(admission, self._used(ctx, admission, stream.usage))
            self._outcome(request, ctx, ok=ok)
