"""Cache stage: when to look up, when to store, and what a hit looks like.

Per request, with HTTP's vocabulary: ``Cache-Control: no-cache`` skips the lookup but stores the fresh
answer; ``no-store`` looks up but stores nothing; both together bypass the cache; ``max-age=N`` accepts only
entries up to N seconds old. ``x-atajo-cache-ttl: N`` stores for N seconds in every tier (0: do not store),
``x-atajo-cache-namespace`` keeps a separate set of entries, ``x-atajo-cache-tags`` adds dependency tags.
Policies per model and per key (``enabled``, ``ttl_s``, ``cache_sampled``, ``stale_if_error_s``) refine the
``cache`` section's defaults.

Only complete, successful answers are stored, behind the response. A streamed answer is stored once it has
ended cleanly; a hit for a streaming request is replayed as a stream. When every provider fails and an
expired entry is still within the stale-if-error window, it is served, marked ``stale``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

import orjson

from atajo.cache.entry import Entry
from atajo.cache.service import CacheService
from atajo.cache.tags import MAX_TAGS, valid_tag
from atajo.cache.tiers import Fill
from atajo.core.answers import (
    completion_from_chunks,
    is_complete_chat,
    is_complete_embeddings,
    replay,
)
from atajo.core.cache_key import RequestKey, request_key
from atajo.core.catalog import Catalog
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import Completion, Result, Usage
from atajo.errors import AllAttemptsFailed, InvalidRequest, UpstreamError, UpstreamRejected
from atajo.observe.metrics import GatewayMetrics
from atajo.settings import NAME_PATTERN, CachePolicy, CacheSettings
from atajo.types import JSONObject

if TYPE_CHECKING:
    from atajo.cache.semantic.tier import Found, Query, SemanticTier

log = logging.getLogger("atajo.cache")

_NAMESPACE = re.compile(NAME_PATTERN)
VALUE_VERSION = 2
"""A stored value is one line of JSON about the answer, a newline, then the answer's JSON bytes as sent."""
_VALUE_PREFIX = b'{"v":%d,' % VALUE_VERSION


@dataclass(frozen=True, slots=True)
class Plan:
    lookup: bool
    store: bool
    max_age_s: float | None
    ttl_s: float | None
    namespace: str
    stale_if_error_s: float
    semantic: bool = False


@dataclass(frozen=True, slots=True)
class _Policy:
    enabled: bool
    ttl_s: float | None
    cache_sampled: bool
    stale_if_error_s: float
    semantic: bool


