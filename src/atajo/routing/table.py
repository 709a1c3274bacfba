"""Public model names → the deployments that serve them, in the order to try them."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from atajo.core.deployments import Deployment
from atajo.errors import ModelNotFound

WILDCARD = "*"


class ModelTable:
    def __init__(
        self,
        deployments: Mapping[str, Sequence[Deployment]],
        fallbacks: Mapping[str, Sequence[str]],
        rng: random.Random | None = None,
    ) -> None:
        self._deployments = {name: list(deps) for name, deps in deployments.items()}
        self._fallbacks = {name: list(names) for name, names in fallbacks.items()}
        self._rng = rng or random.Random()

    def names(self) -> list[str]:
        """The public names clients can list (the catch-all ``*`` is not one)."""
        return sorted(n for n in self._deployments if n != WILDCARD)

    def has(self, model: str) -> bool:
        return model in self._deployments or WILDCARD in self._deployments

    def all_deployments(self) -> list[Deployment]:
        return [d for deps in self._deployments.values() for d in deps]

    def plan(self, model: str) -> list[tuple[str, Deployment]]:
        """(public model, deployment) pairs to try in order: the model's deployments by weighted draw,
        then each fallback model's, each model entry at most once.

        A name served by the catch-all ``*`` follows the catch-all's fallbacks, and is reported under the
        name the client asked for.
        """
        if model not in self._deployments and WILDCARD not in self._deployments:
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
        plan: list[tuple[str, Deployment]] = []
        seen: set[str] = set()
        queue = [model]
        while queue:
            name = queue.pop(0)
            entry = name if name in self._deployments else WILDCARD
            if entry in seen:
                continue
            seen.add(entry)
            plan.extend((name, d) for d in self._weighted_order(self._deployments.get(entry, [])))
            queue.extend(self._fallbacks.get(entry, ()))
        return plan

    def _weighted_order(self, deps: list[Deployment]) -> list[Deployment]:
        if len(deps) < 2:
            return deps
        # Efraimidis-Spirakis: sort by u^(1/w), a weighted shuffle in one pass.
        return sorted(deps, key=lambda d: self._rng.random() ** (1 / d.weight), reverse=True)
