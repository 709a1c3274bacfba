"""The complexity estimator: the shipped model loads, scores are in [0, 1], fast, and sensible on hand-written
prompts; the router figures match hand-computed curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.routing.complexity import DENSE, ComplexityModel, dense_features, features, prompt_text
from atajo.routing.evaluate import Labelled, apgr, curve, random_share_at, share_at, split_of, summarize


@pytest.fixture(scope="module")
def model() -> ComplexityModel:
    return ComplexityModel.load()


def test_shipped_model_loads_with_its_record(model: ComplexityModel) -> None:
    assert len(model.weights) > 1000
    assert len(model.dense_weights) == len(DENSE)
    meta = model.meta or {}
    assert meta["fitted_on"].startswith("split fit")
    assert {"mmlu", "gsm8k"} <= set(meta["test"]["benchmarks"])  # figures on held-out prompts travel with it


MATH = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def test_scores_are_probabilities_and_a_math_problem_outranks_small_talk(model: ComplexityModel) -> None:
    # The labels hold only MMLU and GSM8K prompts: the estimator knows math word problems and exam questions,
    # and sees small talk as neither.
    small_talk = [model.score(t) for t in ("hi, how are you?", "Thanks!", "Hello")]
    hard = [
        model.score(MATH),
        model.score("A train leaves at 3:15 pm at 60 mph and a second at 4:00 pm at 75 mph. When does it catch up?"),
    ]
    for score in [*small_talk, *hard, model.score(""), model.score("x" * 100_000)]:
        assert 0.0 <= score <= 1.0
    assert min(hard) > max(small_talk)


def test_prompt_text_is_the_last_user_message() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}]},
        ]
    }
    assert prompt_text(ChatRequest("m", body)) == "second"
    assert prompt_text(ChatRequest("m", {"messages": [{"role": "system", "content": "x"}]})) == ""
    assert prompt_text(EmbeddingsRequest("m", {"input": "x"})) == ""


def test_features_are_the_documented_ones() -> None:
    # A multiple-choice prompt: its tokens and word pairs, each also prefixed by the format.
    choice = features("What is 2+2?\nA. four\nB. five")
    plain = {"u:what", "u:is", "u:<num>", "u:+", "u:?", "u:a", "u:.", "u:four", "u:b", "u:five", "b:what_is"}
    assert plain <= choice and {"choice|" + f for f in plain} <= choice
    assert "b:a_four" in choice and all(f.startswith(("u:", "b:", "choice|")) for f in choice)
    # Any other prompt: only the word-problem shape, one bin per count, and no words.
    problem = features("Tom has 3 apples and buys 4 more. How many apples does he have?")
    assert {"open|m:numbers=2", "open|m:sentences=2", "open|m:cue_more=1", "open|m:names=1"} <= problem
    assert all(f.startswith("open|m:") for f in problem)
    assert features("A b c 1 2 3", max_chars=3) == features("A b")  # reads the first max_chars only
    shape = dense_features("12 apples\n3 pears")
    assert len(shape) == len(DENSE) and all(0 <= v <= 3 for v in shape)


def toy_model() -> ComplexityModel:
    """Words with fixed weights: alpha > beta > (nothing) > gamma > delta (in multiple-choice prompts, which
    have word features: ``choice()``)."""
    weights = {"u:alpha": (3.0, -3.0), "u:beta": (1.0, -1.0), "u:gamma": (-1.0, 1.0), "u:delta": (-3.0, 3.0)}
    return ComplexityModel(weights=weights, dense_weights=((0.0, 0.0),) * len(DENSE), bias=(0.0, 0.0))


def test_round_trip_and_format_checks(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(toy_model().to_dict()))
    loaded = ComplexityModel.load(path)
    assert loaded.weights == toy_model().weights and loaded.score(choice("alpha")) == toy_model().score(choice("alpha"))
    assert toy_model().score(choice("alpha")) > 0.9 and toy_model().score(choice("nothing")) == 0.5
    with pytest.raises(ValueError, match="format"):
        ComplexityModel.from_dict({**toy_model().to_dict(), "version": 99})


# Hand-computed: five prompts in score order.
#   score   weak strong   accuracy after sending the top k to strong (k = 0..5): .6 .8 1.0 1.0 .8 .8
#   alpha    F    T       weak accuracy .6, strong .8; 95 % of strong = .76, reached between k=0 (.6) and
#   beta     F    T       k=1 (.8): share 0.2 x (.76 - .6) / (.8 - .6) = 0.16. PGR = (acc - .6) / .2 =
#   plain    T    T       0 1 2 2 1 1, trapezoids of width .2: .1 + .3 + .4 + .3 + .2 = 1.3.
#   gamma    T    F       Random routing: (.76 - .6) / .2 = 0.8 strong calls, APGR 0.5.
#   delta    T    T
def choice(word: str) -> str:
    return f"{word} question\nA. yes\nB. no"


TOY = [
    (choice("alpha"), False, True),
    (choice("beta"), False, True),
    (choice("plain"), True, True),
    (choice("gamma"), True, False),
    (choice("delta"), True, True),
]


def test_curve_share_and_apgr_by_hand() -> None:
    items = [Labelled("toy", "", p, w, s) for p, w, s in TOY]
    scores = [toy_model().score(it.prompt) for it in items]
    c = curve(scores, items)
    assert c.shares == pytest.approx((0, 0.2, 0.4, 0.6, 0.8, 1.0))
    assert c.accuracies == pytest.approx((0.6, 0.8, 1.0, 1.0, 0.8, 0.8))
    assert share_at(c) == pytest.approx(0.16)
    assert apgr(c) == pytest.approx(1.3)
    assert random_share_at(c) == pytest.approx(0.8)
    # A router that cannot tell prompts apart is random routing: one straight segment.
    flat = curve([0.5] * 5, items)
    assert flat.shares == (0.0, 1.0) and apgr(flat) == pytest.approx(0.5) and share_at(flat) == pytest.approx(0.8)


def test_summary_per_benchmark() -> None:
    items = [Labelled("a", "", p, w, s) for p, w, s in TOY] + [Labelled("b", "", "x", True, True)]
    out = summarize([0.9, 0.8, 0.5, 0.2, 0.1, 0.3], items)
    assert out["benchmarks"]["a"]["strong_share_at_95"] == 0.16
    assert out["benchmarks"]["a"]["apgr"] == 1.3
    assert out["benchmarks"]["b"]["apgr"] is None  # both models right: no gap to recover
    assert out["benchmarks"]["b"]["strong_share_at_95"] == 0.0


def test_split_is_by_prompt_hash() -> None:
    splits = [split_of(f"prompt {i}") for i in range(3000)]
    assert 0.30 < splits.count("test") / len(splits) < 0.37
    assert split_of("prompt 1") == split_of("prompt 1")