class CacheStage:
    name = "cache"

    def __init__(
        self,
        service: CacheService,
        settings: CacheSettings,
        key_policies: Mapping[str, CachePolicy],
        catalog: Catalog,
        metrics: GatewayMetrics,
        in_flight: Callable[[str], bool] | None = None,
    ) -> None:
        self.service = service
        self.in_flight = in_flight
        """Whether an identical request is being answered now: it is then joined (coalesce stage) without
        looking up the slower tiers, whose answer would arrive after the call it could have shared."""
        self.chain = service.chain
        self.semantic: SemanticTier | None = service.semantic
        self.grouping_for: Callable[[str, str], bool] | None = None
        """Whether grouping by similarity is on for (model, key name): set by the coalesce stage's policy."""
        self.grouped = 0
        """Requests that shared an in-flight call for the same question in other words."""
        self.settings = settings
        self.key_policies = dict(key_policies)
        self.catalog = catalog
        self.metrics = metrics
        self._policies: dict[tuple[str, str], _Policy] = {}
        self.shared = any(not tier.local for tier in self.chain.tiers)
        """Whether a tier is shared with other instances (Redis, SQL): where their answers can be found."""

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        plan = self.plan(request, ctx)
        if plan is None:
            ctx.cache_status = "bypass"
            return await call_next(request, ctx)
        tenant = ctx.principal.tenant if ctx.principal else "default"
        given_tags = self.given_tags(ctx) if plan.store else frozenset()  # bad tags fail before any work
        keys = request_key(request, tenant, plan.namespace)  # the exact key and the semantic parts, in one pass
        key = ctx.cache_key = keys.key
        generation = self.chain.generation
        stale: Entry | None = None
        joining = self.in_flight is not None and self.in_flight(key)
        ctx.cache_shared = plan.store and self.shared
        if plan.lookup and not joining:
            found = await self.chain.get(key, plan.max_age_s)
            if found.entry is not None and found.entry.value.startswith(_VALUE_PREFIX):
                return self._answer(request, ctx, found.entry, f"hit-{found.tier}")
            if (
                found.stale is not None
                and found.stale.value.startswith(_VALUE_PREFIX)
                and self.chain.clock() <= found.stale.fresh_until + plan.stale_if_error_s
            ):
                stale = found.stale
        query: Query | None = None
        if plan.semantic and self.semantic is not None:
            query = self._semantic_query(request, tenant, plan, keys)
            if query is not None and plan.lookup and not joining:
                semantic = await self.semantic.find(query, embed_empty=self._grouping(request, ctx))
                query = semantic.query if semantic is not None else None
                if semantic is not None and semantic.match.hit:
                    answer = await self._semantic_answer(request, ctx, plan, semantic, generation)
                    if answer is not None:
                        return answer
        landed = None
        if query is not None and self.semantic is not None and not joining:
            grouped = self._group(request, ctx, query, key)
            landed = self.semantic.fly(query, key) if not grouped else None
        try:
            result = await call_next(request, ctx)
        except (UpstreamError, AllAttemptsFailed) as err:
            if stale is None or not _provider_failed(err):
                raise
            log.warning("serving a stale answer for %s: providers failed (%s)", ctx.request_id, err.message)
            return self._answer(request, ctx, stale, "stale")
        finally:
            if landed is not None:
                landed()
        if ctx.cache_key != key and ctx.coalesced:
            self.grouped += 1  # it shared the call of the same question asked in other words
        if not plan.store or ctx.coalesced:
            return result
        tags = given_tags | self.service.rules.derive(request.body)
        fill = _Pending(self, request, ctx, plan, tenant, key, tags, generation, query)
        if isinstance(result, Completion):
            fill.store(result.body)
        else:
            result.chunks = fill.record(result.chunks)
        return result

    async def peek(self, request: Request, ctx: RequestContext) -> Completion | None:
        """The answer stored under ``ctx.cache_key`` now, as a whole completion (another instance's, waited for
        through the coalesce stage's lease); None while there is none."""
        if ctx.cache_key is None:
            return None
        found = await self.chain.get(ctx.cache_key)
        entry = found.entry
        if entry is None or not entry.value.startswith(_VALUE_PREFIX):
            return None
        answer = self._answer(request, ctx, entry, f"hit-{found.tier}", whole=True)
        assert isinstance(answer, Completion)
        return answer

    # --- deciding ---------------------------------------------------------------------------------

    def plan(self, request: Request, ctx: RequestContext) -> Plan | None:
        """What to do for this request, from its headers and the policies; None: bypass the cache."""
        principal = ctx.principal
        policy = self._policy(
            request.model, principal.key_name if principal else "", principal.cache if principal else None
        )
        if not policy.enabled:
            return None
        if not policy.cache_sampled and request.operation == "chat":
            temperature = request.body.get("temperature")
            if temperature is None or temperature > 0:  # absent means the provider's default of 1
                return None
        headers = ctx.headers
        lookup = store = True
        max_age_s: float | None = None
        control = headers.get("cache-control")
        if control:
            for directive in control.lower().split(","):
                name, _, value = directive.strip().partition("=")
                if name == "no-cache":
                    lookup = False
                elif name == "no-store":
                    store = False
                elif name == "max-age":
                    max_age_s = _seconds(value, "cache-control", "max-age")
        ttl_s = policy.ttl_s
        raw_ttl = headers.get("x-atajo-cache-ttl")
        if raw_ttl is not None:
            ttl_s = _seconds(raw_ttl, "x-atajo-cache-ttl", "x-atajo-cache-ttl")
            if ttl_s > self.settings.max_ttl_s:
                raise InvalidRequest(
                    f"x-atajo-cache-ttl may be at most {self.settings.max_ttl_s:g} seconds.", param="x-atajo-cache-ttl"
                )
            if ttl_s == 0:
                store = False
        if not lookup and not store:
            return None
        namespace = headers.get("x-atajo-cache-namespace") or "default"
        if not _NAMESPACE.match(namespace):
            raise InvalidRequest(
                "x-atajo-cache-namespace must be 1 to 64 letters, digits or any of _ . : -",
                param="x-atajo-cache-namespace",
            )
        semantic = policy.semantic and self.service.semantic is not None
        return Plan(lookup, store, max_age_s, ttl_s, namespace, policy.stale_if_error_s, semantic)

    def _policy(self, model: str, key_name: str, key_policy: CachePolicy | None = None) -> _Policy:
        """The model's policy refined by the key's: a static key's from ``auth.keys``, else what the principal
        carries (a virtual key's, which does not change once issued)."""
        cached = self._policies.get((model, key_name))
        if cached is not None:
            return cached
        s = self.settings
        enabled, ttl_s, sampled, stale = s.enabled, None, s.cache_sampled, s.stale_if_error_s
        semantic = s.semantic.enabled
        layers = [
            self.settings.models.get(model) or self.settings.models.get("*"),
            self.key_policies.get(key_name) or key_policy,
        ]
        for layer in layers:
            if layer is None:
                continue
            enabled = layer.enabled if layer.enabled is not None else enabled
            ttl_s = layer.ttl_s if layer.ttl_s is not None else ttl_s
            sampled = layer.cache_sampled if layer.cache_sampled is not None else sampled
            stale = layer.stale_if_error_s if layer.stale_if_error_s is not None else stale
            semantic = layer.semantic if layer.semantic is not None else semantic
        policy = self._policies[(model, key_name)] = _Policy(
            enabled, ttl_s, sampled, min(stale, s.stale_if_error_s), semantic and s.semantic.enabled
        )
        return policy

    def given_tags(self, ctx: RequestContext) -> frozenset[str]:
        """The client's tags (``x-atajo-cache-tags``), checked; the rules' tags are added on a miss only."""
        tags: set[str] = set()
        given = ctx.headers.get("x-atajo-cache-tags")
        if given:
            for tag in (t.strip() for t in given.split(",")):
                if not tag:
                    continue
                if not valid_tag(tag):
                    raise InvalidRequest(
                        f"x-atajo-cache-tags: {tag[:40]!r} is not a valid tag (letters, digits and _ . : @ # = + -).",
                        param="x-atajo-cache-tags",
                    )
                tags.add(tag)
        if len(tags) > MAX_TAGS:
            raise InvalidRequest(f"at most {MAX_TAGS} cache tags per request", param="x-atajo-cache-tags")
        return frozenset(tags)

    # --- the semantic tier -----------------------------------------------------------------------

    def _semantic_query(self, request: Request, tenant: str, plan: Plan, keys: RequestKey) -> Query | None:
        """The request's asked text and partition, or None when it has nothing the tier can match on."""
        assert self.semantic is not None
        text, digest = keys.asked, keys.partition
        if text is None or digest is None or len(text) > self.settings.semantic.max_chars:
            return None
        return self.semantic.query(f"{tenant}/{plan.namespace}/{quote(request.model, safe='')}/{digest}", text)

    def _grouping(self, request: Request, ctx: RequestContext) -> bool:
        if self.grouping_for is None:
            return False
        return self.grouping_for(request.model, ctx.principal.key_name if ctx.principal else "")

    def _group(self, request: Request, ctx: RequestContext, query: Query, key: str) -> bool:
        """Hand this request the cache key of an in-flight request that asks the same question in other
        words, so the coalesce stage makes it share that call (while that call is still in flight)."""
        assert self.semantic is not None
        if not self._grouping(request, ctx) or self.in_flight is None:
            return False
        found = self.semantic.twin(query, key)
        if found is None or not self.in_flight(found[0]):
            return False
        twin, match = found
        ctx.cache_key = twin
        ctx.extra_headers = {
            **(ctx.extra_headers or {}),
            "x-atajo-grouped-with": twin.partition("/")[2],
            "x-atajo-cache-similarity": f"{match.neighbour.score:.4f}" if match.neighbour else "",
        }
        return True

    async def _semantic_answer(
        self, request: Request, ctx: RequestContext, plan: Plan, found: Found, generation: int
    ) -> Result | None:
        """Serve the entry the match points at, if the exact tiers still hold it fresh; also store it under
        this request's own key (same tags, same remaining life), so the same wording next time hits exactly."""
        assert self.semantic is not None and found.match.neighbour is not None
        neighbour = found.match.neighbour
        looked = await self.chain.get(neighbour.key, plan.max_age_s)
        entry = looked.entry
        if entry is None or not entry.value.startswith(_VALUE_PREFIX):
            if looked.stale is None:
                await self.semantic.dead(neighbour.key)
            return None
        ctx.extra_headers = {
            **(ctx.extra_headers or {}),
            "x-atajo-cache-similarity": f"{neighbour.score:.4f}",
            "x-atajo-cache-match": neighbour.key.partition("/")[2],
        }
        remaining = entry.fresh_until - self.chain.clock()
        if plan.store and ctx.cache_key is not None and remaining > 1:
            fill = Fill(ctx.cache_key, entry.tenant, entry.namespace, entry.value, entry.tags, remaining, generation)
            self.chain.store(fill)
        return self._answer(request, ctx, entry, "hit-semantic")

    # --- answering from the cache -----------------------------------------------------------------

    def _answer(self, request: Request, ctx: RequestContext, entry: Entry, status: str, whole: bool = False) -> Result:
        head, _, raw = entry.value.partition(b"\n")
        stored = orjson.loads(head)
        usage = Usage.from_openai(stored.get("usage"))
        ctx.cache_status = status
        ctx.cache_age_s = max(0.0, self.chain.clock() - entry.created_at)
        ctx.routed_model = ctx.routed_model or request.model
        ctx.response_model = stored.get("model")
        ctx.cost_micros = 0
        ctx.simulated = bool(stored.get("simulated"))  # a simulated answer stays labelled as one
        upstream_model = stored.get("upstream_model")
        info = self.catalog.get(upstream_model) if upstream_model else None
        if info is not None and usage is not None:
            self.metrics.cache_saved.labels(self.metrics.model_label(request.model)).inc(info.cost_micros(usage))
        if request.stream and not whole:
            include_usage = bool(getattr(request, "include_usage", False))
            return replay(orjson.loads(raw), include_usage, usage)
        return Completion(usage=usage, raw=raw)


