"""Coalesce: one upstream call for many requests.

**Single-flight.** Requests with the same ``ctx.cache_key`` (set by the cache stage only on requests whose
answer it may reuse; scoped by tenant, namespace and model) that arrive while one of them is being answered
share its call. The first (the leader) goes on with its own context; the others (followers) get the routing
facts copied into theirs and ``coalesced`` set, so they are neither priced nor stored again.

The call runs apart from every caller (``SingleFlight.join``) and publishes a feed: the head (a whole answer,
an error, or "a stream follows"), then a stream's chunks. A caller that joins a stream halfway reads the
chunks already sent, then the live ones; one that leaves never cancels the call for the others (the call
stops only when nobody reads it any more); a failure, before or during a stream, reaches every caller as the
same error. Each caller gets the shape it asked for: a streaming follower of a whole answer gets it as
chunks, a whole-answer follower of a stream gets the chunks folded into one completion.

**Across instances** (with a :class:`~atajo.coalesce.lease.RedisLease`): the leader of a request whose
answer goes to a shared tier first takes a lease; if another instance holds it, it waits for that answer to
appear in the cache (``lookup``) instead of calling, within bounds.

**Embeddings micro-batching** (with a batcher): text-only embeddings requests for the same model, tenant and
options that arrive within a short window become one upstream call with a list input; the answer is cut back
per request (re-indexed; ``usage`` shared out in proportion to input characters). When the provider rejects a
batch (one bad input), each request is retried alone so it gets its own answer or error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from atajo.coalesce.batcher import MicroBatcher
from atajo.coalesce.lease import Claim, RedisLease
from atajo.coalesce.singleflight import Feed, SingleFlight, Subscription
from atajo.core.answers import completion_from_chunks, replay, split_embeddings
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import EmbeddingsRequest, Request
from atajo.core.results import ChunkStream, Completion, Result, Usage
from atajo.errors import AtajoError, UpstreamError, UpstreamRejected
from atajo.settings import CoalescePolicy, CoalesceSettings
from atajo.types import JSONObject


@dataclass(frozen=True, slots=True)
class SharedOutcome:
    """The head of a call's feed: taken the moment the call answered, before any caller (the leader
    included) could touch the answer or its context."""

    result: Completion | None
    """The leader's own whole answer (None for a stream or an error)."""
    error: AtajoError | None
    body: JSONObject | None
    """A shallow copy of a whole answer's body, kept apart from the one handed to the leader."""
    usage: Usage | None
    streamed: bool
    """The answer's chunks follow in the feed."""
    routed_model: str | None
    upstream_model: str | None
    response_model: str | None
    provider: str | None
    deployment: str | None
    simulated: bool
    upstream_ns: int
    """Time the call spent waiting on providers (for a stream: up to its first chunk)."""


Piece = SharedOutcome | JSONObject
"""What a call's feed holds: a SharedOutcome first, then (for streams) chunks."""

EnabledFor = Callable[[Request, RequestContext], bool]
Lookup = Callable[[Request, RequestContext], Awaitable[Completion | None]]


@dataclass(frozen=True, slots=True)
class _Policy:
    single_flight: bool
    embeddings_batch: bool
    grouping: bool


@dataclass(slots=True)
class _Member:
    """One request in an embeddings batch."""

    request: EmbeddingsRequest
    ctx: RequestContext
    texts: list[str]
    chars: int
    call_next: Handler


@dataclass(frozen=True, slots=True)
class _Batched:
    """One request's share of a batch call, with the call's routing facts."""

    completion: Completion | None
    error: AtajoError | None
    facts: RequestContext
    members: int


