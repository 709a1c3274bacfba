"""Settings: pydantic models for the YAML config plus environment overrides. Validation only, no I/O
beyond reading the one file it is given.

Precedence, lowest first: defaults < YAML file < ``ATAJO_<SECTION>__<KEY>`` variables < ``ATAJO_MASTER_KEY``.
String values in the YAML may use ``${VAR}`` or ``${VAR:-default}``, so secrets stay in the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from atajo.errors import ConfigError

ProviderName = Literal["openai", "anthropic", "simulated"]
PositiveFloat = Annotated[float, Field(gt=0)]

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
    "simulated": "simulated://local",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    workers: int = Field(1, ge=1, le=64)
    access_log: bool = False
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024, description="request line + headers (431)")
    header_timeout_s: PositiveFloat = Field(10.0, description="first byte to end of headers (408; slowloris)")
    body_timeout_s: PositiveFloat = Field(30.0, description="longest wait for the next body byte (408)")
    keepalive_s: PositiveFloat = Field(75.0, description="idle keep-alive connections are closed after this")


NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
"""Tenants and cache namespaces: they become parts of cache keys, so no ``/`` and nothing exotic."""


class CachePolicy(_Model):
    """Per model (``cache.models``) or per key (``auth.keys[].cache``); unset fields inherit. The key's policy
    wins over the model's, which wins over the ``cache`` section's defaults."""

    enabled: bool | None = None
    ttl_s: PositiveFloat | None = Field(None, description="overrides every tier's TTL for these answers")
    cache_sampled: bool | None = Field(None, description="cache requests with temperature > 0")
    stale_if_error_s: float | None = Field(None, ge=0)
    semantic: bool | None = Field(None, description="use the semantic tier (when cache.semantic.enabled)")


class CoalescePolicy(_Model):
    """Per model (``coalesce.models``) or per key (``auth.keys[].coalesce``); unset fields inherit. The key's
    policy wins over the model's, which wins over the ``coalesce`` section's defaults."""

    single_flight: bool | None = Field(None, description="share identical requests in flight")
    embeddings_batch: bool | None = Field(None, description="send concurrent embeddings requests as one call")
    grouping: bool | None = Field(None, description="share a call with an in-flight request asking the same question")


def to_micros(amount: float | str) -> int:
    """A decimal amount of money in the catalog's currency → integer micro-units (rounded down)."""
    return int(Decimal(str(amount)) * 1_000_000)


Money = Annotated[float, Field(ge=0, description="an amount in the catalog's currency, e.g. 0.05")]


class RoutePolicy(_Model):
    """Per-request constraints on a routed model (``routing.defaults``, ``auth.keys[].route``); the request's
    ``x-atajo-max-cost``, ``x-atajo-max-latency-ms`` and ``x-atajo-min-quality`` headers win over these."""

    max_cost: Money | None = Field(None, description="most a request may cost (estimated before the call)")
    max_latency_ms: PositiveFloat | None = Field(None, description="most a request may take (estimated)")
    min_quality: float | None = Field(None, ge=0, le=1, description="least catalog quality score of the model")


class RateLimit(_Model):
    """Requests and tokens per minute for one scope (a key, a tenant, a model, the whole gateway). A burst is
    how many may arrive at once after a quiet spell; by default the per-minute figure (so a limit of 100 per
    minute lets 100 through at once, then one every 0.6 s). ``adaptive: false`` pins the figures: the adaptive
    multipliers (load, client behaviour, upstream errors) are not applied to them."""

    rpm: int | None = Field(None, ge=1, le=10**9, description="requests per minute")
    tpm: int | None = Field(None, ge=1, le=10**12, description="tokens per minute (input + estimated output)")
    request_burst: int | None = Field(None, ge=1, le=10**9, description="requests at once; default rpm")
    token_burst: int | None = Field(None, ge=1, le=10**12, description="tokens at once; default tpm")
    adaptive: bool = True

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None


Trust = Literal["auto", "trusted", "untrusted"]


