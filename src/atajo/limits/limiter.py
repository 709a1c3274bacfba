"""The limiter: which buckets a request is checked against, at what effective limits, and the answer.

Scopes, each with requests (``rpm``) and tokens (``tpm``) per minute: the key (its own limits, else
``limits.keys``), its tenant (the store's limits, else ``limits.tenants``), the model (``limits.models``) and
the gateway (``limits.gateway``). A request passes only if every bucket has room; then every bucket is
charged (one atomic call to the storage). Tokens are reserved at the estimate and settled after the call.

Adaptive limits: the effective limit of an adaptive bucket is its configured figure times the request's
multiplier (load * client * upstream, from ``limits/adaptive.py``). GCRA takes a per-request rate, so a
request of a problematic client, or for a model whose upstream is failing, simply costs more of every
bucket it touches. Limits with ``adaptive: false`` are pinned.

The storage failing (Redis down or slow) admits the request: the limiter fails open, counted and logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from atajo.core.context import Principal
from atajo.limits.gcra import Bucket, Storage, Verdict
from atajo.settings import LimitsSettings, RateLimit

log = logging.getLogger("atajo.limits")


class Multipliers(Protocol):
    def factor(self, principal: Principal, model: str) -> float: ...


class Fixed:
    """No adaptation: every multiplier is 1."""

    def factor(self, principal: Principal, model: str) -> float:
        return 1.0


@dataclass(frozen=True, slots=True)
class Scope:
    kind: str
    """key, tenant, model or gateway."""
    name: str
    limits: RateLimit


@dataclass(slots=True)
class Check:
    scope: Scope
    unit: str
    """requests or tokens."""
    limit: int
    """The effective limit (configured * multiplier, or pinned)."""
    bucket: Bucket
    verdict: Verdict | None = None


@dataclass(slots=True)
class Admission:
    allowed: bool = True
    checks: list[Check] = field(default_factory=list)
    reserved_tokens: int = 0
    multiplier: float = 1.0
    shadowed: bool = False
    """Would have been rejected; let through because the limiter is in shadow mode."""
    failed_open: bool = False

    @property
    def denied(self) -> list[Check]:
        return [c for c in self.checks if c.verdict is not None and not c.verdict.allowed]

    def retry_after_s(self) -> float:
        return max((c.verdict.retry_us for c in self.denied if c.verdict), default=0) / 1e6

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` as OpenAI sends them: for requests and for tokens, the tightest bucket's figures."""
        out: dict[str, str] = {}
        for unit in ("requests", "tokens"):
            judged = [c for c in self.checks if c.unit == unit and c.verdict is not None]
            if not judged:
                continue
            tight = min(judged, key=lambda c: (c.verdict.remaining if c.verdict else 0, c.limit))
            assert tight.verdict is not None
            out[f"x-ratelimit-limit-{unit}"] = str(tight.limit)
            out[f"x-ratelimit-remaining-{unit}"] = str(max(0, min(tight.verdict.remaining, tight.limit)))
            out[f"x-ratelimit-reset-{unit}"] = duration(tight.verdict.reset_us / 1e6)
        return out

    def message(self) -> str:
        check = self.denied[0]
        scope = f"{check.scope.kind} {check.scope.name!r}" if check.scope.kind != "gateway" else "the gateway"
        if check.unit == "tokens" and check.bucket.cost * check.bucket.interval_us > check.bucket.tolerance_us:
            return (
                f"Request too large: about {int(check.bucket.cost)} tokens, more than the {check.limit} tokens per "
                f"minute of {scope} allow at once. Ask for fewer tokens (max_tokens) or a shorter prompt."
            )
        return (
            f"Rate limit reached for {scope} on {check.unit} per minute: limit {check.limit}. "
            f"Try again in {duration(self.retry_after_s())}."
        )


