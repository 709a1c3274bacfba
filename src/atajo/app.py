"""Composition root: settings → services → pipeline → a :class:`Gateway` (routes + lifecycle) served by the edge.

The pipeline's order is declared here, once:

    observe → guard → ratelimit → cache → coalesce → route → budget → upstream

Authentication runs before the pipeline, at the HTTP edge (see ``atajo.auth``).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client.core import Metric

from atajo.auth.keys import KeyRing
from atajo.auth.store import KeyRecord, KeyStore
from atajo.auth.virtual import VirtualKeys, principal_of
from atajo.batches.store import BatchStore
from atajo.budget.budgets import Budgets
from atajo.budget.memory import MemoryBudgetStore
from atajo.budget.store import BudgetStore
from atajo.cache.service import CacheService
from atajo.coalesce.lease import Claim, RedisLease
from atajo.coalesce.singleflight import SingleFlight
from atajo.core.batches import BatchApi, DeferredCost
from atajo.core.catalog import Catalog, ModelInfo, load_catalog
from atajo.core.context import Principal, RequestContext
from atajo.core.deployments import Deployment
from atajo.core.pipeline import Handler, Stage, build_pipeline
from atajo.core.requests import EmbeddingsRequest
from atajo.core.requests import Request as CoreRequest
from atajo.core.results import Completion
from atajo.errors import ConfigError
from atajo.limits.adaptive import Adaptive, GatewayLoad
from atajo.limits.concurrency import ConcurrencyBoard, GuardedProvider
from atajo.limits.estimate import estimate_tokens
from atajo.limits.gcra import MemoryStorage, Storage
from atajo.limits.limiter import Limiter
from atajo.observe.deferred import DeferredMetrics
from atajo.observe.ledger import Ledger, LedgerRecord
from atajo.observe.metrics import GatewayMetrics, counter_family, gauge_family
from atajo.providers.base import Provider
from atajo.providers.pool import HttpPool
from atajo.routing.breaker import BreakerBoard
from atajo.routing.complexity import ComplexityModel
from atajo.routing.retry import RetryPolicy
from atajo.routing.select import Candidate, Selector
from atajo.routing.table import WILDCARD, ModelTable
from atajo.routing.tokens import TokenCounter
from atajo.server.batches import BatchesApi
from atajo.server.cache_admin import CacheAdmin
from atajo.server.deferred_requests import QueuedRequests
from atajo.server.edge import EdgeServer, Limits, Reply, Request
from atajo.server.http import GatewayServer, Router
from atajo.server.keys_admin import KeysAdmin
from atajo.settings import Settings
from atajo.stages.budget import BudgetStage
from atajo.stages.cache import CacheStage
from atajo.stages.coalesce import CoalesceStage, Piece
from atajo.stages.deferred import DeferredLane
from atajo.stages.guard import GuardStage
from atajo.stages.observe import ObserveStage
from atajo.stages.ratelimit import RateLimitStage
from atajo.stages.route import Group, RouteStage
from atajo.stages.upstream import Sleep, UpstreamStage
from atajo.types import JSONObject

log = logging.getLogger("atajo")

# Provider name → "module:class"; imported only when a deployment uses it.
PROVIDERS = {
    "openai": "atajo.providers.openai:OpenAIProvider",
    "anthropic": "atajo.providers.anthropic:AnthropicProvider",
    "simulated": "atajo.providers.simulated:SimulatedProvider",
}


BATCH_APIS = {
    "openai": "atajo.providers.openai_batch:OpenAIBatchApi",
    "anthropic": "atajo.providers.anthropic_batch:AnthropicBatchApi",
}
"""Provider name → its Batch API adapter ("module:class"), for the deferred lane."""


@dataclass
class Services:
    settings: Settings
    metrics: GatewayMetrics
    pool: HttpPool
    table: ModelTable
    breakers: BreakerBoard
    keys: KeyRing
    catalog: Catalog
    server: GatewayServer
    cache: CacheService | None
    coalesce: CoalesceStage
    budgets: Budgets
    ledger: Ledger | None
    lane: DeferredLane | None = None
    virtual_keys: VirtualKeys | None = None
    limiter: Limiter | None = None
    adaptive: Adaptive | None = None
    load: GatewayLoad | None = None


def build_storage(settings: Settings, clock: Callable[[], float]) -> Storage:
    """Where rate-limit state lives, by ``limits.storage``'s scheme; Redis is imported only when used."""
    limits = settings.limits
    if limits.storage.startswith("memory:"):
        return MemoryStorage(clock)
    from atajo.limits.redis import RedisStorage

    return RedisStorage(limits.storage, timeout_s=limits.timeout_s, max_connections=limits.redis_max_connections)