class ApiKey(_Model):
    """A static key. Give ``key`` (read from env with ${VAR}) or its ``key_sha256`` so no secret is in the file."""

    name: str
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field("default", pattern=NAME_PATTERN, description="whose cache and data this key sees")
    cache: CachePolicy = Field(default_factory=CachePolicy)
    coalesce: CoalescePolicy = Field(default_factory=CoalescePolicy)
    route: RoutePolicy = Field(default_factory=RoutePolicy)
    models: list[str] | None = Field(None, description="the model names this key may use; default: all")
    limits: RateLimit | None = Field(None, description="this key's limits; default: limits.keys")
    trust: Trust = Field("auto", description="auto: judged from behaviour; trusted / untrusted: pinned")

    @model_validator(mode="after")
    def _one_of(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self


class AuthSettings(_Model):
    master_key: SecretStr | None = None
    keys: list[ApiKey] = Field(default_factory=list)
    store: str | None = Field(
        None,
        pattern=r"^((sqlite|postgresql|postgres)://.*|off)$",
        description="where virtual keys and tenants live (sqlite:///…, postgresql://…, off); default: next to the "
        "cache's SQL tier. Used only with a master key (the admin API needs it)",
    )
    store_poll_s: PositiveFloat = Field(
        0.25, le=1.0, description="how often each instance reads the key store's change log (revocations)"
    )
    lookup_ttl_s: PositiveFloat = Field(60.0, description="a virtual key's lookup is kept in memory this long")


class PoolSettings(_Model):
    """Upstream HTTP connection pool, shared by all deployments, limited per host."""

    keepalive_s: PositiveFloat = 30.0
    max_connections_per_host: int = Field(50, ge=1)
    max_connections: int = Field(1000, ge=1)
    timeout_s: PositiveFloat = 60.0
    connect_timeout_s: PositiveFloat = 5.0


class RetrySettings(_Model):
    max_retries: int = Field(2, ge=0, le=10, description="retries per deployment, on retryable errors only")
    backoff_base_ms: float = Field(100, ge=0)
    backoff_max_ms: float = Field(5000, ge=0)
    max_retry_after_s: float = Field(10, ge=0, description="a longer Retry-After moves on to the next deployment")


class BreakerSettings(_Model):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open the circuit")
    cooldown_s: PositiveFloat = Field(30.0, description="open time before one half-open probe is let through")


class SimulatedSettings(_Model):
    """The simulated provider's latency model and fault injection (per deployment, under ``simulated:``)."""

    ttft_ms: float = Field(250, ge=0)
    tokens_per_s: PositiveFloat = 80.0
    jitter: float = Field(0.2, ge=0, le=1, description="relative spread of every latency")
    output_tokens: int = Field(60, ge=1, description="typical answer length when max_tokens is not given")
    error_rate: float = Field(0.0, ge=0, le=1)
    error_status: int = Field(503, ge=400, le=599)
    drop_rate: float = Field(0.0, ge=0, le=1, description="share of streams cut halfway through")
    slow_stream_factor: float = Field(1.0, ge=1, description="multiplies the time between stream chunks")
    seed: int | None = None


class DeploymentSettings(_Model):
    provider: ProviderName
    model: str | None = Field(None, description="upstream model name; empty means the requested name")
    base_url: str | None = None
    api_key: SecretStr | None = None
    auth_header: Literal["authorization", "api-key", "x-api-key"] | None = None
    api_version: str | None = Field(None, description="sent as ?api-version= (Azure) or anthropic-version")
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: PositiveFloat | None = None
    connect_timeout_s: PositiveFloat | None = None
    weight: float = Field(1.0, gt=0)
    stream_usage: bool = Field(True, description="ask the upstream for a usage chunk on every stream")
    batch_api: bool | None = Field(
        None,
        description="send deferred (batch) requests through the upstream's Batch API (OpenAI's /files + "
        "/batches, Anthropic's /messages/batches); default: only for OpenAI's and Anthropic's own APIs",
    )
    simulated: SimulatedSettings = Field(default_factory=SimulatedSettings)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _batch_api_supported(self) -> DeploymentSettings:
        if self.batch_api and self.provider not in ("openai", "anthropic"):
            raise ValueError(
                "batch_api: only OpenAI-compatible Batch APIs and Anthropic's Message Batches are supported, not "
                f"the {self.provider} provider's"
            )
        return self


class ModelSettings(_Model):
    deployments: list[DeploymentSettings] = Field(min_length=1)
    fallbacks: list[str] = Field(default_factory=list, description="model names tried after these deployments")
    kind: Literal["chat", "embeddings", "any"] = "any"


class CacheTierSettings(_Model):
    """One tier of the exact cache, chosen by URL scheme: ``memory://``, ``redis://host:port/db``,
    ``sqlite:///path/file.db`` (``~`` expanded), ``postgresql://user@host:port/db``."""

    url: str = Field(pattern=r"^(memory|redis|rediss|unix|sqlite|postgresql|postgres)://")
    ttl_s: PositiveFloat = Field(description="how long an answer is served from this tier")
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="memory tier: size bound (LRU beyond it)")
    timeout_s: PositiveFloat = Field(0.25, description="longest wait for this tier before skipping it")

    @property
    def kind(self) -> Literal["memory", "redis", "sql"]:
        scheme = self.url.split("://", 1)[0]
        return "memory" if scheme == "memory" else "redis" if scheme in ("redis", "rediss", "unix") else "sql"


