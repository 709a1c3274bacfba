"""Coalesce: identical whole-answer requests in flight at once share one trip down the rest of the pipeline.

"Identical" means the same ``ctx.cache_key``, which the cache stage sets only on requests whose answer it
may reuse (the key is scoped by tenant, namespace and model). The first request (the leader) goes on with
its own context; the others (followers) wait for it and each gets its own copy of the answer, with the
routing facts copied into its context and ``coalesced`` set, so it is neither priced nor stored again.

Streams pass straight through for now, as do requests without a cache key.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from atajo.coalesce.singleflight import SingleFlight
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import Completion, Result
from atajo.errors import AtajoError
from atajo.types import JSONObject


@dataclass(frozen=True, slots=True)
class SharedOutcome:
    """What the leader's call left for the followers, taken the moment it finished, before any caller (the
    leader included) could touch the answer or its context."""

    result: Result | None
    error: AtajoError | None
    body: JSONObject | None
    """A shallow copy of the answer's body, kept apart from the one handed to the leader."""
    routed_model: str | None
    upstream_model: str | None
    response_model: str | None
    provider: str | None
    deployment: str | None
    simulated: bool
    upstream_ns: int
    """Time the call spent waiting on providers."""


EnabledFor = Callable[[Request, RequestContext], bool]


class CoalesceStage:
    name = "coalesce"

    def __init__(self, flight: SingleFlight[SharedOutcome], enabled_for: EnabledFor | None = None) -> None:
        self.flight = flight
        self.enabled_for = enabled_for

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        key = ctx.cache_key
        if request.stream or key is None or (self.enabled_for is not None and not self.enabled_for(request, ctx)):
            return await call_next(request, ctx)

        async def lead() -> SharedOutcome:
            return await _outcome(request, ctx, call_next)

        joined_ns = time.perf_counter_ns()
        outcome, shared = await self.flight.run(key, lead)
        if not shared:  # the leader: ``call_next`` ran with this very context
            if outcome.error is not None:
                raise outcome.error
            assert outcome.result is not None
            return outcome.result
        if not isinstance(outcome.result, Completion) and outcome.error is None:
            # Not a whole answer (a stream for a request that did not ask for one): nothing to replay.
            return await call_next(request, ctx)
        _follow(ctx, outcome, time.perf_counter_ns() - joined_ns)
        if outcome.error is not None:
            raise outcome.error
        assert isinstance(outcome.result, Completion) and outcome.body is not None
        usage = outcome.result.usage
        return Completion(dict(outcome.body), dataclasses.replace(usage) if usage is not None else None)


async def _outcome(request: Request, ctx: RequestContext, call_next: Handler) -> SharedOutcome:
    upstream_ns = ctx.upstream_ns
    result: Result | None = None
    error: AtajoError | None = None
    try:
        result = await call_next(request, ctx)
    except AtajoError as err:  # handed to every caller as a value, each re-raises it
        error = err
    return SharedOutcome(
        result=result,
        error=error,
        body=dict(result.body) if isinstance(result, Completion) else None,
        routed_model=ctx.routed_model,
        upstream_model=ctx.upstream_model,
        response_model=ctx.response_model,
        provider=ctx.provider,
        deployment=ctx.deployment,
        simulated=ctx.simulated,
        upstream_ns=ctx.upstream_ns - upstream_ns,
    )


def _follow(ctx: RequestContext, outcome: SharedOutcome, waited_ns: int) -> None:
    ctx.routed_model = outcome.routed_model
    ctx.upstream_model = outcome.upstream_model
    ctx.response_model = outcome.response_model
    ctx.provider = outcome.provider
    ctx.deployment = outcome.deployment
    ctx.simulated = outcome.simulated
    ctx.coalesced = True
    ctx.attempts = 0
    ctx.cost_micros = None
    # A follower waited on the provider too, but only from when it joined: never more than it waited.
    ctx.upstream_ns += min(outcome.upstream_ns, waited_ns)