class CoalesceStage:
    name = "coalesce"

    def __init__(
        self,
        flight: SingleFlight[Piece] | None = None,
        enabled_for: EnabledFor | None = None,
        *,
        settings: CoalesceSettings | None = None,
        key_policies: Mapping[str, CoalescePolicy] | None = None,
        lease: RedisLease | None = None,
        lookup: Lookup | None = None,
        batcher: MicroBatcher[_Member, _Batched] | None = None,
    ) -> None:
        self.flight: SingleFlight[Piece] = flight if flight is not None else SingleFlight()
        self.enabled_for = enabled_for
        self.settings = settings or CoalesceSettings()
        self.key_policies = dict(key_policies or {})
        self.lease = lease
        self.lookup = lookup
        self.batcher = batcher
        self.batched_calls_saved = 0
        self._batch_ids = itertools.count(1)
        self._policies: dict[tuple[str, str], _Policy] = {}

    def embeddings_batcher(self, **kwargs: Any) -> MicroBatcher[_Member, _Batched]:
        """A batcher that sends through this stage's embeddings batch call (``kwargs``: its bounds)."""
        self.batcher = MicroBatcher(self._send_embeddings, **kwargs)
        return self.batcher

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        policy = self._policy(request.model, ctx.principal.key_name if ctx.principal else "")
        key = ctx.cache_key
        if (
            key is None
            or not policy.single_flight
            or (self.enabled_for is not None and not self.enabled_for(request, ctx))
        ):
            return await self._call(request, ctx, call_next, policy)
        joined_ns = time.perf_counter_ns()
        subscription = self.flight.join(key, partial(self._produce, key, request, ctx, call_next, policy))
        try:
            head = await anext(subscription)
        except BaseException:
            subscription.close()
            raise
        assert isinstance(head, SharedOutcome)
        if subscription.shared:
            _follow(ctx, head, time.perf_counter_ns() - joined_ns)
        if head.error is not None:
            subscription.close()
            raise head.error
        if head.streamed:
            if request.stream:
                return _relayed(subscription, copy=subscription.shared)
            return await _fold(subscription)
        subscription.close()
        if not subscription.shared and not request.stream and head.result is not None:
            return head.result
        assert head.body is not None
        body = dict(head.body)
        usage = _copy_usage(head.usage) or Usage.from_openai(body.get("usage"))
        if request.stream:
            include_usage = bool(getattr(request, "include_usage", False))
            return replay(body, include_usage, usage)
        return Completion(body, usage)

    # --- the shared call --------------------------------------------------------------------------

    async def _produce(
        self,
        key: str,
        request: Request,
        ctx: RequestContext,
        call_next: Handler,
        policy: _Policy,
        feed: Feed[Piece],
    ) -> None:
        """The call all callers share, run by the leader's request in a task of its own."""
        upstream_ns = ctx.upstream_ns
        claim: Claim | None = None
        if self.lease is not None and self.lookup is not None and ctx.cache_shared:
            claim, found = await self.lease.claim(key, partial(self.lookup, request, ctx))
            if found is not None:  # another instance's answer, from the shared cache
                ctx.coalesced = True
                feed.publish(_outcome(ctx, found, None, False, upstream_ns))
                return
        answered = False
        try:
            try:
                result = await self._call(request, ctx, call_next, policy)
            except AtajoError as err:  # handed to every caller as a value, each re-raises it
                feed.publish(_outcome(ctx, None, err, False, upstream_ns))
                return
            if isinstance(result, Completion):
                feed.publish(_outcome(ctx, result, None, False, upstream_ns))
                answered = True
                return
            feed.publish(_outcome(ctx, None, None, True, upstream_ns))
            try:
                async for chunk in result.chunks:
                    feed.publish(chunk)
            finally:
                await result.chunks.aclose()
            answered = True
        finally:
            if claim is Claim.OWNED:
                assert self.lease is not None
                self.lease.finish(key, answered)

    async def _call(self, request: Request, ctx: RequestContext, call_next: Handler, policy: _Policy) -> Result:
        if self.batcher is not None and policy.embeddings_batch and isinstance(request, EmbeddingsRequest):
            texts = _texts(request.body.get("input"))
            if texts is not None and len(texts) <= self.batcher.max_items:
                return await self._batched(request, ctx, call_next, texts)
        return await call_next(request, ctx)

    # --- embeddings batches -----------------------------------------------------------------------

    async def _batched(
        self, request: EmbeddingsRequest, ctx: RequestContext, call_next: Handler, texts: list[str]
    ) -> Result:
        assert self.batcher is not None
        tenant = ctx.principal.tenant if ctx.principal else "default"
        options = {k: v for k, v in request.body.items() if k not in ("input", "model")}
        group = f"{tenant}\n{request.model}\n{orjson.dumps(options, option=orjson.OPT_SORT_KEYS).decode()}"
        chars = sum(len(t) for t in texts)
        submitted_ns = time.perf_counter_ns()
        share = await self.batcher.submit(group, _Member(request, ctx, texts, chars, call_next), max(1, chars))
        facts = share.facts
        ctx.routed_model, ctx.upstream_model = facts.routed_model, facts.upstream_model
        ctx.provider, ctx.deployment, ctx.simulated = facts.provider, facts.deployment, facts.simulated
        ctx.attempts += facts.attempts
        ctx.upstream_ns += min(facts.upstream_ns, time.perf_counter_ns() - submitted_ns)
        if share.members > 1:
            ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-batch-size": str(share.members)}
        if share.error is not None:
            raise share.error
        assert share.completion is not None
        return share.completion

    async def _send_embeddings(self, group: str, members: list[_Member]) -> Sequence[_Batched]:
        """One upstream call for the batch, cut back into one answer per member."""
        if len(members) == 1:
            return [await self._alone(members[0])]
        first = members[0]
        body = {**first.request.body, "input": [t for m in members for t in m.texts]}
        ctx = _batch_ctx(first.ctx, next(self._batch_ids))
        try:
            result = await first.call_next(EmbeddingsRequest(first.request.model, body), ctx)
        except UpstreamRejected:
            # One bad input must not fail the others: each asks alone, for its own answer or error.
            return await asyncio.gather(*(self._alone(m) for m in members))
        except AtajoError as err:
            return [_Batched(None, err, ctx, len(members))] * len(members)
        parts = (
            split_embeddings(result.body, [len(m.texts) for m in members], [m.chars for m in members])
            if isinstance(result, Completion)
            else None
        )
        if parts is None:
            wrong = UpstreamError(f"deployment {ctx.deployment} answered a batch of embeddings with the wrong count")
            return [_Batched(None, wrong, ctx, len(members))] * len(members)
        self.batched_calls_saved += len(members) - 1
        return [
            _Batched(Completion(part, Usage.from_openai(part.get("usage"))), None, ctx, len(members)) for part in parts
        ]

    async def _alone(self, member: _Member) -> _Batched:
        ctx = _batch_ctx(member.ctx, next(self._batch_ids))
        try:
            result = await member.call_next(member.request, ctx)
        except AtajoError as err:
            return _Batched(None, err, ctx, 1)
        assert isinstance(result, Completion)
        return _Batched(result, None, ctx, 1)

    async def close(self) -> None:
        """Send the batches still waiting; let go of the lease's connection."""
        if self.batcher is not None:
            await self.batcher.close()
        if self.lease is not None:
            await self.lease.close()

    # --- policies ---------------------------------------------------------------------------------

    def _policy(self, model: str, key_name: str) -> _Policy:
        cached = self._policies.get((model, key_name))
        if cached is not None:
            return cached
        s = self.settings
        single, batch, grouping = s.single_flight, s.embeddings_batch.enabled, s.grouping
        for layer in (s.models.get(model) or s.models.get("*"), self.key_policies.get(key_name)):
            if layer is None:
                continue
            single = layer.single_flight if layer.single_flight is not None else single
            batch = layer.embeddings_batch if layer.embeddings_batch is not None else batch
            grouping = layer.grouping if layer.grouping is not None else grouping
        policy = self._policies[(model, key_name)] = _Policy(
            single, batch and s.embeddings_batch.enabled, grouping and single
        )
        return policy

    def grouping(self, model: str, key_name: str) -> bool:
        """Whether a request may join an in-flight call for the same question in other words (the cache stage
        decides which, with the semantic tier's match decision, and hands over that call's key)."""
        return self._policy(model, key_name).grouping