class TagRule(_Model):
    """Derive a dependency tag from the request: ``source: user`` (the ``user`` field), ``metadata`` (the
    metadata ``field``), or ``messages`` (every match of ``pattern`` in the messages' text). ``tag`` is a
    template: ``{value}`` is the field's value or the match, ``{name}`` a named group of the pattern."""

    source: Literal["user", "metadata", "messages"]
    tag: str = Field(min_length=1)
    field: str | None = None
    pattern: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> TagRule:
        if self.source == "metadata" and not self.field:
            raise ValueError("a metadata rule needs `field`")
        if self.source == "messages":
            if not self.pattern:
                raise ValueError("a messages rule needs `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        return self


def _default_tiers() -> list[CacheTierSettings]:
    return [
        CacheTierSettings(url="memory://", ttl_s=300),
        CacheTierSettings(url="sqlite:///~/.cache/atajo/cache.db", ttl_s=3600),
    ]


class SemanticSettings(_Model):
    """The semantic tier (``pip install 'atajo[semantic]'``): after the exact tiers miss, answer a question
    asked in other words. Off unless enabled: a semantic hit is a judgement, calibrated to ``decision``'s
    target error rate (default: at most 2 % wrong hits)."""

    enabled: bool = False
    store: str = Field(
        "memory://",
        pattern=r"^(memory|postgresql|postgres)://",
        description="memory:// (per process) or postgresql://… with pgvector (shared by instances)",
    )
    max_entries: int = Field(100_000, ge=1, description="memory store: entries kept (oldest dropped beyond)")
    neighbours: int = Field(4, ge=1, le=32, description="nearest entries the match decision weighs")
    max_chars: int = Field(
        1000, ge=1, description="longer asked texts skip the tier (the embedding sees only the first ~256 tokens)"
    )
    timeout_s: PositiveFloat = Field(1.0, description="a lookup taking longer is a miss")
    decision: dict[str, Any] | None = Field(
        None, description="match decision parameters written by `atajo cache calibrate`; default: the shipped ones"
    )
    embedder: str = Field(
        "local", min_length=1, description="'local' (the bundled model) or a configured model serving /v1/embeddings"
    )
    dimension: int = Field(384, ge=1, le=16_384, description="the embeddings' size (384: the local model)")


class CacheSettings(_Model):
    enabled: bool = True
    tiers: list[CacheTierSettings] = Field(default_factory=_default_tiers, description="fastest first")
    stale_if_error_s: float = Field(600, ge=0, description="serve an expired answer this long when providers fail")
    max_ttl_s: PositiveFloat = Field(7 * 86400, description="upper bound of x-atajo-cache-ttl")
    cache_sampled: bool = Field(True, description="cache requests with temperature > 0 (each answer is a valid sample)")
    models: dict[str, CachePolicy] = Field(default_factory=dict, description="per model name; '*' for the rest")
    tag_rules: list[TagRule] = Field(default_factory=lambda: [TagRule(source="user", tag="user:{value}")])
    dependencies: dict[str, list[str]] = Field(
        default_factory=dict, description="tag pattern → tags that depend on it, e.g. profile:{id} → [sessions:{id}]"
    )
    bus_url: str | None = Field(
        None, description="Redis URL for cross-instance invalidation; default: the first redis tier's URL"
    )
    write_queue: int = Field(10_000, ge=1, description="pending tier writes beyond this are dropped (counted)")
    semantic: SemanticSettings = Field(default_factory=SemanticSettings)

    @model_validator(mode="after")
    def _tiers_distinct(self) -> CacheSettings:
        kinds = [t.kind for t in self.tiers]
        if len(set(kinds)) != len(kinds):
            raise ValueError("cache.tiers: at most one tier of each kind (memory, redis, sql)")
        for pattern in self.dependencies:
            if not re.fullmatch(r"[^{}]*(\{[A-Za-z_][A-Za-z0-9_]*\}[^{}]*)*", pattern):
                raise ValueError(f"cache.dependencies: {pattern!r} is not a tag pattern like profile:{{id}}")
        return self


class LeaseSettings(_Model):
    """Single-flight across instances: the first instance to miss takes a short Redis lease and calls the
    provider; the others wait for its answer to appear in the shared cache tiers."""

    enabled: bool = Field(True, description="when a Redis URL is known (this one, or the cache's Redis tier)")
    url: str | None = Field(
        None, pattern=r"^(redis|rediss|unix)://", description="default: the cache's Redis tier's URL"
    )
    ttl_s: PositiveFloat = Field(30.0, description="how long a lease holds if its instance never finishes")
    wait_s: PositiveFloat = Field(30.0, description="longest wait for another instance's answer before calling")
    poll_ms: float = Field(25.0, ge=1, le=1000, description="how often a waiting instance looks for the answer")
    timeout_s: PositiveFloat = Field(0.25, description="longest wait for Redis before going without a lease")


class EmbeddingsBatchSettings(_Model):
    """Concurrent embeddings requests for the same model (same tenant and options) sent as one call."""

    enabled: bool = True
    max_wait_ms: float = Field(20.0, ge=0, le=100, description="longest a request waits for others to join")
    max_items: int = Field(64, ge=1, le=2048, description="inputs per upstream call (a full batch goes at once)")
    max_chars: int = Field(
        200_000, ge=1, description="input characters per upstream call (a rough bound on its tokens)"
    )


class CoalesceSettings(_Model):
    single_flight: bool = Field(True, description="identical requests in flight share one upstream call")
    lease: LeaseSettings = Field(default_factory=LeaseSettings)
    embeddings_batch: EmbeddingsBatchSettings = Field(default_factory=EmbeddingsBatchSettings)
    grouping: bool = Field(
        True,
        description="chat requests the semantic match decision says ask the same question share one call "
        "(where the semantic tier is on for them)",
    )
    models: dict[str, CoalescePolicy] = Field(default_factory=dict, description="per model name; '*' for the rest")


class QualityTier(_Model):
    """Requests whose complexity score is below ``below`` (the last tier: any score) need a model whose catalog
    quality for the request's task is at least ``min_quality``."""

    below: float | None = Field(None, gt=0, le=1, description="upper bound of the score (exclusive); none: the rest")
    min_quality: float = Field(ge=0, le=1)


def _default_tiers_quality() -> list[QualityTier]:
    return [
        QualityTier(below=0.6, min_quality=0.0),
        QualityTier(below=0.7, min_quality=0.85),
        QualityTier(min_quality=0.88),
    ]


CascadeCheck = Literal["refusal", "truncated", "invalid_json", "low_confidence"]
CASCADE_CHECKS: tuple[CascadeCheck, ...] = ("refusal", "truncated", "invalid_json", "low_confidence")
TaskName = Literal["general", "code", "math", "reasoning", "chat"]


class CascadeSettings(_Model):
    """Answer with the cheaper choice first; escalate to ``strong`` when the answer fails a check."""

    enabled: bool = False
    strong: str | None = Field(None, description="model escalated to; default: the best-quality candidate")
    checks: list[CascadeCheck] = Field(
        default_factory=lambda: list(CASCADE_CHECKS),
        description="what makes an answer fail: refusal, truncated (finish_reason length), invalid_json (json "
        "mode), low_confidence (the answer says it is unsure)",
    )


class RouteGroup(_Model):
    """A routed model name (``model: auto``): each request gets the cheapest candidate meeting its constraints."""

    candidates: list[str] = Field(
        default_factory=list,
        description="configured models to choose from; empty: every configured chat model the catalog prices",
    )
    baseline: str | None = Field(
        None, description="the model savings are measured against; default: the dearest candidate"
    )
    task: Literal["auto", "general", "code", "math", "reasoning", "chat"] = Field(
        "auto", description="which catalog quality score counts; auto: guessed from the prompt (code, math, general)"
    )
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)


