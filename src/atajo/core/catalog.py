"""The model catalog: prices and typical latency per model, shipped as data (``catalog.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import yaml

from atajo.core.results import Usage

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    input_micros_per_1k: int
    output_micros_per_1k: int
    context: int
    ttft_ms: float
    tokens_per_s: float

    def cost_micros(self, usage: Usage) -> int:
        return (
            usage.prompt_tokens * self.input_micros_per_1k + usage.completion_tokens * self.output_micros_per_1k
        ) // 1000


class Catalog:
    def __init__(self, models: dict[str, ModelInfo], currency: str) -> None:
        self.models = models
        self.currency = currency
        self._resolved: dict[str, ModelInfo | None] = {}

    def get(self, model: str) -> ModelInfo | None:
        """Exact name, else the longest catalog name the model starts with (``gpt-4o-2024-08-06`` → ``gpt-4o``)."""
        if model in self._resolved:
            return self._resolved[model]
        info = self.models.get(model)
        if info is None:
            best = max((n for n in self.models if model.startswith(n)), key=len, default=None)
            info = self.models[best] if best else None
        if len(self._resolved) < 10_000:  # names come from config, but a catch-all passes clients' through
            self._resolved[model] = info
        return info

    @classmethod
    def bundled(cls) -> Catalog:
        data = yaml.safe_load(files("atajo.core").joinpath("catalog.yaml").read_text(encoding="utf-8"))
        models = {
            name: ModelInfo(
                name=name,
                input_micros_per_1k=round(m["input_per_1k"] * MICROS),
                output_micros_per_1k=round(m["output_per_1k"] * MICROS),
                context=int(m["context"]),
                ttft_ms=float(m["ttft_ms"]),
                tokens_per_s=float(m["tokens_per_s"]),
            )
            for name, m in data["models"].items()
        }
        return cls(models, data["currency"])
