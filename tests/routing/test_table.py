"""The model table: which deployments serve a public name, in which order, then which fallbacks."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from atajo.core.deployments import Deployment
from atajo.errors import ModelNotFound
from atajo.routing.table import ModelTable
from atajo.settings import DeploymentSettings, PoolSettings


def dep(public: str, index: int = 0, weight: float = 1.0, model: str | None = None) -> Deployment:
    settings = DeploymentSettings(provider="simulated", weight=weight, model=model)
    return Deployment.from_settings(public, index, settings, PoolSettings())


def ids(plan: Sequence[tuple[str, Deployment]]) -> list[tuple[str, str]]:
    return [(public, d.id) for public, d in plan]


def test_single_deployment() -> None:
    table = ModelTable({"a": [dep("a")]}, {})
    assert ids(table.plan("a")) == [("a", "a/0:simulated")]


def test_unknown_model_without_wildcard_is_model_not_found() -> None:
    table = ModelTable({"a": [dep("a")]}, {})
    assert not table.has("b")
    with pytest.raises(ModelNotFound) as info:
        table.plan("b")
    assert info.value.param == "model" and "`b`" in info.value.message


def test_fallbacks_follow_the_models_own_deployments_in_order() -> None:
    table = ModelTable(
        {"a": [dep("a", 0), dep("a", 1)], "b": [dep("b")], "c": [dep("c")]},
        {"a": ["b", "c"]},
        rng=random.Random(0),
    )
    plan = ids(table.plan("a"))
    assert sorted(plan[:2]) == [("a", "a/0:simulated"), ("a", "a/1:simulated")]
    assert plan[2:] == [("b", "b/0:simulated"), ("c", "c/0:simulated")]


def test_fallbacks_of_fallbacks_breadth_first_each_model_once() -> None:
    table = ModelTable(
        {"a": [dep("a")], "b": [dep("b")], "c": [dep("c")], "d": [dep("d")]},
        {"a": ["b", "c"], "b": ["d", "a"], "c": ["b", "d"], "d": ["a"]},
    )
    assert [public for public, _ in table.plan("a")] == ["a", "b", "c", "d"]


def test_fallback_cycle_terminates() -> None:
    table = ModelTable({"a": [dep("a")], "b": [dep("b")]}, {"a": ["b"], "b": ["a"]})
    assert [public for public, _ in table.plan("b")] == ["b", "a"]


def test_wildcard_serves_unknown_names_under_the_requested_name() -> None:
    table = ModelTable({"a": [dep("a")], "*": [dep("*")]}, {})
    assert table.has("anything")
    assert ids(table.plan("anything")) == [("anything", "*/0:simulated")]
    assert ids(table.plan("a")) == [("a", "a/0:simulated")]


def test_names_hide_the_wildcard_and_are_sorted() -> None:
    table = ModelTable({"b": [dep("b")], "*": [dep("*")], "a": [dep("a")]}, {})
    assert table.names() == ["a", "b"]
    assert [d.id for d in table.all_deployments()] == ["b/0:simulated", "*/0:simulated", "a/0:simulated"]


def test_wildcard_fallbacks_apply_to_names_it_serves() -> None:
    # `*` is what serves "gpt-x"; its fallbacks are the ones to follow.
    table = ModelTable({"*": [dep("*")], "backup": [dep("backup")]}, {"*": ["backup"]})
    assert ids(table.plan("gpt-x")) == [("gpt-x", "*/0:simulated"), ("backup", "backup/0:simulated")]


def test_wildcard_reached_twice_is_tried_once() -> None:
    table = ModelTable({"*": [dep("*")], "a": [dep("a")]}, {"*": ["a"], "a": ["*"]})
    assert [d.id for _, d in table.plan("gpt-x")] == ["*/0:simulated", "a/0:simulated"]
    assert [d.id for _, d in table.plan("a")] == ["a/0:simulated", "*/0:simulated"]


def test_weighted_order_follows_the_weights() -> None:
    heavy, light = dep("m", 0, weight=3.0), dep("m", 1, weight=1.0)
    table = ModelTable({"m": [heavy, light]}, {}, rng=random.Random(12345))
    firsts = Counter(table.plan("m")[0][1].id for _ in range(4000))
    # P(heavy first) = 3 / (3 + 1) for an Efraimidis-Spirakis draw.
    assert firsts["m/0:simulated"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_every_deployment_is_in_every_plan() -> None:
    deps = [dep("m", i, weight=w) for i, w in enumerate([0.5, 1, 2, 8])]
    table = ModelTable({"m": deps}, {}, rng=random.Random(9))
    for _ in range(200):
        assert sorted(d.id for _, d in table.plan("m")) == sorted(d.id for d in deps)


def test_equal_weights_are_shuffled_fairly() -> None:
    table = ModelTable({"m": [dep("m", i) for i in range(3)]}, {}, rng=random.Random(5))
    firsts = Counter(table.plan("m")[0][1].id for _ in range(3000))
    assert all(n / 3000 == pytest.approx(1 / 3, abs=0.04) for n in firsts.values())
    assert len(firsts) == 3


def test_upstream_model_name_per_deployment() -> None:
    renamed = dep("fast", model="gpt-4o-mini-2024-07-18")
    assert renamed.model_for("fast") == "gpt-4o-mini-2024-07-18"
    assert dep("*").model_for("whatever-was-asked") == "whatever-was-asked"


def test_fixed_plans_are_built_once_and_drawn_plans_are_not() -> None:
    table = ModelTable(
        {"a": [dep("a")], "b": [dep("b")], "w": [dep("w", 0), dep("w", 1)]},
        {"a": ["b"], "b": ["w"]},
        rng=random.Random(1),
    )
    assert ids(table.plan("b")) in (
        [("b", "b/0:simulated"), ("w", "w/0:simulated"), ("w", "w/1:simulated")],
        [("b", "b/0:simulated"), ("w", "w/1:simulated"), ("w", "w/0:simulated")],
    )
    orders = {tuple(ids(table.plan("a"))) for _ in range(50)}
    assert len(orders) == 2  # a's chain reaches w's two deployments: drawn afresh every time
    fixed = ModelTable({"a": [dep("a")], "b": [dep("b")]}, {"a": ["b"]})
    assert fixed.plan("a") is fixed.plan("a")  # no draw in the chain: built once
    assert ids(fixed.plan("a")) == [("a", "a/0:simulated"), ("b", "b/0:simulated")]