def _default_task_quality() -> dict[TaskName, float]:
    return {"code": 0.88, "math": 0.85, "reasoning": 0.85}


class RoutingSettings(_Model):
    models: dict[str, RouteGroup] = Field(
        default_factory=lambda: {"auto": RouteGroup()}, description="routed model names"
    )
    quality_tiers: list[QualityTier] = Field(default_factory=_default_tiers_quality, min_length=1)
    task_min_quality: dict[TaskName, float] = Field(
        default_factory=_default_task_quality,
        description="least quality wanted for a task, whatever the complexity score",
    )
    defaults: RoutePolicy = Field(default_factory=RoutePolicy)

    @model_validator(mode="after")
    def _tiers_ordered(self) -> RoutingSettings:
        tiers = self.quality_tiers
        if tiers[-1].below is not None:
            raise ValueError("routing.quality_tiers: the last tier must have no `below` (it takes the rest)")
        if any(t.below is None for t in tiers[:-1]):
            raise ValueError("routing.quality_tiers: only the last tier may leave out `below`")
        bounds = [t.below for t in tiers[:-1] if t.below is not None]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("routing.quality_tiers: `below` must increase from one tier to the next")
        return self


class BudgetLimit(_Model):
    """A budget: at most ``max_cost`` (money) and / or ``max_tokens`` per ``period`` for its ``scope``."""

    name: str | None = Field(None, pattern=NAME_PATTERN, description="named in errors; default scope:match/period")
    scope: Literal["global", "tenant", "key"]
    match: str = Field("*", description="the tenant or key name; '*' gives each tenant or key its own budget")
    period: Literal["day", "month"]
    max_cost: Money | None = None
    max_tokens: int | None = Field(None, ge=1)
    alert_at: float = Field(0.8, gt=0, le=1, description="share of the budget at which a soft alert is raised")

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetLimit:
        if self.max_cost is None and self.max_tokens is None:
            raise ValueError("give max_cost, max_tokens or both")
        if self.scope == "global" and self.match != "*":
            raise ValueError("a global budget matches everything: leave out `match`")
        return self

    @property
    def label(self) -> str:
        return self.name or (f"{self.scope}/{self.period}" if self.scope == "global" else
                             f"{self.scope}:{self.match}/{self.period}")  # fmt: skip


