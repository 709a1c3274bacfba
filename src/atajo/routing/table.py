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
        self._fixed_plans: dict[str, tuple[tuple[str, Deployment], ...]] = {}

    def names(self) -> list[str]:
        """The public names clients can list (the catch-all ``*`` is not one)."""
        return sorted(n for n in self._deployments if n != WILDCARD)

    def has(self, model: str) -> bool:
        return model in self._deployments or WILDCARD in self._deployments

    def deployments(self, model: str) -> list[Deployment]:
        """The deployments configured under ``model`` (not the catch-all's, not its fallbacks')."""
        return list(self._deployments.get(model, ()))

    def all_deployments(self) -> list[Deployment]:
        return [d for deps in self._deployments.values() for d in deps]

    def plan(self, model: str) -> Sequence[tuple[str, Deployment]]:
        """(public model, deployment) pairs to try in order: the model's deployments by weighted draw,
        then each fallback model's, each model entry at most once.

        A name served by the catch-all ``*`` follows the catch-all's fallbacks, and is reported under the
        name the client asked for.
        """
        fixed = self._fixed_plans.get(model)
        if fixed is not None:
            return fixed
        if model not in self._deployments and WILDCARD not in self._deployments:
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
        plan: list[tuple[str, Deployment]] = []
        drawn = False
        seen: set[str] = set()
        queue = [model]
        while queue:
            name = queue.pop(0)
            entry = name if name in self._deployments else WILDCARD
            if entry in seen:
                continue
            seen.add(entry)
            deps = self._deployments.get(entry, [])
            drawn = drawn or len(deps) > 1
            plan.extend((name, d) for d in self._weighted_order(deps))
            queue.extend(self._fallbacks.get(entry, ()))
        if not drawn and model in self._deployments:
            # No weighted draw anywhere in the chain: the same plan every time, so build it once.
            fixed = self._fixed_plans[model] = tuple(plan)
            return fixed
        return plan

    def _weighted_order(self, deps: list[Deployment]) -> list[Deployment]:
        if len(deps) < 2:
            return deps
        # Efraimidis-Spirakis: sort by u^(1/w), a weighted shuffle in one pass.
        return sorted(deps, key=lambda d: self._rng.random() ** (1 / d.weight), reverse=True)
