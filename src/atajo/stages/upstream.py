"""Terminal stage: call a provider, with retries, fallbacks and circuit breakers.

For each (model, deployment) in the table's plan: skip it in microseconds if its circuit is open; else call
it, retrying retryable errors with back-off; on a lasting failure move to the next deployment, then to the
fallback models. A rejection of the request itself (400, 413, 422) stops at once: every deployment would
give the same answer. Errors from every attempt are reported together.

Streams are opened and their first chunk read inside the retry loop, so a stream that fails before
anything reached the client (refused, dropped, cut or empty before its first chunk) is retried like any
other call. After the first chunk a failure (cut, stalled, error event) goes to the client and counts
against the deployment's breaker.

Rate limits (429) say the provider is busy, not down: they neither count towards opening a circuit nor hold
a half-open one, whose next caller may probe again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from atajo.core.context import RequestContext
from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import (
    AllAttemptsFailed,
    AtajoError,
    CircuitOpen,
    InvalidRequest,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from atajo.observe.metrics import GatewayMetrics
from atajo.providers.base import Provider
from atajo.routing.breaker import Breaker, BreakerBoard, State
from atajo.routing.retry import RetryPolicy
from atajo.routing.table import ModelTable
from atajo.types import JSONObject

Sleep = Callable[[float], Awaitable[None]]
UpstreamOutcome = Callable[[str, bool], None]
"""(model, ok): one attempt's outcome, for the adaptive limits' upstream error rate."""


def hurts_health(err: UpstreamError) -> bool:
    """Whether an error says the deployment is unwell (counts towards opening its circuit).

    Rate limits say the provider is busy, not down; rejections say the request was wrong.
    """
    if isinstance(err, UpstreamUnavailable):
        return err.upstream_status != 429
    return isinstance(err, (UpstreamConnectError, UpstreamTimeout, UpstreamStreamBroken)) or type(err) is UpstreamError


class UpstreamStage:
    name = "upstream"

    def __init__(
        self,
        table: ModelTable,
        providers: Mapping[str, Provider],
        breakers: BreakerBoard,
        retry: RetryPolicy,
        metrics: GatewayMetrics,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.table = table
        self.providers = providers
        self.breakers = breakers
        self.retry = retry
        self.metrics = metrics
        self.sleep = sleep
        self.outcome: UpstreamOutcome | None = None
        """Told every attempt's outcome under the public model name it was made for (retries and fallbacks
        each count; a request the provider rejected as invalid does not: it says nothing of its health). A
        stream's outcome is known when it ends: finished, or broken by the provider (a client leaving: none)."""

    async def __call__(self, request: Request, ctx: RequestContext) -> Result:
        errors: list[tuple[str, AtajoError]] = []
        for public, deployment in self.table.plan(request.model):
            if errors:
                self.metrics.fallbacks.labels(errors[-1][0]).inc()
            breaker = self.breakers.get(deployment.id)
            if not breaker.allow():
                if breaker.state is State.HALF_OPEN:
                    why, wait_s = "a trial request is in flight", 1.0
                else:
                    wait_s = breaker.retry_in_s()
                    why = f"circuit open for {wait_s:.1f} s more"
                errors.append(
                    (deployment.id, CircuitOpen(f"deployment {deployment.id} is failing; {why}", retry_after_s=wait_s))
                )
                continue
            result = await self._try_deployment(request, ctx, public, deployment, breaker, errors)
            if result is not None:
                return result
        if len(errors) == 1:
            raise errors[0][1]
        raise AllAttemptsFailed(errors)

    async def _try_deployment(
        self,
        request: Request,
        ctx: RequestContext,
        public: str,
        deployment: Deployment,
        breaker: Breaker,
        errors: list[tuple[str, AtajoError]],
    ) -> Result | None:
        provider = self.providers[deployment.provider]
        name = public if public != "*" else request.model
        upstream_model = deployment.model_for(name)
        for retry in range(self.retry.max_retries + 1):
            ctx.attempts += 1
            started = time.perf_counter_ns()
            verdict = False
            try:
                if isinstance(request, ChatRequest) and not request.stream:  # the common case, one frame less
                    result: Result = await provider.chat(request, deployment, upstream_model)
                    breaker.success()
                else:
                    result = await self._call(provider, request, deployment, upstream_model, breaker, ctx, name)
                verdict = True
            except InvalidRequest as err:
                # The adapter cannot express this request (Anthropic with n > 1, say): another deployment may.
                verdict = True
                breaker.abandon()
                self.metrics.attempts.labels(deployment.provider, deployment.id, err.code or "invalid").inc()
                errors.append((deployment.id, err))
                return None
            except UpstreamError as err:
                verdict = True
                ctx.upstream_ns += time.perf_counter_ns() - started
                self.metrics.attempts.labels(deployment.provider, deployment.id, err.code or "error").inc()
                if isinstance(err, UpstreamRejected):
                    breaker.success()  # it answered, and sensibly: the deployment is healthy
                    raise
                if self.outcome is not None:
                    self.outcome(name, False)
                if hurts_health(err):
                    breaker.failure()
                else:
                    breaker.abandon()  # busy (429), not down: no verdict, so a half-open probe is not held
                errors.append((deployment.id, err))
                if not err.retryable or retry == self.retry.max_retries or not breaker.allow_retry():
                    return None
                delay = self.retry.delay_s(retry, getattr(err, "retry_after_s", None))
                if delay is None:
                    return None
                self.metrics.retries.labels(deployment.id).inc()
                await self.sleep(delay)
                ctx.upstream_ns += int(delay * 1e9)
                continue
            finally:
                if not verdict:
                    breaker.abandon()  # cancelled mid-call: no verdict on the deployment's health
            elapsed = time.perf_counter_ns() - started
            ctx.upstream_ns += elapsed
            self.metrics.attempts.labels(deployment.provider, deployment.id, "ok").inc()
            self.metrics.attempt_duration.labels(deployment.provider).observe(elapsed / 1e9)
            if self.outcome is not None and isinstance(result, Completion):
                self.outcome(name, True)  # a stream's is told when it ends (_rest)
            ctx.routed_model = name
            ctx.upstream_model = upstream_model
            ctx.provider = deployment.provider
            ctx.deployment = deployment.id
            ctx.simulated = deployment.provider == "simulated"
            return result
        return None

    async def _call(
        self,
        provider: Provider,
        request: Request,
        deployment: Deployment,
        upstream_model: str,
        breaker: Breaker,
        ctx: RequestContext,
        name: str,
    ) -> Result:
        if isinstance(request, ChatRequest):
            chunks = provider.chat_stream(request, deployment, upstream_model)
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                empty = UpstreamStreamBroken(f"deployment {deployment.id} sent an empty stream")
                empty.retryable = True  # nothing reached the client yet
                raise empty from None
            except UpstreamStreamBroken as err:
                err.retryable = True  # broken before its first chunk: nothing reached the client yet
                await chunks.aclose()
                raise
            except BaseException:
                await chunks.aclose()
                raise
            breaker.success()
            stream = ChunkStream(chunks)
            stream.chunks = self._rest(first, chunks, breaker, ctx, stream, name)
            return stream
        result = await provider.embeddings(request, deployment, upstream_model)
        breaker.success()
        return result

    async def _rest(
        self,
        first: JSONObject,
        chunks: AsyncGenerator[JSONObject, None],
        breaker: Breaker,
        ctx: RequestContext,
        stream: ChunkStream,
        name: str,
    ) -> AsyncGenerator[JSONObject, None]:
        """The stream after its first chunk. Time spent waiting for chunks is the provider's, not the gateway's
        overhead; a failure now (cut, stalled, error event) reaches the client and counts against the breaker.
        The usage chunk is read here, once, into ``stream.usage``, for the stages above (budget, ratelimit,
        observe)."""
        try:
            if first.get("usage"):
                stream.usage = Usage.from_openai(first["usage"])
            yield first
            while True:
                started = time.perf_counter_ns()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    if self.outcome is not None:
                        self.outcome(name, True)
                    return
                finally:
                    ctx.upstream_ns += time.perf_counter_ns() - started
                if chunk.get("usage"):
                    stream.usage = Usage.from_openai(chunk["usage"])
                yield chunk
        except UpstreamError as err:
            if hurts_health(err):
                breaker.failure()
            if self.outcome is not None:
                self.outcome(name, False)
            raise
        finally:
            await chunks.aclose()
