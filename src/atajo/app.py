"""Composition root: settings → services → pipeline → a :class:`Gateway` (routes + lifecycle) served by the edge.

The pipeline's order is declared here, once:

    observe → ratelimit → cache → coalesce → upstream          (guard and route join as they land)

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
from atajo.cache.service import CacheService
from atajo.coalesce.singleflight import SingleFlight
from atajo.core.catalog import Catalog
from atajo.core.context import Principal, RequestContext
from atajo.core.deployments import Deployment
from atajo.core.pipeline import Stage, build_pipeline
from atajo.core.requests import EmbeddingsRequest
from atajo.core.requests import Request as CoreRequest
from atajo.core.results import Completion
from atajo.limits.adaptive import Adaptive, GatewayLoad
from atajo.limits.concurrency import ConcurrencyBoard, GuardedProvider
from atajo.limits.estimate import estimate_tokens
from atajo.limits.gcra import MemoryStorage, Storage
from atajo.limits.limiter import Limiter
from atajo.observe.metrics import GatewayMetrics, counter_family, gauge_family
from atajo.providers.base import Provider
from atajo.providers.pool import HttpPool
from atajo.routing.breaker import BreakerBoard
from atajo.routing.retry import RetryPolicy
from atajo.routing.table import ModelTable
from atajo.server.cache_admin import CacheAdmin
from atajo.server.edge import EdgeServer, Limits, Reply, Request
from atajo.server.http import GatewayServer, Router
from atajo.server.keys_admin import KeysAdmin
from atajo.settings import Settings
from atajo.stages.cache import CacheStage
from atajo.stages.coalesce import CoalesceStage, SharedOutcome
from atajo.stages.observe import ObserveStage
from atajo.stages.ratelimit import RateLimitStage
from atajo.stages.upstream import Sleep, UpstreamStage
from atajo.types import JSONObject

log = logging.getLogger("atajo")

# Provider name → "module:class"; imported only when a deployment uses it.
PROVIDERS = {
    "openai": "atajo.providers.openai:OpenAIProvider",
    "anthropic": "atajo.providers.anthropic:AnthropicProvider",
    "simulated": "atajo.providers.simulated:SimulatedProvider",
}


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
    catalog = Catalog.bundled()
    pool = HttpPool(settings.pool)
    table = build_table(settings)
    metrics.set_model_names(table.names())
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
    stages: list[Stage] = [ObserveStage(metrics, catalog)]
    limiter: Limiter | None = None
    adaptive: Adaptive | None = None
    load: GatewayLoad | None = None
    if settings.limits.enabled and can_limit(settings):
        tuning = settings.limits.adaptive
        load = GatewayLoad(lambda: metrics.in_flight.value, tuning.capacity, tuning.max_loop_lag_s)
        names = frozenset(table.names())
        adaptive = Adaptive(tuning, load, clock=clock, model_key=lambda m: m if m in names else "*")
        limiter = Limiter(settings.limits, build_storage(settings, clock), adaptive, clock=clock)
        output = settings.limits.output_tokens
        stages.append(RateLimitStage(limiter, partial(_estimate, output=output), adaptive.record_upstream))
    cache: CacheService | None = None
    # Single-flight groups requests by the cache key, so it joins when the cache is on.
    flight: SingleFlight[SharedOutcome] = SingleFlight()
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
        stages.append(CacheStage(cache, settings.cache, key_policies, catalog, metrics, in_flight=flight.busy))
    stages.append(CoalesceStage(flight))
    pipeline = build_pipeline(stages, upstream)
    server = GatewayServer(
        pipeline,
        metrics,
        max_body_bytes=settings.server.max_body_bytes,
        model_names=table.names,
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
    metrics.add_collector(partial(flight_metrics, flight))
    if limiter is not None and adaptive is not None:
        metrics.add_collector(partial(limiter_metrics, limiter, adaptive))
    if concurrency is not None:
        metrics.add_collector(partial(concurrency_metrics, concurrency))
    return Services(
        settings, metrics, pool, table, breakers, keys, catalog, server, cache, virtual_keys, limiter, adaptive, load
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


def flight_metrics(flight: SingleFlight[SharedOutcome]) -> Iterable[Metric]:
    yield counter_family(
        "atajo_coalesced_requests",
        "Requests that shared an identical in-flight request's upstream call (calls saved)",
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
        if self.services.virtual_keys is not None:
            await self.services.virtual_keys.start()
        if self.services.adaptive is not None and self.services.load is not None:
            await self.services.load.start()
            await self.services.adaptive.start()
        if self.services.cache is not None:
            await self.services.cache.start()
        self.services.server.accepting = True

    async def stop(self) -> None:
        """Readiness turns to 503 (load balancers stop sending) while in-flight requests finish."""
        self.services.server.accepting = False

    async def close(self) -> None:
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
        limits = Limits(
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
        lines.append(f"cache: {tiers} → provider")
    else:
        lines.append("cache: off")
    if keys_open:
        lines.append("auth: no keys configured, the gateway accepts every caller (set ATAJO_MASTER_KEY)")
    return lines


def _redact(url: str) -> str:
    """A URL fit for logs: any user:password part replaced."""
    return re.sub(r"//[^@/]*@", "//***@", url)
