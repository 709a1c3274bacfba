"""Model selection for routed names (``model: auto``): the cheapest candidate that meets the request's constraints.

A candidate is a configured model (a name in ``models``) with a catalog entry. For one request:

1. **Hard constraints** exclude candidates: the context window (input counted, output asked for), the
   capabilities the request needs (``tools``, ``vision``, ``json_mode``, read from the body), the most the
   request may cost (``x-atajo-max-cost``, estimated before the call with a typical answer), the slowest it
   may be (``x-atajo-max-latency-ms``: time to first token plus a typical answer at the model's speed), the
   least quality it accepts (``x-atajo-min-quality``), then provider health (every deployment's circuit open).
2. **Wanted quality** (soft): the complexity score picks a quality tier, and the task (code, math, …, guessed
   from the prompt) may ask more. The choice is the cheapest eligible candidate whose quality for the task
   reaches it; when none does, the best-quality eligible one (the reason says so).

Nothing here does I/O; ``healthy`` is asked about each candidate's deployments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from atajo.core.catalog import ModelInfo
from atajo.core.requests import ChatRequest, Request
from atajo.errors import NoHealthyModel, NoModelMeetsConstraints
from atajo.routing.complexity import ComplexityModel, prompt_text
from atajo.routing.tokens import Counts, TokenCounter
from atajo.settings import QualityTier, TaskName

Task = TaskName

# Lower-case patterns over lower-cased text: the same matches as re.IGNORECASE at half the cost.
_CODE = re.compile(
    r"```|\b(def|class|return|import|function|const|var|let|select|#include|lambda|printf|console\.log)\b|"
    r"\b(code|python|javascript|typescript|java|rust|golang|sql|regex|compile|bug|stack trace|refactor)\b"
)
_MATH = re.compile(
    r"\d\s*[-+*/^=<>]\s*\d|\b(solve|equation|integral|derivative|prove|theorem|probability|calculate|compute)\b|"
    r"\bhow many\b|[∫∑√π]"
)


def guess_task(text: str) -> Task:
    """``code`` or ``math`` from plain lexical cues, else ``general``; a cheap guess, documented as one."""
    head = text[:4000].lower()
    if _CODE.search(head):
        return "code"
    if _MATH.search(head):
        return "math"
    return "general"


def required_capabilities(request: Request) -> frozenset[str]:
    """What the request needs of a model: ``tools`` (tools or functions given), ``vision`` (an image part),
    ``json_mode`` (``response_format`` json_object or json_schema)."""
    if not isinstance(request, ChatRequest):
        return frozenset()
    body = request.body
    needs: set[str] = set()
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        needs.add("json_mode")
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            needs.add("vision")
            break
    return frozenset(needs)


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    """The public model name (a key of ``models``), which the request is rewritten to."""
    info: ModelInfo
    """Its catalog entry (through its first deployment's upstream model name)."""
    deployments: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limit:
    """A hard constraint's value and where it came from (a header, or a setting), for error messages."""

    value: float
    source: str


@dataclass(frozen=True, slots=True)
class Constraints:
    max_cost_micros: Limit | None = None
    max_latency_ms: Limit | None = None
    min_quality: Limit | None = None


@dataclass(frozen=True, slots=True)
class Option:
    candidate: Candidate
    estimate_micros: int
    latency_ms: float
    quality: float


@dataclass(slots=True)
class Choice:
    option: Option
    reason: str
    complexity: float
    task: Task
    wanted_quality: float
    eligible: list[Option] = field(default_factory=list)
    """Every candidate meeting the hard constraints, cheapest first (the cascade picks from them)."""

    @property
    def name(self) -> str:
        return self.option.candidate.name


def wanted_quality(score: float, tiers: Sequence[QualityTier]) -> float:
    for tier in tiers:
        if tier.below is None or score < tier.below:
            return tier.min_quality
    return tiers[-1].min_quality


class Selector:
    """Chooses among ``candidates`` for each request of one routed name."""

    def __init__(
        self,
        group: str,
        candidates: Sequence[Candidate],
        counter: TokenCounter,
        complexity: ComplexityModel,
        tiers: Sequence[QualityTier],
        task_min_quality: Mapping[TaskName, float],
        *,
        task: str = "auto",
        healthy: Callable[[Candidate], bool] = lambda _: True,
    ) -> None:
        self.group = group
        self.candidates = list(candidates)
        self.counter = counter
        self.complexity = complexity
        self.tiers = list(tiers)
        self.task_min_quality: dict[str, float] = {str(k): v for k, v in task_min_quality.items()}
        self.task = task
        self.healthy = healthy

    def options(self, request: Request, counts: Counts | None = None) -> list[Option]:
        """Every candidate's estimate for this request (tokens counted once per encoding, into ``counts``)."""
        counts = {} if counts is None else counts
        options = []
        for candidate in self.candidates:
            info = candidate.info
            tokens = self.counter.count(request, info.name, counts).tokens
            output = self.counter.output_tokens(request, info.name, "typical")
            cost = info.tokens_cost_micros(tokens, output)
            latency = info.ttft_ms + (1000 * output / info.tokens_per_s if info.tokens_per_s else 0)
            options.append(Option(candidate, cost, latency, 0.0))
        return options

    def choose(self, request: Request, constraints: Constraints, counts: Counts | None = None) -> Choice:
        """``counts``: the request's token counts by encoding (``ctx.token_counts``), read and filled in."""
        counts = {} if counts is None else counts
        text = prompt_text(request)
        score = self.complexity.score(text)
        task: Task = guess_task(text) if self.task == "auto" else self.task  # type: ignore[assignment]
        wanted = max(wanted_quality(score, self.tiers), self.task_min_quality.get(task, 0.0))
        needs = required_capabilities(request)
        excluded: list[tuple[str, str, str]] = []  # (model, why, the header or setting behind it)
        eligible: list[Option] = []
        for option in self.options(request, counts):
            candidate = option.candidate
            info = candidate.info
            quality = _quality(info, task)
            option = Option(candidate, option.estimate_micros, option.latency_ms, quality)
            missing = sorted(needs - info.capabilities)
            if missing:
                excluded.append((candidate.name, f"no {missing[0]}", "the request's " + _need_source(missing[0])))
            elif not self.counter.fits_context(info.name, request, counts):
                excluded.append((candidate.name, "context too small", "the request's length"))
            elif constraints.max_cost_micros and option.estimate_micros > constraints.max_cost_micros.value:
                excluded.append((candidate.name, "cost", constraints.max_cost_micros.source))
            elif constraints.max_latency_ms and option.latency_ms > constraints.max_latency_ms.value:
                excluded.append((candidate.name, "latency", constraints.max_latency_ms.source))
            elif constraints.min_quality and quality < constraints.min_quality.value:
                excluded.append((candidate.name, "quality", constraints.min_quality.source))
            elif not self.healthy(candidate):
                excluded.append((candidate.name, "circuit open", "health"))
            else:
                eligible.append(option)
        if not eligible:
            raise self._none_left(excluded, constraints)
        eligible.sort(key=lambda o: (o.estimate_micros, -o.quality, o.latency_ms))
        good = [o for o in eligible if o.quality >= wanted]
        if good:
            chosen = good[0]
            why = f"cheapest of {len(good)} eligible meeting quality>={wanted:g}"
        else:
            chosen = max(eligible, key=lambda o: (o.quality, -o.estimate_micros))
            why = f"best quality ({chosen.quality:g}) of {len(eligible)} eligible, none reaches {wanted:g}"
        reason = f"{why} ({task}, complexity {score:.2f})"
        if excluded:
            reason += "; excluded " + ", ".join(f"{name}: {what}" for name, what, _ in excluded)
        return Choice(chosen, reason, score, task, wanted, eligible)

    def _none_left(
        self, excluded: list[tuple[str, str, str]], constraints: Constraints
    ) -> NoModelMeetsConstraints | NoHealthyModel:
        if not excluded:
            return NoModelMeetsConstraints(
                f"`{self.group}` has no model to choose from: configure chat models the catalog prices, or list "
                f"them in routing.models.{self.group}.candidates.",
                param="model",
            )
        listing = "; ".join(f"{name}: {what}" for name, what, _ in excluded)
        if excluded and all(source == "health" for _, _, source in excluded):
            return NoHealthyModel(f"No model for `{self.group}` is available: {listing}.")
        # Name the constraint that excluded the most candidates (health aside): what the caller can change.
        sources = [source for _, _, source in excluded if source != "health"]
        source = max(set(sources), key=sources.count) if sources else "model"
        header = source if source.startswith("x-atajo-") else None
        hint = f" Raise or drop `{header}`." if header else ""
        return NoModelMeetsConstraints(
            f"No model for `{self.group}` meets this request's constraints ({listing}); the binding one is "
            f"{source}.{hint}",
            param=header or "model",
        )


def _quality(info: ModelInfo, task: str) -> float:
    quality = info.quality
    return quality.get(task, quality.get("general", 0.0))


def _need_source(capability: str) -> str:
    return {"tools": "tools", "json_mode": "response_format", "vision": "image input"}.get(capability, capability)