def _texts(given: Any) -> list[str] | None:
    """The inputs of a text-only embeddings request (token arrays go alone: a call cannot mix the kinds)."""
    if isinstance(given, str):
        return [given]
    if isinstance(given, list) and given and all(isinstance(t, str) for t in given):
        return list(given)
    return None


def _batch_ctx(member: RequestContext, n: int) -> RequestContext:
    ctx = RequestContext(request_id=f"{member.request_id}-batch{n}", route=member.route, headers=member.headers)
    ctx.principal = member.principal
    return ctx


def _outcome(
    ctx: RequestContext, result: Completion | None, error: AtajoError | None, streamed: bool, upstream_ns: int
) -> SharedOutcome:
    return SharedOutcome(
        result=result,
        error=error,
        body=dict(result.body) if result is not None else None,
        usage=_copy_usage(result.usage) if result is not None else None,
        streamed=streamed,
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


def _relayed(subscription: Subscription[Piece], copy: bool) -> ChunkStream:
    """A stream's chunks from the shared feed (after its head); a follower gets its own copy of each. The usage
    chunk is read into the stream's ``usage`` as it goes by, as the upstream stage does for its own streams."""

    async def relay() -> AsyncGenerator[JSONObject, None]:
        try:
            async for piece in subscription:
                assert isinstance(piece, dict)
                if piece.get("usage"):
                    stream.usage = Usage.from_openai(piece["usage"])
                yield dict(piece) if copy else piece
        finally:
            subscription.close()

    stream = ChunkStream(relay())
    return stream


async def _fold(subscription: Subscription[Piece]) -> Completion:
    """A whole answer for a caller that did not ask for a stream, from the shared stream's chunks."""
    try:
        chunks = [piece async for piece in subscription if isinstance(piece, dict)]
    finally:
        subscription.close()
    body = completion_from_chunks(chunks)
    if body is None:
        raise UpstreamError("the shared stream ended without an answer")
    return Completion(body, Usage.from_openai(body.get("usage")))


def _copy_usage(usage: Usage | None) -> Usage | None:
    return dataclasses.replace(usage) if usage is not None else None