class _Pending:
    """An answer on its way from the provider, to be stored once known to be whole."""

    __slots__ = ("ctx", "generation", "key", "plan", "query", "request", "stage", "tags", "tenant")

    def __init__(
        self,
        stage: CacheStage,
        request: Request,
        ctx: RequestContext,
        plan: Plan,
        tenant: str,
        key: str,
        tags: frozenset[str],
        generation: int,
        query: Query | None = None,
    ) -> None:
        self.stage, self.request, self.ctx, self.plan = stage, request, ctx, plan
        self.tenant, self.key, self.tags, self.generation = tenant, key, tags, generation
        self.query = query

    def store(self, body: JSONObject) -> None:
        complete = is_complete_chat(body) if self.request.operation == "chat" else is_complete_embeddings(body)
        if not complete:
            return
        head = orjson.dumps(
            {
                "v": VALUE_VERSION,
                "op": self.request.operation,
                "model": body.get("model"),
                "usage": body.get("usage"),
                "upstream_model": self.ctx.upstream_model,
                "simulated": self.ctx.simulated,
            }
        )
        value = head + b"\n" + orjson.dumps(body)
        self.stage.chain.store(
            Fill(
                self.key,
                self.tenant,
                self.plan.namespace,
                value,
                self.tags,
                self.plan.ttl_s,
                self.generation,
            )
        )
        semantic = self.stage.semantic
        if self.query is not None and semantic is not None:
            chain = self.stage.chain
            ttl_s = self.plan.ttl_s if self.plan.ttl_s is not None else max(t.ttl_s for t in chain.tiers)
            semantic.remember_answer(
                self.query,
                key=self.key,
                tenant=self.tenant,
                namespace=self.plan.namespace,
                tags=self.tags,
                keep_until=chain.clock() + ttl_s + chain.stale_if_error_s,
                generation=self.generation,
            )

    async def record(self, chunks: AsyncGenerator[JSONObject, None]) -> AsyncGenerator[JSONObject, None]:
        """Pass the chunks on; store the answer they make if the stream ends cleanly."""
        seen: list[JSONObject] = []
        async for chunk in chunks:
            seen.append(chunk)
            yield chunk
        body = completion_from_chunks(seen)
        if body is not None:
            self.store(body)


def _provider_failed(err: UpstreamError | AllAttemptsFailed) -> bool:
    """Whether the failure is the providers' (worth a stale answer), not the request's."""
    if isinstance(err, UpstreamRejected):
        return False
    return err.status >= 500 or err.status == 429


def _seconds(raw: str, header: str, what: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise InvalidRequest(f"{what} in {header} must be a number of seconds (0 or more).", param=header)
    return value
