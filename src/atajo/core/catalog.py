"""The model catalog: what each model costs, holds, can do, and how good and fast it is.

Shipped as data (``catalog.yaml`` beside this file, whose header documents every field) and overridable by
a dict of the same shape (``load_catalog(overrides)``): a model named there has the fields given replaced,
a new name must give a whole entry, ``null`` drops a model, ``replace: true`` starts from nothing.

Prices are written as decimals in the catalog's currency and held as integer micro-units (millionths), per
1K tokens, per image or per audio minute. Every bad field is reported with its path
(``catalog.models.gpt-4o.input_per_1k: ...``) as a ``ConfigError``.

It lives in ``core`` (not ``routing``) because the providers (the simulated one's latency), the stages
(spend, cache savings) and routing all read it, and mechanism packages may not import each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib.resources import files
from types import MappingProxyType
from typing import Any, Literal, NoReturn, cast

import yaml

from atajo.core.results import Usage
from atajo.errors import ConfigError

MICROS = 1_000_000

Kind = Literal["chat", "embedding", "image", "audio"]
KINDS: tuple[Kind, ...] = ("chat", "embedding", "image", "audio")
ENCODINGS = ("o200k_base", "cl100k_base")
CAPABILITIES = frozenset({"tools", "vision", "json_mode", "reasoning"})
TASKS = frozenset({"general", "code", "math", "reasoning", "chat"})

_PRICE_FIELDS = {
    "input_per_1k": "input_micros_per_1k",
    "cached_input_per_1k": "cached_input_micros_per_1k",
    "output_per_1k": "output_micros_per_1k",
    "per_image": "image_micros",
    "per_audio_minute": "audio_minute_micros",
}
_REQUIRED = ("provider", "kind", "context", "ttft_ms", "tokens_per_s")
_OPTIONAL = (
    "batch_discount",
    "aliases",
    "tokenizer",
    "max_output",
    "capabilities",
    "quality",
    *_PRICE_FIELDS,
)
_FIELDS = frozenset(_REQUIRED + _OPTIONAL)
BATCH_DISCOUNTS = {"openai": 0.5, "anthropic": 0.5}
"""Share of the price taken off requests sent through the provider's Batch API, when a model does not say."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    provider: str
    kind: Kind
    context: int
    """Context window in tokens, input and output together (0: not a token model)."""
    ttft_ms: float
    tokens_per_s: float
    input_micros_per_1k: int = 0
    output_micros_per_1k: int = 0
    cached_input_micros_per_1k: int | None = None
    """Price of input tokens read from the provider's prompt cache; None: the input price."""
    image_micros: int | None = None
    audio_minute_micros: int | None = None
    max_output: int | None = None
    tokenizer: str | None = None
    """The model's tiktoken encoding; None: not public (token counts are estimates)."""
    aliases: tuple[str, ...] = ()
    capabilities: frozenset[str] = frozenset()
    quality: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    batch_discount: float = 0.0
    """Share of the price taken off a request sent through the provider's Batch API (0.5: half price)."""

    def batch_cost_micros(self, usage: Usage) -> int:
        """What a call with this usage cost through the provider's Batch API, rounded down to a micro-unit."""
        return int(self.cost_micros(usage) * (1 - Decimal(str(self.batch_discount))))

    def cost_micros(self, usage: Usage) -> int:
        """What a call with this usage cost: cached input at the cached price, rounded down to a micro-unit."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = self.cached_input_micros_per_1k
        if cached_price is None:
            cached_price = self.input_micros_per_1k
        return (
            (usage.prompt_tokens - cached) * self.input_micros_per_1k
            + cached * cached_price
            + usage.completion_tokens * self.output_micros_per_1k
        ) // 1000

    def tokens_cost_micros(self, input_tokens: int, output_tokens: int) -> int:
        return (input_tokens * self.input_micros_per_1k + output_tokens * self.output_micros_per_1k) // 1000

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


class Catalog:
    def __init__(self, models: Mapping[str, ModelInfo], currency: str) -> None:
        self.models = dict(models)
        self.currency = currency
        self._aliases = {alias: info for info in self.models.values() for alias in info.aliases}
        self._resolved: dict[str, ModelInfo | None] = {}

    def get(self, model: str) -> ModelInfo | None:
        """By name or alias; else the longest name or alias of which the model is a dated snapshot
        (``gpt-4o-2024-08-06`` → ``gpt-4o``); else the same, lower-cased and without a ``provider/`` prefix."""
        if model in self._resolved:
            return self._resolved[model]
        info = self._find(model)
        if info is None:
            bare = model.rsplit("/", 1)[-1].lower()
            info = self._find(bare) if bare != model else None
        if len(self._resolved) < 10_000:  # names come from config, but a catch-all passes clients' through
            self._resolved[model] = info
        return info

    def _find(self, model: str) -> ModelInfo | None:
        info = self.models.get(model) or self._aliases.get(model)
        if info is not None:
            return info
        names = [*self.models, *self._aliases]
        best = max((n for n in names if _snapshot_of(model, n)), key=len, default=None)
        if best is None:
            return None
        return self.models.get(best) or self._aliases[best]

    def __contains__(self, model: str) -> bool:
        return self.get(model) is not None

    def __len__(self) -> int:
        return len(self.models)

    @classmethod
    def bundled(cls) -> Catalog:
        return load_catalog()


def _snapshot_of(model: str, name: str) -> bool:
    """``gpt-4o-2024-08-06``, ``gpt-4-0613``, ``claude-3-5-sonnet@20240620`` are snapshots of the name before the
    date; ``gpt-4.5-preview`` or ``o3-pro`` are other models, not ``gpt-4`` or ``o3``."""
    if not model.startswith(name) or len(model) <= len(name) + 1:
        return False
    sep, nxt = model[len(name)], model[len(name) + 1]
    return sep == "@" or (sep == "-" and nxt.isdigit())


def bundled_data() -> dict[str, Any]:
    """The shipped catalog as plain data (``catalog.yaml``)."""
    data = yaml.safe_load(files("atajo.core").joinpath("catalog.yaml").read_text(encoding="utf-8"))
    return cast("dict[str, Any]", data)


def load_catalog(overrides: Mapping[str, Any] | None = None) -> Catalog:
    """The bundled catalog with ``overrides`` (the same shape, e.g. the config's ``catalog:``) merged in."""
    return build_catalog(merge(bundled_data(), overrides or {}))


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides on top of ``base``: per model, fields replace fields; ``null`` drops a model."""
    if not isinstance(overrides, Mapping):
        _fail("catalog", "must be a mapping")
    unknown = set(overrides) - {"currency", "models", "replace"}
    if unknown:
        _fail(f"catalog.{sorted(unknown)[0]}", "unknown field (expected currency, models, replace)")
    replace = overrides.get("replace", False)
    if not isinstance(replace, bool):
        _fail("catalog.replace", "must be true or false")
    currency = overrides.get("currency", base["currency"])
    if currency != base["currency"] and not replace:
        _fail(
            "catalog.currency",
            f"{currency!r} differs from the bundled catalog's {base['currency']!r}: its prices would be read in "
            "the wrong currency; set replace: true and price every model you use",
        )
    models: dict[str, Any] = {} if replace else {k: dict(v) for k, v in base["models"].items()}
    extra = overrides.get("models") or {}
    if not isinstance(extra, Mapping):
        _fail("catalog.models", "must be a mapping of model name to fields")
    for name, entry in extra.items():
        if entry is None:
            models.pop(name, None)
        elif not isinstance(entry, Mapping):
            _fail(f"catalog.models.{name}", "must be a mapping of fields (or null to drop the model)")
        elif name in models:
            models[name] = {**models[name], **entry}
        else:
            models[name] = dict(entry)
    return {"currency": currency, "models": models}


def build_catalog(data: Mapping[str, Any]) -> Catalog:
    """Validate plain data into a ``Catalog``; the first bad field raises ``ConfigError`` naming it."""
    currency = data.get("currency")
    if not isinstance(currency, str) or not currency.strip():
        _fail("catalog.currency", "must be a currency code such as USD")
    raw_models = data.get("models")
    if not isinstance(raw_models, Mapping):
        _fail("catalog.models", "must be a mapping of model name to fields")
    models = {str(name): _model(str(name), entry) for name, entry in raw_models.items()}
    seen: dict[str, str] = {}
    for info in models.values():
        for alias in info.aliases:
            owner = seen.get(alias) or (alias if alias in models else None)
            if owner is not None and owner != info.name:
                _fail(f"catalog.models.{info.name}.aliases", f"{alias!r} already names {owner!r}")
            seen[alias] = info.name
    return Catalog(models, currency)


def _model(name: str, entry: Any) -> ModelInfo:
    where = f"catalog.models.{name}"
    if not isinstance(entry, Mapping):
        _fail(where, "must be a mapping of fields")
    unknown = set(entry) - _FIELDS
    if unknown:
        _fail(f"{where}.{sorted(unknown)[0]}", "unknown field")
    for key in _REQUIRED:
        if entry.get(key) is None:
            _fail(f"{where}.{key}", "required")
    kind = entry["kind"]
    if kind not in KINDS:
        _fail(f"{where}.kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
    provider = entry["provider"]
    if not isinstance(provider, str) or not provider:
        _fail(f"{where}.provider", "must be a non-empty string")
    tokenizer = entry.get("tokenizer")
    if tokenizer is not None and tokenizer not in ENCODINGS:
        _fail(f"{where}.tokenizer", f"must be one of {', '.join(ENCODINGS)} (got {tokenizer!r})")
    prices = {attr: _micros(f"{where}.{key}", entry[key]) for key, attr in _PRICE_FIELDS.items() if key in entry}
    if kind in ("chat", "embedding") and "input_micros_per_1k" not in prices:
        _fail(f"{where}.input_per_1k", f"required for a {kind} model")
    if kind == "chat" and "output_micros_per_1k" not in prices:
        _fail(f"{where}.output_per_1k", "required for a chat model")
    if kind == "image" and "image_micros" not in prices:
        _fail(f"{where}.per_image", "required for an image model")
    if kind == "audio" and "audio_minute_micros" not in prices:
        _fail(f"{where}.per_audio_minute", "required for an audio model")
    context = _int(f"{where}.context", entry["context"])
    max_output = _int(f"{where}.max_output", entry["max_output"]) if entry.get("max_output") is not None else None
    if max_output is not None and context and max_output > context:
        _fail(f"{where}.max_output", f"{max_output} is more than the context window ({context})")
    return ModelInfo(
        name=name,
        provider=provider,
        kind=kind,
        context=context,
        max_output=max_output,
        ttft_ms=_number(f"{where}.ttft_ms", entry["ttft_ms"]),
        tokens_per_s=_number(f"{where}.tokens_per_s", entry["tokens_per_s"]),
        tokenizer=tokenizer,
        aliases=tuple(_strings(f"{where}.aliases", entry.get("aliases") or ())),
        capabilities=_capabilities(f"{where}.capabilities", entry.get("capabilities") or ()),
        quality=_quality(f"{where}.quality", entry.get("quality") or {}),
        batch_discount=_fraction(f"{where}.batch_discount", entry.get("batch_discount", BATCH_DISCOUNTS.get(provider))),
        **prices,
    )


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(f"{path}: {message}", param=path)


def _micros(path: str, value: Any) -> int:
    """A decimal price → integer micro-units, exactly (a price finer than a micro-unit is an error)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _fail(path, f"must be a number (got {value!r})")
    try:
        amount = Decimal(str(value)) * MICROS
    except InvalidOperation:
        _fail(path, f"must be a number (got {value!r})")
    if not amount.is_finite() or amount < 0:
        _fail(path, f"must be a finite number >= 0 (got {value!r})")
    if amount != amount.to_integral_value():
        _fail(path, f"{value} is finer than a micro-unit (1e-6) of the currency")
    return int(amount)


def _fraction(path: str, value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        _fail(path, f"must be a share of the price in [0, 1] (got {value!r})")
    return float(value)


def _int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(path, f"must be a whole number >= 0 (got {value!r})")
    return int(value)


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        _fail(path, f"must be a number >= 0 (got {value!r})")
    return float(value)


def _strings(path: str, value: Any) -> Iterable[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        _fail(path, "must be a list of names")
    return cast("Iterable[str]", value)


def _capabilities(path: str, value: Any) -> frozenset[str]:
    names = frozenset(_strings(path, value))
    unknown = names - CAPABILITIES
    if unknown:
        _fail(path, f"unknown capability {sorted(unknown)[0]!r} (known: {', '.join(sorted(CAPABILITIES))})")
    return names


def _quality(path: str, value: Any) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        _fail(path, "must be a mapping of task type to a score in [0, 1]")
    scores: dict[str, float] = {}
    for task, score in value.items():
        if task not in TASKS:
            _fail(f"{path}.{task}", f"unknown task type (known: {', '.join(sorted(TASKS))})")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            _fail(f"{path}.{task}", f"must be a score in [0, 1] (got {score!r})")
        scores[str(task)] = float(score)
    return MappingProxyType(scores)