def can_limit(settings: Settings) -> bool:
    """Whether anything could limit a request: a configured limit, a static key with limits or allowed models,
    or virtual keys (which may carry them). If not, the ratelimit stage stays out of the pipeline (it would only
    cost time); the per-deployment concurrency caps do not depend on it."""
    limits = settings.limits
    configured = [limits.gateway, limits.keys, *limits.models.values(), *limits.tenants.values()]
    if any(not limit.empty for limit in configured):
        return True
    if any(key.limits is not None or key.models is not None for key in settings.auth.keys):
        return True
    return settings.key_store_url is not None


def build_table(settings: Settings) -> ModelTable:
    deployments = {
        name: [Deployment.from_settings(name, i, d, settings.pool) for i, d in enumerate(model.deployments)]
        for name, model in settings.models.items()
    }
    fallbacks = {name: model.fallbacks for name, model in settings.models.items()}
    return ModelTable(deployments, fallbacks)


def build_providers(names: Iterable[str], pool: HttpPool, catalog: Catalog, sleep: Sleep) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name in sorted(set(names)):
        module, _, cls_name = PROVIDERS[name].partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        providers[name] = cls(catalog, sleep) if name == "simulated" else cls(pool)
    return providers


def build_services(
    settings: Settings,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> Services:
    """Every service the app needs. ``sleep`` and the clocks are injectable so tests never wait on real time
    (``clock`` is monotonic, for breakers; ``wall_clock`` dates cache entries)."""
    metrics = GatewayMetrics()
    catalog = load_catalog(settings.catalog)
    pool = HttpPool(settings.pool)
    table = build_table(settings)
    metrics.set_model_names([*table.names(), *settings.routing.models])
    breakers = BreakerBoard(settings.breaker, clock)
    virtual_keys: VirtualKeys | None = None
    store_url = settings.key_store_url
    if store_url is not None:
        virtual_keys = VirtualKeys(
            KeyStore(store_url, clock=wall_clock),
            lookup_ttl_s=settings.auth.lookup_ttl_s,
            poll_s=settings.auth.store_poll_s,
            tenant_limits=settings.limits.tenants,
            clock=clock,
        )
    keys = KeyRing(settings.auth, virtual_keys, settings.limits.tenants)
    providers = build_providers((d.provider for d in table.all_deployments()), pool, catalog, sleep)
    concurrency: ConcurrencyBoard | None = None
    if settings.limits.enabled and settings.limits.concurrency.enabled:
        concurrency = ConcurrencyBoard(settings.limits.concurrency, clock)
        providers = {name: GuardedProvider(p, concurrency) for name, p in providers.items()}
    upstream = UpstreamStage(table, providers, breakers, RetryPolicy.from_settings(settings.retry), metrics, sleep)
    counter = TokenCounter(catalog)  # one set of tokenizer vocabularies, for routing and budgets
    route = build_route(settings, table, catalog, breakers, metrics, counter)
    ledger: Ledger | None = None
    if settings.ledger.enabled:
        ledger = Ledger(
            settings.ledger.url,
            flush_interval_s=settings.ledger.flush_interval_s,
            max_pending=settings.ledger.max_pending,
            observer=metrics.ledger,
        )
    observe = ObserveStage(
        metrics,
        catalog,
        ledger=ledger,
        baseline=baseline_pricer(settings, route, route.price),
        routed=frozenset(route.groups),
        wall_clock=wall_clock,
    )
    stages: list[Stage] = [observe]
    limiter: Limiter | None = None
    adaptive: Adaptive | None = None
    load: GatewayLoad | None = None
    guard: GuardStage | None = None
    if settings.guard.enabled:
        guard = GuardStage(
            block=settings.guard.block_prompt_injection,
            count=lambda kind: metrics.guard_flags.labels(f"prompt_injection_{kind}").inc(),
        )
        stages.append(guard)
    if settings.limits.enabled and can_limit(settings):
        tuning = settings.limits.adaptive
        load = GatewayLoad(lambda: metrics.in_flight.value, tuning.capacity, tuning.max_loop_lag_s)
        names = frozenset(table.names())
        adaptive = Adaptive(tuning, load, clock=clock, model_key=lambda m: m if m in names else "*")
        limiter = Limiter(settings.limits, build_storage(settings, clock), adaptive, clock=clock)
        output = settings.limits.output_tokens
        stages.append(RateLimitStage(limiter, partial(_estimate, output=output)))
        upstream.outcome = adaptive.record_upstream  # every attempt's, retries and fallbacks included
        if guard is not None:
            guard.flag = adaptive.flag  # a flagged client counts as a problematic one
    cache: CacheService | None = None
    # Single-flight groups requests by the cache key, so it joins when the cache is on.
    flight: SingleFlight[Piece] = SingleFlight()
    cache_stage: CacheStage | None = None
    if settings.cache.enabled:
        cache = CacheService(
            settings.cache,
            clock=wall_clock,
            monotonic=clock,
            observer=metrics.cache,
            semantic_observer=metrics.cache.semantic,
            embed=_provider_embeddings(upstream, settings.cache.semantic.embedder)
            if settings.cache.semantic.enabled and settings.cache.semantic.embedder != "local"
            else None,
        )
        key_policies = {key.name: key.cache for key in settings.auth.keys}
        cache_stage = CacheStage(cache, settings.cache, key_policies, catalog, metrics, in_flight=flight.busy)
        stages.append(cache_stage)
    coalesce = build_coalesce(settings, flight, cache_stage, metrics)
    if cache_stage is not None:
        cache_stage.grouping_for = coalesce.grouping
    stages.append(coalesce)
    stages.append(route)
    budgets = build_budgets(settings, metrics, catalog.currency, wall_clock)
    stages.append(
        BudgetStage(budgets, counter, chain_pricer(table, catalog), catalog.get, bound=settings.budgets.reserve)
    )
    pipeline = build_pipeline(stages, upstream)
    routed_names = sorted(settings.routing.models)
    server = GatewayServer(
        pipeline,
        metrics,
        max_body_bytes=settings.server.max_body_bytes,
        model_names=lambda: sorted([*table.names(), *routed_names]),
        authenticate=keys.authenticate,
        on_answer=partial(_client_outcome, adaptive) if adaptive is not None else None,
    )

    def pool_metrics() -> Iterable[Metric]:
        yield counter_family(
            "atajo_upstream_connections_opened",
            "Upstream TCP connections opened, by host",
            ["host"],
            [([host], n) for host, n in pool.opened.items()],
        )
        yield counter_family(
            "atajo_upstream_requests_sent",
            "Requests sent to upstreams, by host",
            ["host"],
            [([host], n) for host, n in pool.sent.items()],
        )
        idle, in_use = pool.connections()
        yield gauge_family(
            "atajo_upstream_pool_connections",
            "Pooled upstream connections now",
            ["state"],
            [(["idle"], idle), (["in_use"], in_use)],
        )
        yield gauge_family(
            "atajo_circuit_state",
            "Circuit per deployment: 0 closed, 1 half-open, 2 open",
            ["deployment"],
            [([name], int(state)) for name, state in breakers.states().items()],
        )

    metrics.add_collector(pool_metrics)
    if cache is not None:
        metrics.add_collector(partial(cache_metrics, cache))
    metrics.add_collector(partial(coalesce_metrics, coalesce, metrics, cache_stage))
    if ledger is not None:
        metrics.add_collector(
            lambda: [
                gauge_family("atajo_ledger_pending", "Ledger rows waiting to be written", [], [([], ledger.pending)])
            ]
        )
    lane = (
        build_lane(settings, table, pool, pipeline, catalog, metrics, wall_clock, ledger)
        if settings.batches.enabled
        else None
    )
    if limiter is not None and adaptive is not None:
        metrics.add_collector(partial(limiter_metrics, limiter, adaptive))
    if concurrency is not None:
        metrics.add_collector(partial(concurrency_metrics, concurrency))
    return Services(
        settings,
        metrics,
        pool,
        table,
        breakers,
        keys,
        catalog,
        server,
        cache,
        coalesce,
        budgets,
        ledger,
        lane,
        virtual_keys,
        limiter,
        adaptive,
        load,
    )


BAD_CODES = frozenset({"rate_limit_exceeded", "model_not_allowed", "invalid_json", "request_too_large"})


def _client_outcome(adaptive: Adaptive, principal: Principal, status: int, code: str) -> None:
    """A client's request was bad when the gateway refused it (rate limit, model not allowed) or could not read
    it (malformed, too large, invalid): the adaptive client multiplier counts those."""
    adaptive.record_request(principal, bad=code in BAD_CODES or status in (400, 413, 422))


def concurrency_metrics(board: ConcurrencyBoard) -> Iterable[Metric]:
    caps = sorted(board.caps.items())
    yield gauge_family(
        "atajo_upstream_concurrency_limit", "Adaptive cap on calls in flight, per deployment", ["deployment"],
        [([name], cap.cap) for name, cap in caps],
    )  # fmt: skip
    yield gauge_family(
        "atajo_upstream_concurrency_in_flight", "Calls in flight, per deployment", ["deployment"],
        [([name], cap.in_flight) for name, cap in caps],
    )  # fmt: skip
    yield counter_family(
        "atajo_upstream_saturated", "Calls refused because a deployment's cap was full (after waiting)", ["deployment"],
        [([name], cap.saturated) for name, cap in caps],
    )  # fmt: skip
    yield counter_family(
        "atajo_upstream_concurrency_decreases", "Times a deployment's cap was cut on a sign of distress",
        ["deployment"], [([name], cap.decreases) for name, cap in caps],
    )  # fmt: skip


def _estimate(request: CoreRequest, *, output: int) -> int:
    """Tokens reserved for a request (swap in an exact tokenizer here)."""
    return estimate_tokens(request, output)


def limiter_metrics(limiter: Limiter, adaptive: Adaptive) -> Iterable[Metric]:
    yield counter_family(
        "atajo_ratelimit_decisions",
        "Admission decisions: allowed, rejected or shadow_rejected (by the scope that refused: key, tenant, model, "
        "gateway)",
        ["scope", "outcome"],
        [([scope, outcome], n) for (scope, outcome), n in limiter.decisions.items()],
    )
    yield counter_family(
        "atajo_ratelimit_storage_errors",
        "Rate-limit storage calls that failed or timed out (the request was admitted)",
        [],
        [([], limiter.storage_errors)],
    )
    yield gauge_family("atajo_ratelimit_load", "The gateway's smoothed saturation (0 idle, 1 full)", [],
                       [([], adaptive.load_smoothed)])  # fmt: skip
    yield gauge_family(
        "atajo_ratelimit_multiplier",
        "Adaptive multipliers on limits: load (gateway), client (per key id), upstream (per model)",
        ["factor", "name"],
        [
            (["load", ""], adaptive.load.value),
            *((["client", name], c.factor.value) for name, c in adaptive.clients.items()),
            *((["upstream", name], u.factor.value) for name, u in adaptive.upstreams.items()),
        ],
    )
    effective = []
    for scope in limiter.configured_scopes():
        m = adaptive.load.value * adaptive.upstream_factor(scope.name) if scope.limits.adaptive else 1.0
        m = m if adaptive.settings.enabled else 1.0
        for unit, limit in (("requests", scope.limits.rpm), ("tokens", scope.limits.tpm)):
            if limit is not None:
                effective.append(([scope.kind, scope.name, unit], max(1, int(limit * m))))
    yield gauge_family(
        "atajo_ratelimit_effective_limit",
        "Limits in force per minute (configured times the load and upstream multipliers), per configured scope",
        ["scope", "name", "unit"],
        effective,
    )


def pricer(table: ModelTable, catalog: Catalog) -> Callable[[str], ModelInfo | None]:
    """A configured model name → the catalog entry its first deployment's upstream model is priced at. Resolved
    once per configured name here; a name only the catch-all serves is resolved when asked."""

    def resolve(model: str) -> ModelInfo | None:
        deployments = table.deployments(model) or table.deployments(WILDCARD)
        return catalog.get(deployments[0].model_for(model)) if deployments else catalog.get(model)

    known = {name: resolve(name) for name in table.names()}

    def price(model: str) -> ModelInfo | None:
        return known[model] if model in known else resolve(model)

    return price


def baseline_pricer(
    settings: Settings, route: RouteStage, price: Callable[[str], ModelInfo | None]
) -> Callable[[str], ModelInfo | None]:
    """The requested model → the catalog entry a request's baseline cost is priced at: itself, or for a routed
    name its ``baseline`` model (default: its dearest candidate)."""
    baselines: dict[str, ModelInfo | None] = {}
    for group, stage_group in route.groups.items():
        named = settings.routing.models[group].baseline
        candidates = stage_group.selector.candidates
        dearest = max(candidates, key=lambda c: c.info.input_micros_per_1k + c.info.output_micros_per_1k, default=None)
        baselines[group] = price(named) if named else dearest.info if dearest else None

    def baseline(model: str) -> ModelInfo | None:
        return baselines[model] if model in baselines else price(model)

    return baseline


def chain_pricer(table: ModelTable, catalog: Catalog) -> Callable[[str], Sequence[ModelInfo]]:
    """A model name → the catalog entries of every model its call may end up on (its fallbacks too). Resolved
    once per configured name here (a weighted draw changes the plan's order, not its models); a name only the
    catch-all serves is resolved when asked."""

    def resolve(model: str) -> tuple[ModelInfo, ...]:
        found = (catalog.get(d.model_for(model if public == WILDCARD else public)) for public, d in table.plan(model))
        return tuple(info for info in found if info is not None)

    known = {name: resolve(name) for name in table.names()}

    def chain(model: str) -> Sequence[ModelInfo]:
        return known[model] if model in known else resolve(model)

    return chain


def build_budgets(
    settings: Settings, metrics: GatewayMetrics, currency: str, wall_clock: Callable[[], float]
) -> Budgets:
    s = settings.budgets
    store: BudgetStore
    if s.store.startswith("memory://"):
        store = MemoryBudgetStore(wall_clock)
    else:
        from atajo.budget.redis import RedisBudgetStore

        store = RedisBudgetStore(s.store, prefix=s.redis_prefix, timeout_s=s.timeout_s)
    return Budgets(
        s.limits, store, metrics.budget, currency=currency, clock=wall_clock, on_store_error=s.on_store_error
    )


def build_route(
    settings: Settings,
    table: ModelTable,
    catalog: Catalog,
    breakers: BreakerBoard,
    metrics: GatewayMetrics,
    counter: TokenCounter,
) -> RouteStage:
    """One selector per routed name, over its candidates (configured chat models the catalog prices)."""
    routing = settings.routing
    price = pricer(table, catalog)
    complexity = ComplexityModel.load()

    def healthy(candidate: Candidate) -> bool:
        return any(breakers.get(d).available() for d in candidate.deployments)

    groups: dict[str, Group] = {}
    for group, route in routing.models.items():
        names = route.candidates or [n for n in table.names() if settings.models[n].kind != "embeddings"]
        candidates: list[Candidate] = []
        for i, name in enumerate(names):
            info = price(name)
            if info is None or info.kind != "chat":
                if route.candidates:
                    raise ConfigError(
                        f"routing.models.{group}.candidates.{i}: {name!r} has no chat model entry in the catalog "
                        "(add one under catalog.models)",
                        param=f"routing.models.{group}.candidates.{i}",
                    )
                continue
            candidates.append(Candidate(name, info, tuple(d.id for d in table.deployments(name))))
        selector = Selector(
            group,
            candidates,
            counter,
            complexity,
            routing.quality_tiers,
            routing.task_min_quality,
            task=route.task,
            healthy=healthy,
        )
        groups[group] = Group(selector, route.cascade)
    key_policies = {key.name: key.route for key in settings.auth.keys}
    return RouteStage(groups, routing.defaults, key_policies, counter, price, metrics, catalog.currency)


def build_lane(
    settings: Settings,
    table: ModelTable,
    pool: HttpPool,
    pipeline: Handler,
    catalog: Catalog,
    metrics: GatewayMetrics,
    wall_clock: Callable[[], float],
    ledger: Ledger | None = None,
) -> DeferredLane:
    """The deferred lane: its store, the Batch API adapters its deployments need, and its worker, which
    answers other requests through the same pipeline as clients' requests."""
    apis: dict[str, BatchApi] = {}
    for name in sorted({d.provider for d in table.all_deployments() if d.batch_api}):
        module, _, cls_name = BATCH_APIS[name].partition(":")
        apis[name] = getattr(importlib.import_module(module), cls_name)(pool)
    deferred = DeferredMetrics(metrics.model_label)
    metrics.add_collector(deferred.collect)
    store = BatchStore(settings.batches.url)

    def record(cost: DeferredCost) -> None:
        deferred.record(cost)
        # Requests the lane ran through the pipeline are in the ledger already (the observe stage wrote them);
        # those answered by a provider's Batch API are written here, their saving put down to batching.
        if ledger is not None and cost.via_batch_api:
            ledger.record(batch_ledger_record(cost, wall_clock()))

    return DeferredLane(store, table, apis, pipeline, catalog, settings.batches, record, clock=wall_clock)


def batch_ledger_record(cost: DeferredCost, at: float) -> LedgerRecord:
    """The ledger row of a request a provider's Batch API answered: priced at the batch price, its baseline
    the synchronous price (the lane does not see token counts per request: 0)."""
    return LedgerRecord(
        at=at,
        request_id=f"{cost.batch_id}/{cost.custom_id}",
        tenant=cost.tenant,
        key_name="",
        operation="batch",
        requested_model=cost.model,
        routed_model=cost.model,
        response_model=cost.upstream_model,
        prompt_tokens=0,
        completion_tokens=0,
        cached_tokens=0,
        cost_micros=cost.cost_micros,
        baseline_micros=cost.sync_cost_micros,
        cache_status="bypass",
        cause="batching",
        latency_ms=0.0,
        outcome="ok",
        stream=False,
    )


def build_coalesce(
    settings: Settings,
    flight: SingleFlight[Piece],
    cache_stage: CacheStage | None,
    metrics: GatewayMetrics,
) -> CoalesceStage:
    """Single-flight (needs the cache's key), its lease across instances (needs Redis) and the embeddings
    micro-batcher, as the ``coalesce`` settings say."""
    s = settings.coalesce
    lease: RedisLease | None = None
    redis_url = s.lease.url or next((t.url for t in settings.cache.tiers if t.kind == "redis"), None)
    if cache_stage is not None and s.single_flight and s.lease.enabled and redis_url and cache_stage.shared:
        lease = RedisLease(
            redis_url,
            ttl_s=s.lease.ttl_s,
            wait_s=s.lease.wait_s,
            poll_s=s.lease.poll_ms / 1000,
            timeout_s=s.lease.timeout_s,
            observer=metrics.coalesce,
        )  # real time, not the injected sleep and clock: this is polling, not back-off
    key_policies = {key.name: key.coalesce for key in settings.auth.keys}
    stage = CoalesceStage(
        flight,
        settings=s,
        key_policies=key_policies,
        lease=lease,
        lookup=cache_stage.peek if cache_stage is not None else None,
    )
    batch = s.embeddings_batch
    if batch.enabled:
        stage.embeddings_batcher(
            max_wait_s=batch.max_wait_ms / 1000,
            max_items=batch.max_items,
            max_size=batch.max_chars,
            observer=metrics.coalesce,
        )
    return stage


def coalesce_metrics(
    stage: CoalesceStage, metrics: GatewayMetrics, cache_stage: CacheStage | None = None
) -> Iterable[Metric]:
    flight = stage.flight
    found = metrics.coalesce.leases.labels(Claim.FOUND.value).value
    grouped = cache_stage.grouped if cache_stage is not None else 0  # followers too, told apart here
    yield counter_family(
        "atajo_coalesce_calls_saved",
        "Upstream calls saved: requests that shared an identical one's call (single_flight, in this instance or "
        "another's through the lease), went out in another's batch (batching), or shared the call of the same "
        "question asked in other words (grouping)",
        ["cause"],
        [
            (["single_flight"], flight.followers - grouped + found),
            (["batching"], stage.batched_calls_saved),
            (["grouping"], grouped),
        ],
    )
    yield counter_family(
        "atajo_coalesced_requests",
        "Requests that shared an identical in-flight request's upstream call in this instance",
        [],
        [([], flight.followers)],
    )
    yield gauge_family(
        "atajo_coalesce_in_flight", "Distinct requests being computed for waiting callers", [], [([], flight.in_flight)]
    )


def _provider_embeddings(upstream: UpstreamStage, model: str) -> Callable[[Sequence[str]], Awaitable[Any]]:
    """The semantic tier's embeddings from ``model``'s deployments through this gateway's own upstream stage
    (retries, fallbacks and breakers included; no cache, no client limits), one call per batch of texts."""
    from atajo.cache.semantic.tier import vectors_from_openai

    serial = itertools.count(1)

    async def embed(texts: Sequence[str]) -> Any:
        request = EmbeddingsRequest(model, {"model": model, "input": list(texts)})
        ctx = RequestContext(request_id=f"atajo-semantic-{next(serial)}", route="embeddings", headers={})
        result = await upstream(request, ctx)
        if not isinstance(result, Completion):
            raise TypeError("an embeddings call answered with a stream")
        return vectors_from_openai(result.body, len(texts))

    return embed


def cache_metrics(cache: CacheService) -> Iterable[Metric]:
    """Sizes as of the last refresh (every few seconds): scrapes never wait on a tier."""
    tiers = cache.chain.tiers
    yield gauge_family(
        "atajo_cache_entries", "Entries held per cache tier", ["tier"], [([t.name], t.stats.entries) for t in tiers]
    )
    yield gauge_family(
        "atajo_cache_size_bytes", "Bytes held per cache tier", ["tier"], [([t.name], t.stats.bytes) for t in tiers]
    )
    yield counter_family(
        "atajo_cache_evictions",
        "Entries evicted to respect a tier's size bound",
        ["tier"],
        [([t.name], t.stats.evictions) for t in tiers],
    )
    yield gauge_family(
        "atajo_cache_tier_up", "1 when a tier is in use, 0 while it is skipped after a failure", ["tier"],
        [([t.name], 0 if t.down_until else 1) for t in tiers],
    )  # fmt: skip


class Gateway:
    """The application: its services, its routes, and start-up / shutdown around serving them."""

    def __init__(self, services: Services, router: Router) -> None:
        self.services = services
        self.router = router

    async def dispatch(self, request: Request) -> Reply:
        return await self.router.dispatch(request)

    async def start(self) -> None:
        await self.services.pool.start()
        if self.services.ledger is not None:
            await self.services.ledger.start()
        if self.services.virtual_keys is not None:
            await self.services.virtual_keys.start()
        if self.services.adaptive is not None and self.services.load is not None:
            await self.services.load.start()
            await self.services.adaptive.start()
        if self.services.cache is not None:
            await self.services.cache.start()
        if self.services.lane is not None:
            await self.services.lane.start()  # opens its store in the background: a failure there is logged
        self.services.server.accepting = True

    async def stop(self) -> None:
        """Readiness turns to 503 (load balancers stop sending) while in-flight requests finish."""
        self.services.server.accepting = False

    async def close(self) -> None:
        if self.services.lane is not None:
            await self.services.lane.close()
            await self.services.lane.store.close()
        await self.services.coalesce.close()
        await self.services.budgets.close()
        if self.services.ledger is not None:
            await self.services.ledger.close()
        if self.services.cache is not None:
            await self.services.cache.close()
        if self.services.virtual_keys is not None:
            await self.services.virtual_keys.close()
        if self.services.adaptive is not None and self.services.load is not None:
            await self.services.adaptive.close()
            await self.services.load.close()
        if self.services.limiter is not None:
            await self.services.limiter.storage.close()
        await self.services.pool.close()

    async def serve(
        self,
        *,
        sock: socket.socket | None = None,
        host: str | None = None,
        port: int | None = None,
        access_log: logging.Logger | None = None,
    ) -> EdgeServer:
        """Start the services, then listen (on ``sock``, or ``host``:``port``)."""
        await self.start()
        server = self.services.settings.server
        batches = self.services.settings.batches
        limits = Limits(
            body_limits=(("/v1/files", batches.max_file_bytes),) if batches.enabled else (),
            max_body_bytes=server.max_body_bytes,
            max_header_bytes=server.max_header_bytes,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            keep_alive_s=server.keepalive_s,
        )
        edge = EdgeServer(self.router.dispatch, limits)
        edge.access_log = access_log
        await edge.listen(sock=sock, host=host, port=port)
        return edge

    async def shutdown(self, edge: EdgeServer, timeout_s: float = 10) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout_s``), then close the services."""
        await self.stop()
        await edge.shutdown(timeout_s)
        await self.close()


def build_app(
    settings: Settings,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> Gateway:
    services = build_services(settings, sleep=sleep, clock=clock, wall_clock=wall_clock)
    router = Router(services.server.routes())
    if services.cache is not None:
        router.add(CacheAdmin(services.cache, services.keys.authenticate, services.server.request_id).routes())
    if services.lane is not None:
        api = BatchesApi(
            services.lane.store,
            services.lane,
            services.keys.authenticate,
            services.server.request_id,
            settings.batches,
            services.table.has,
            clock=wall_clock,
        )
        router.add(api.routes())
        queued = QueuedRequests(
            services.lane.store,
            services.lane.collector,
            services.keys.authenticate,
            services.server.request_id,
            services.table.has,
            clock=wall_clock,
        )
        services.server.defer = queued.defer
        router.add(queued.routes())
    if services.virtual_keys is not None:
        admin = KeysAdmin(
            services.virtual_keys,
            services.keys.authenticate,
            services.server.request_id,
            describe_key=partial(_describe_key, services) if services.limiter else None,
            describe_limits=partial(_describe_limits, services) if services.limiter else None,
        )
        router.add(admin.routes())
    return Gateway(services, router)


def _describe_limits(services: Services) -> JSONObject:
    limiter, adaptive = services.limiter, services.adaptive
    assert limiter is not None and adaptive is not None
    scopes = [
        {"scope": s.kind, "name": s.name, **s.limits.model_dump(exclude_none=True)} for s in limiter.configured_scopes()
    ]
    return {
        "storage": limiter.storage.name,
        "shadow": limiter.settings.shadow,
        "adaptive": adaptive.describe(),
        "configured": scopes,
    }


def _describe_key(services: Services, record: KeyRecord) -> JSONObject:
    """A key's limits in force now: what it carries (or the defaults) times its multipliers."""
    limiter, adaptive = services.limiter, services.adaptive
    assert limiter is not None and adaptive is not None
    principal = principal_of(record, None, services.settings.limits.tenants)
    limits = limiter.scopes(principal, "")
    m = adaptive.load.value * adaptive.client_factor(principal) if adaptive.settings.enabled else 1.0
    own = next((s.limits for s in limits if s.kind == "key"), None)
    effective: JSONObject = {}
    if own is not None:
        factor = m if own.adaptive else 1.0
        for unit, limit in (("rpm", own.rpm), ("tpm", own.tpm)):
            if limit is not None:
                effective[unit] = max(1, int(limit * factor))
    return {
        "limits": effective,
        "multiplier": round(m if own is None or own.adaptive else 1.0, 6),
        "factors": {"load": adaptive.load.value, "client": adaptive.client_factor(principal)},
        "note": "requests for a model whose upstream is failing are also scaled by that model's upstream factor",
    }