class BudgetSettings(_Model):
    limits: list[BudgetLimit] = Field(default_factory=list)
    store: str = Field(
        "memory://", pattern=r"^(memory|redis|rediss|unix)://", description="memory:// (this process) or redis://"
    )
    reserve: Literal["max", "typical"] = Field(
        "max", description="reserve the most a request can cost (max_tokens) or a typical answer's cost"
    )
    timeout_s: PositiveFloat = Field(0.5, description="longest wait for the Redis store")
    redis_prefix: str = Field("atajo:budget:", min_length=1, description="prefix of the Redis store's keys")
    on_store_error: Literal["reject", "allow"] = Field(
        "reject", description="with the store unreachable: reject requests (503) or let them through unchecked"
    )

    @model_validator(mode="after")
    def _names_unique(self) -> BudgetSettings:
        labels = [limit.label for limit in self.limits]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"budgets.limits: two budgets are named {label!r}; give them distinct `name`s")
        return self


class LedgerSettings(_Model):
    """The cost ledger: one row per request, written in batches off the request path."""

    enabled: bool = True
    url: str = Field(
        "sqlite:///~/.cache/atajo/ledger.db",
        pattern=r"^(sqlite|postgresql|postgres)://",
        description="sqlite:///path or postgresql://…",
    )
    flush_interval_s: PositiveFloat = Field(
        1.0, le=3600, description="records wait at most this long in memory (all a kill -9 can lose)"
    )
    max_pending: int = Field(100_000, ge=1, description="records held for writing beyond this are dropped (counted)")


