"""Per-request state that stages fill in and the server turns into headers and metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from atajo.core.results import Usage
from atajo.settings import CachePolicy, RateLimit, Trust


@dataclass(slots=True)
class Principal:
    """Who is calling. ``key_name`` is the configured name of the key (a virtual key's id), never the secret.

    What a key carries beyond its tenant: the models it may use (None: all), its own limits and its tenant's
    (None: the configured defaults), its cache policy, its trust setting and, for a virtual key, its own money
    budget per calendar month in the catalog's currency micro-units (``budget_micros``; None: none)."""

    key_name: str
    tenant: str = "default"
    is_admin: bool = False
    models: frozenset[str] | None = None
    limits: RateLimit | None = None
    tenant_limits: RateLimit | None = None
    cache: CachePolicy | None = None
    trust: Trust = "auto"
    budget_micros: int | None = None


@dataclass(slots=True)
class RequestContext:
    request_id: str
    route: str
    headers: Mapping[str, str] = field(repr=False)
    """Request headers, names in lower case."""
    started_ns: int = field(default_factory=time.perf_counter_ns)
    principal: Principal | None = None
    routed_model: str | None = None
    upstream_model: str | None = None
    """The name the provider was asked for (what is priced in the catalog)."""
    response_model: str | None = None
    provider: str | None = None
    deployment: str | None = None
    attempts: int = 0
    cache_status: str = "miss"
    """miss, hit-<tier>, stale or bypass: told to the client in ``x-atajo-cache``."""
    cache_key: str | None = None
    """Set by the cache stage; single-flight groups requests by it."""
    cache_age_s: float | None = None
    cache_shared: bool = False
    """Set by the cache stage: this answer will be stored in a tier other instances read (Redis, SQL), so
    another instance may wait for it there rather than call the provider too."""
    coalesced: bool = False
    """This request shared another one's upstream call (so it is neither priced nor stored again)."""
    simulated: bool = False
    cost_micros: int | None = None
    """What the answer cost at catalog prices, in millionths of the catalog's currency, when known."""
    provider_usage: Usage | None = None
    """Tokens of every provider call made for this request (a cascade's two), as the providers reported them."""
    cost_estimate_micros: int | None = None
    """The cost expected before the call (a typical answer on the routed model), when it was estimated."""
    route_reason: str | None = None
    """Why a routed name (``model: auto``) became ``routed_model``: told in ``x-atajo-route-reason``."""
    upstream_ns: int = 0
    """Time spent waiting on providers (including retry back-off), subtracted to get our own added time."""
    first_token_ns: int | None = None
    reported_overhead_ms: float | None = None
    """The overhead told to the client in ``x-atajo-overhead-ms`` (for streams: up to the headers)."""
    extra_headers: dict[str, str] | None = None
    token_counts: dict[str, tuple[int, bool]] = field(default_factory=dict)
    """The input's token counts by encoding (``atajo.routing.tokens.Counts``), filled in by the first stage that
    counts an encoding (route, budget) and read by the others: a request's messages do not change on its way."""

    def elapsed_ns(self) -> int:
        return time.perf_counter_ns() - self.started_ns

    def overhead_ms(self) -> float:
        return max(0, self.elapsed_ns() - self.upstream_ns) / 1e6