def describe_startup(settings: Settings, keys_open: bool) -> list[str]:
    """What the operator must know at start-up, as log lines."""
    lines = []
    if settings.simulated_only:
        lines.append(
            "provider: SIMULATED. No provider is configured, so answers are generated locally with no network "
            "(set OPENAI_API_KEY or pass --config to reach a real provider)"
        )
    else:
        providers = sorted({d.provider for m in settings.models.values() for d in m.deployments})
        lines.append(f"providers: {', '.join(providers)}; models: {', '.join(sorted(settings.models))}")
    if settings.cache.enabled:
        tiers = " → ".join(f"{t.kind} {_redact(t.url)} ({t.ttl_s:g} s)" for t in settings.cache.tiers)
        semantic = settings.cache.semantic
        if semantic.enabled:
            embedder = "local model" if semantic.embedder == "local" else f"embeddings of {semantic.embedder}"
            tiers += f" → semantic {_redact(semantic.store)} ({embedder})"
        lines.append(f"cache: {tiers} → provider")
    else:
        lines.append("cache: off")
    if settings.ledger.enabled:
        lines.append(f"ledger: {_redact(settings.ledger.url)} (written every {settings.ledger.flush_interval_s:g} s)")
    if keys_open:
        lines.append("auth: no keys configured, the gateway accepts every caller (set ATAJO_MASTER_KEY)")
    return lines


def _redact(url: str) -> str:
    """A URL fit for logs: any user:password part replaced."""
    return re.sub(r"//[^@/]*@", "//***@", url)