class BatchSettings(_Model):
    """The deferred lane: Atajo's own OpenAI-compatible ``/v1/files`` + ``/v1/batches``, run through the
    providers' Batch APIs where a deployment has one (at their discount), else through the normal pipeline."""

    enabled: bool = True
    url: str = Field(
        "sqlite:///~/.cache/atajo/batches.db",
        pattern=r"^(sqlite|postgresql|postgres)://",
        description="where files and batches are kept: sqlite:///path.db or postgresql://…",
    )
    max_file_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="largest /v1/files upload (413 beyond it); the whole file is held"
    )
    max_requests: int = Field(50_000, ge=1, description="most request lines in one batch input file")
    poll_interval_s: PositiveFloat = Field(30.0, description="how often an upstream batch's status is read")
    concurrency: int = Field(
        4, ge=1, le=256, description="requests of one batch run at once through the normal pipeline"
    )
    expire_after_s: PositiveFloat = Field(
        86_400.0, description="a batch not finished this long after creation expires (completion_window 24h)"
    )
    keep_files_s: PositiveFloat = Field(
        30 * 86_400.0, description="files (inputs and results) are deleted this long after they were created"
    )
    collect_window_s: PositiveFloat = Field(
        60.0,
        description="requests sent with x-atajo-priority: batch are collected per tenant and key this long (from "
        "the first) before they go as one batch",
    )
    collect_max: int = Field(
        1000, ge=1, le=50_000, description="a collection of x-atajo-priority: batch requests goes at once when full"
    )


class AdaptiveSettings(_Model):
    """Multipliers on every adaptive limit, recomputed every ``interval_s`` and moved towards their target by at
    most ``max_step`` per interval (no flapping: between the thresholds a factor holds its target)."""

    enabled: bool = True
    interval_s: PositiveFloat = 1.0
    max_step: float = Field(0.1, gt=0, le=1, description="most a multiplier moves per interval")
    smoothing: float = Field(0.3, gt=0, le=1, description="weight of a new load sample in its moving average")
    high_load: float = Field(0.8, gt=0, le=1, description="load above this: overload_factor")
    low_load: float = Field(0.3, ge=0, lt=1, description="load below this: spare_factor")
    overload_factor: float = Field(0.5, gt=0, le=1)
    spare_factor: float = Field(1.5, ge=1, le=10)
    capacity: int = Field(512, ge=1, description="requests in flight that mean full load")
    max_loop_lag_s: PositiveFloat = Field(0.1, description="event-loop lag that means full load")
    problem_factor: float = Field(0.6, gt=0, le=1, description="multiplier of a problematic client")
    trusted_factor: float = Field(1.2, ge=1, le=10, description="multiplier of a trusted client")
    problem_ratio: float = Field(0.2, gt=0, le=1, description="share of bad requests that makes a client problematic")
    clean_ratio: float = Field(0.01, ge=0, lt=1, description="share of bad requests under which a client is clean")
    client_window_s: PositiveFloat = Field(300.0, description="the window a client's behaviour is judged over")
    client_min_requests: int = Field(20, ge=1, description="fewer requests in the window: no judgement")
    trusted_after_s: PositiveFloat = Field(3600.0, description="clean this long (and busy enough) means trusted")
    trusted_min_requests: int = Field(1000, ge=1)
    upstream_window_s: PositiveFloat = 60.0
    upstream_min_calls: int = Field(20, ge=1)
    upstream_error_high: float = Field(0.10, gt=0, le=1, description="error rate above this lowers the model's limits")
    upstream_error_low: float = Field(0.02, ge=0, lt=1, description="error rate below this restores them")
    upstream_factor: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveSettings:
        if self.low_load >= self.high_load:
            raise ValueError("limits.adaptive.low_load must be below high_load")
        if self.upstream_error_low >= self.upstream_error_high:
            raise ValueError("limits.adaptive.upstream_error_low must be below upstream_error_high")
        if self.clean_ratio >= self.problem_ratio:
            raise ValueError("limits.adaptive.clean_ratio must be below problem_ratio")
        return self


