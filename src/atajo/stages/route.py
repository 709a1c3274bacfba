"""Route stage: a routed name (``model: auto``) becomes the cheapest configured model meeting the request's
constraints; optionally through a cascade (cheap first, strong when the answer fails a check).

Constraints come from the request's headers (``x-atajo-max-cost`` in the catalog's currency,
``x-atajo-max-latency-ms``, ``x-atajo-min-quality``), else the key's ``route`` policy, else
``routing.defaults``. A request for a model named directly is not rerouted, but a cost cap still holds: one
whose estimate is above it is rejected before the call.

It runs after the cache and coalescing, so a cache hit costs no routing and a group of identical requests
gets one decision. The answer says what was chosen and why (``x-atajo-route-reason``) and what it was
expected to cost (``x-atajo-cost-estimate-micros``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from atajo.core.catalog import ModelInfo
from atajo.core.context import RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import ChatRequest, Request
from atajo.core.results import Completion, Result
from atajo.errors import AtajoError, InvalidRequest, NoModelMeetsConstraints
from atajo.observe.metrics import GatewayMetrics
from atajo.routing.cascade import failed_check
from atajo.routing.select import Choice, Constraints, Limit, Option, Selector
from atajo.routing.tokens import TokenCounter
from atajo.settings import CascadeSettings, RoutePolicy, to_micros

log = logging.getLogger("atajo.route")

HEADERS = ("x-atajo-max-cost", "x-atajo-max-latency-ms", "x-atajo-min-quality")


@dataclass(frozen=True, slots=True)
class Group:
    selector: Selector
    cascade: CascadeSettings


class RouteStage:
    name = "route"

    def __init__(
        self,
        groups: Mapping[str, Group],
        defaults: RoutePolicy,
        key_policies: Mapping[str, RoutePolicy],
        counter: TokenCounter,
        price: Callable[[str], ModelInfo | None],
        metrics: GatewayMetrics,
        currency: str,
    ) -> None:
        self.groups = dict(groups)
        self.defaults = defaults
        self.key_policies = dict(key_policies)
        self.counter = counter
        self.price = price
        """A configured model name → the catalog entry it is priced at (None: not priced)."""
        self.metrics = metrics
        self.currency = currency

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        group = self.groups.get(request.model)
        constraints = self.constraints(ctx)
        if group is None:
            if constraints.max_cost_micros is not None:
                self._check_cost(request, ctx, constraints.max_cost_micros)
            return await call_next(request, ctx)
        choice = group.selector.choose(request, constraints, ctx.token_counts)
        self.metrics.route_decisions.labels(request.model, self.metrics.model_label(choice.name)).inc()
        ctx.route_reason = f"{choice.name}: {choice.reason}"
        ctx.cost_estimate_micros = choice.option.estimate_micros
        strong = self._escalation(request, group.cascade, choice, constraints)
        if strong is None:
            return await call_next(routed(request, choice.name), ctx)
        return await self._cascade(request, ctx, call_next, group.cascade, choice, strong)

    # --- constraints ------------------------------------------------------------------------------

    def constraints(self, ctx: RequestContext) -> Constraints:
        key = ctx.principal.key_name if ctx.principal else ""
        policy = self.key_policies.get(key)
        where = f"auth.keys[{key}].route" if policy is not None else ""

        def pick(header: str, attr: str, parse: Callable[[str, str], float]) -> Limit | None:
            given = ctx.headers.get(header)
            if given is not None:
                return Limit(parse(given, header), header)
            for source, settings in ((where, policy), ("routing.defaults", self.defaults)):
                value = getattr(settings, attr) if settings is not None else None
                if value is not None:
                    return Limit(float(to_micros(value)) if attr == "max_cost" else float(value), f"{source}.{attr}")
            return None

        return Constraints(
            max_cost_micros=pick("x-atajo-max-cost", "max_cost", self._money),
            max_latency_ms=pick("x-atajo-max-latency-ms", "max_latency_ms", _positive),
            min_quality=pick("x-atajo-min-quality", "min_quality", _share),
        )

    def _money(self, raw: str, header: str) -> float:
        value = _number(raw, header, f"an amount of {self.currency} such as 0.002")
        if value < 0:
            raise InvalidRequest(f"`{header}` must be an amount >= 0 (got {raw!r}).", param=header)
        return float(to_micros(raw.strip()))

    def _check_cost(self, request: Request, ctx: RequestContext, limit: Limit) -> None:
        info = self.price(request.model)
        if info is None:
            return  # not priced: nothing to hold it to
        estimate = self.counter.estimate_cost(request, info.name, "typical", ctx.token_counts).cost_micros
        if estimate > limit.value:
            header = limit.source if limit.source.startswith("x-atajo-") else None
            raise NoModelMeetsConstraints(
                f"This request is expected to cost {estimate} micro-{self.currency} on `{request.model}`, above "
                f"{limit.source} ({int(limit.value)} micro-{self.currency}). Raise it, or ask for a cheaper model "
                "or `auto`.",
                param=header or "model",
            )

    # --- the cascade ------------------------------------------------------------------------------

    def _escalation(
        self, request: Request, cascade: CascadeSettings, choice: Choice, constraints: Constraints
    ) -> Option | None:
        """The model to escalate to, when this request cascades: whole chat answers only, a stronger eligible
        model than the choice, and both calls together within the cost cap."""
        if not cascade.enabled or not isinstance(request, ChatRequest) or request.stream:
            return None
        eligible = choice.eligible
        if cascade.strong is not None:
            strong = next((o for o in eligible if o.candidate.name == cascade.strong), None)
        else:
            strong = max(eligible, key=lambda o: (o.quality, -o.estimate_micros), default=None)
        if strong is None or strong.candidate.name == choice.name or strong.quality <= choice.option.quality:
            return None
        cap = constraints.max_cost_micros
        if cap is not None and choice.option.estimate_micros + strong.estimate_micros > cap.value:
            return None
        return strong

    async def _cascade(
        self,
        request: Request,
        ctx: RequestContext,
        call_next: Handler,
        cascade: CascadeSettings,
        choice: Choice,
        strong: Option,
    ) -> Result:
        first = await call_next(routed(request, choice.name), ctx)
        if not isinstance(first, Completion):
            return first
        failed = failed_check(first.body, request.body, cascade.checks)
        if failed is None:
            self.metrics.cascade.labels("kept").inc()
            ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-cascade": "kept"}
            return first
        self.metrics.cascade.labels(failed).inc()
        name = strong.candidate.name
        ctx.route_reason = f"{name}: escalated from {choice.name} ({failed}); {choice.reason}"
        ctx.cost_estimate_micros = choice.option.estimate_micros + strong.estimate_micros
        try:
            second = await call_next(routed(request, name), ctx)
        except AtajoError as err:
            # The cheap answer is still an answer: serve it, and say the escalation failed.
            log.warning("cascade escalation of %s to %s failed: %s", ctx.request_id, name, err.message)
            ctx.route_reason = f"{choice.name}: escalation to {name} failed ({err.code}); {choice.reason}"
            ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-cascade": f"escalation-failed; {failed}"}
            return first
        ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-cascade": f"escalated; {failed}"}
        return second


def routed(request: Request, model: str) -> Request:
    """The request as sent to ``model``: same body, that name."""
    return replace(request, model=model, body={**request.body, "model": model})


def _number(raw: str, header: str, expected: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidRequest(f"`{header}` must be {expected} (got {raw!r}).", param=header)
    return value


def _positive(raw: str, header: str) -> float:
    value = _number(raw, header, "a number of milliseconds")
    if value <= 0:
        raise InvalidRequest(f"`{header}` must be a number of milliseconds > 0 (got {raw!r}).", param=header)
    return value


def _share(raw: str, header: str) -> float:
    value = _number(raw, header, "a quality score between 0 and 1")
    if not 0 <= value <= 1:
        raise InvalidRequest(f"`{header}` must be a quality score between 0 and 1 (got {raw!r}).", param=header)
    return value