def duration(seconds: float) -> str:
    """OpenAI's style: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class Limiter:
    def __init__(
        self,
        settings: LimitsSettings,
        storage: Storage,
        multipliers: Multipliers | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.multipliers: Multipliers = multipliers or Fixed()
        self.clock = clock
        self.decisions: dict[tuple[str, str], int] = {}
        """(scope kind, outcome) → count: allowed, rejected, shadow_rejected."""
        self.storage_errors = 0
        self._last_error_log = -math.inf

    def scopes(self, principal: Principal, model: str) -> list[Scope]:
        s = self.settings
        found = []
        key = principal.limits if principal.limits is not None else s.keys
        if not key.empty:
            found.append(Scope("key", principal.key_name, key))
        tenant = principal.tenant_limits if principal.tenant_limits is not None else s.tenants.get(principal.tenant)
        if tenant is not None and not tenant.empty:
            found.append(Scope("tenant", principal.tenant, tenant))
        per_model = s.models.get(model)
        if per_model is not None and not per_model.empty:
            found.append(Scope("model", model, per_model))
        if not s.gateway.empty:
            found.append(Scope("gateway", "*", s.gateway))
        return found

    def configured_scopes(self) -> list[Scope]:
        """The scopes named in settings (gateway, models, tenants), for metrics and the admin API."""
        s = self.settings
        found = [] if s.gateway.empty else [Scope("gateway", "*", s.gateway)]
        found += [Scope("model", name, limits) for name, limits in sorted(s.models.items()) if not limits.empty]
        found += [Scope("tenant", name, limits) for name, limits in sorted(s.tenants.items()) if not limits.empty]
        if not s.keys.empty:
            found.append(Scope("key", "*", s.keys))
        return found

    def checks(self, scopes: list[Scope], multiplier: float, tokens: int) -> list[Check]:
        checks = []
        for scope in scopes:
            limits, m = scope.limits, multiplier if scope.limits.adaptive else 1.0
            prefix = f"{scope.kind}:{scope.name}:"
            if limits.rpm is not None:
                limit = max(1, int(limits.rpm * m))
                burst = max(1.0, (limits.request_burst or limits.rpm) * m)
                checks.append(Check(scope, "requests", limit, Bucket.of(prefix + "r", limits.rpm * m, burst, 1)))
            if limits.tpm is not None:
                limit = max(1, int(limits.tpm * m))
                burst = max(1.0, (limits.token_burst or limits.tpm) * m)
                checks.append(Check(scope, "tokens", limit, Bucket.of(prefix + "t", limits.tpm * m, burst, tokens)))
        return checks

    async def admit(
        self, principal: Principal, model: str, estimate: Callable[[], int], scopes: list[Scope] | None = None
    ) -> Admission:
        """``estimate`` (the request's tokens) is called only when a token limit applies; ``scopes`` when the
        caller has them already."""
        scopes = self.scopes(principal, model) if scopes is None else scopes
        if not scopes:
            return Admission()
        tokens = estimate() if any(scope.limits.tpm is not None for scope in scopes) else 0
        multiplier = self.multipliers.factor(principal, model)
        checks = self.checks(scopes, multiplier, tokens)
        admission = Admission(checks=checks, multiplier=multiplier)
        if any(c.unit == "tokens" for c in checks):
            admission.reserved_tokens = tokens
        try:
            verdicts = await self.storage.check([c.bucket for c in checks])
        except Exception as exc:  # fail open: the storage is down or slow; admitted, counted, logged
            self._storage_failed(exc)
            admission.failed_open = True
            admission.reserved_tokens = 0
            return admission
        for check, verdict in zip(checks, verdicts, strict=True):
            check.verdict = verdict
        denied = admission.denied
        if denied:
            kind = denied[0].scope.kind
            if self.settings.shadow:
                admission.shadowed = True
                admission.reserved_tokens = 0
                self._count(kind, "shadow_rejected")
                log.info("shadow mode: would reject (%s)", admission.message())
            else:
                admission.allowed = False
                admission.reserved_tokens = 0
                self._count(kind, "rejected")
        else:
            self._count("all", "allowed")
        return admission

    async def settle(self, admission: Admission, actual_tokens: int) -> None:
        """Correct the token buckets by what the call really used (a cache hit: nothing)."""
        if not admission.allowed or admission.shadowed or admission.failed_open:
            return  # nothing was charged
        delta = actual_tokens - admission.reserved_tokens
        if delta == 0:
            return
        buckets = [
            Bucket(c.bucket.key, c.bucket.interval_us, c.bucket.tolerance_us, delta)
            for c in admission.checks
            if c.unit == "tokens"
        ]
        if not buckets:
            return
        admission.reserved_tokens = actual_tokens
        try:
            await self.storage.settle(buckets)
        except Exception as exc:
            self._storage_failed(exc)

    def _count(self, kind: str, outcome: str) -> None:
        self.decisions[kind, outcome] = self.decisions.get((kind, outcome), 0) + 1

    def _storage_failed(self, exc: Exception) -> None:
        self.storage_errors += 1
        now = self.clock()
        if now - self._last_error_log > 10:
            self._last_error_log = now
            log.warning("rate limit storage failed (%s); admitting requests meanwhile", type(exc).__name__)