class ConcurrencySettings(_Model):
    """An adaptive cap on calls in flight per upstream deployment (AIMD): halved (``decrease``) on a 429, 503 or
    timeout, at most once per ``cooldown_s``; one more after each full window of successes."""

    enabled: bool = True
    initial: int = Field(100, ge=1)
    min: int = Field(1, ge=1)
    max: int = Field(1000, ge=1)
    decrease: float = Field(0.5, gt=0, lt=1, description="the cap is multiplied by this on a sign of distress")
    cooldown_s: PositiveFloat = Field(1.0, description="at most one decrease per deployment this often")
    queue_timeout_s: float = Field(1.0, ge=0, description="longest wait for a free slot; then the next deployment")

    @model_validator(mode="after")
    def _ordered(self) -> ConcurrencySettings:
        if not self.min <= self.initial <= self.max:
            raise ValueError("limits.concurrency: need min <= initial <= max")
        return self


class GuardSettings(_Model):
    """Checks on what users send, before anything is spent on it (docs/limits.md#guard)."""

    enabled: bool = Field(True, description="look for prompt-injection attempts in chat requests' user messages")
    block_prompt_injection: bool = Field(
        False, description="refuse them with 400 prompt_injection_detected (else counted, flagged and marked)"
    )


class LimitsSettings(_Model):
    """Admission: requests and tokens per minute per key, tenant, model and for the whole gateway (GCRA)."""

    enabled: bool = True
    storage: str = Field(
        "memory://",
        pattern=r"^(memory|redis|rediss|unix)://",
        description="memory:// (per process) or redis://… (shared by every instance; atomic Lua, Redis's clock)",
    )
    shadow: bool = Field(False, description="log and count what would be rejected, reject nothing")
    gateway: RateLimit = Field(default_factory=RateLimit, description="the whole gateway")
    models: dict[str, RateLimit] = Field(default_factory=dict, description="per public model name")
    tenants: dict[str, RateLimit] = Field(default_factory=dict, description="per tenant (the store's win)")
    keys: RateLimit = Field(default_factory=RateLimit, description="for keys that carry no limits of their own")
    output_tokens: int = Field(256, ge=0, description="estimated output when a request sets no max_tokens")
    timeout_s: PositiveFloat = Field(0.5, description="longest wait for the limiter's storage; then fail open")
    redis_max_connections: int = Field(64, ge=1, description="Redis pool size; callers wait for a free one")
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings)
    concurrency: ConcurrencySettings = Field(default_factory=ConcurrencySettings)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, v: dict[str, RateLimit]) -> dict[str, RateLimit]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a tenant name (1 to 64 letters, digits or _ . : -)")
        return v


class Settings(_Model):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    coalesce: CoalesceSettings = Field(default_factory=CoalesceSettings)
    catalog: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the model catalog (docs/routing.md); checked at start"
    )
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> Settings:
        for name, model in self.models.items():
            for i, fallback in enumerate(model.fallbacks):
                if fallback not in self.models:
                    raise ValueError(f"models.{name}.fallbacks.{i}: unknown model {fallback!r}")
        for group, route in self.routing.models.items():
            if group in self.models:
                raise ValueError(f"routing.models.{group}: also a name in `models`; a routed name must be its own")
            for i, candidate in enumerate(route.candidates):
                if candidate not in self.models or candidate == "*":
                    raise ValueError(f"routing.models.{group}.candidates.{i}: {candidate!r} is not a model in `models`")
            for where, named in (("baseline", route.baseline), ("cascade.strong", route.cascade.strong)):
                if named is not None and named not in self.models:
                    raise ValueError(f"routing.models.{group}.{where}: {named!r} is not a model in `models`")
        for i, limit in enumerate(self.budgets.limits):
            known = {k.name for k in self.auth.keys} if limit.scope == "key" else None
            if known is not None and limit.match != "*" and limit.match not in known:
                raise ValueError(f"budgets.limits.{i}.match: {limit.match!r} is not a key name in auth.keys")
        semantic = self.cache.semantic
        if semantic.enabled and semantic.embedder != "local":
            if semantic.embedder not in self.models:
                raise ValueError(f"cache.semantic.embedder: {semantic.embedder!r} is not a model in `models`")
            if semantic.decision is None:
                raise ValueError(
                    "cache.semantic.decision: required with a provider embedder (the shipped decision is fitted to "
                    "the local model's similarities); fit one with `atajo cache calibrate --embeddings-url`"
                )
        for name in self.limits.models:
            if name not in self.models and "*" not in self.models:
                raise ValueError(f"limits.models: {name!r} is not a model in `models`")
        return self

    @property
    def key_store_url(self) -> str | None:
        """Where virtual keys live: ``auth.store``, else next to the cache's SQL tier (the same PostgreSQL
        database, or ``keys.db`` beside the SQLite file), else ``~/.cache/atajo/keys.db``. None without a master
        key (nobody could manage the keys) or with ``auth.store: off``."""
        if self.auth.master_key is None or self.auth.store == "off":
            return None
        if self.auth.store:
            return self.auth.store
        for tier in self.cache.tiers if self.cache.enabled else ():
            if tier.kind == "sql":
                if tier.url.startswith("sqlite:"):
                    head, _, tail = tier.url.rpartition("/")
                    return f"{head}/keys.db" if tail and tail != ":memory:" else tier.url
                return tier.url
        return "sqlite:///~/.cache/atajo/keys.db"

    @property
    def simulated_only(self) -> bool:
        deployments = [d for m in self.models.values() for d in m.deployments]
        return bool(deployments) and all(d.provider == "simulated" for d in deployments)


# --- loading ---------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SIMULATED_MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku", "text-embedding-3-small")


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply env overrides and defaults, validate. Raises ConfigError."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        raw = _substitute(loaded or {}, env, "")
    _apply_env_overrides(raw, env)
    if "models" not in raw:
        raw["models"] = default_models(env)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    decision = settings.cache.semantic.decision
    model = decision.get("model") if decision else None
    if path is not None and decision is not None and isinstance(model, str) and model != "default":
        # `atajo cache calibrate --write` names its weights file relative to the config's directory.
        decision["model"] = str(Path(path).parent / Path(model).expanduser())
    return settings


def default_models(env: Mapping[str, str]) -> dict[str, Any]:
    """No models configured: proxy everything to OPENAI_BASE_URL with OPENAI_API_KEY, else simulate."""
    if env.get("OPENAI_API_KEY"):
        deployment = {
            "provider": "openai",
            "api_key": env["OPENAI_API_KEY"],
            "base_url": env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URLS["openai"],
        }
        return {"*": {"deployments": [deployment]}}
    simulated: dict[str, Any] = {name: {"deployments": [{"provider": "simulated"}]} for name in SIMULATED_MODELS}
    simulated["*"] = {"deployments": [{"provider": "simulated"}]}
    return simulated


def _substitute(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set")

        return _ENV_REF.sub(repl, value)
    return value


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith("ATAJO_") or "__" not in name:
            continue
        path = [p.lower() for p in name[len("ATAJO_") :].split("__")]
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} does not name a setting")
            node = child
        node[path[-1]] = yaml.safe_load(value) if value else value
    if env.get("ATAJO_MASTER_KEY"):
        raw.setdefault("auth", {})["master_key"] = env["ATAJO_MASTER_KEY"]


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if path == "(top level)" and msg.split(".", 1)[0] in Settings.model_fields:
            lines.append(msg)
        else:
            lines.append(f"{path}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
