from __future__ import annotations

import json
import random

import pytest

from atajo.cache.semantic.decision import (
    FEATURES,
    Decider,
    LabelledPair,
    TextFacts,
    calibrate_threshold,
    fit,
    veto,
)
from atajo.cache.semantic.embedder import Embedder
from atajo.cache.semantic.index import Neighbour


def ask(decider: Decider, embedder: Embedder, query: str, stored: str) -> bool:
    q, s = embedder.embed([query, stored])
    return decider.decide(query, [Neighbour("k", stored, float(q @ s))]).hit


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("How many calories are in 2 eggs?", "How many calories are in 3 eggs?"),
        ("What was the population of France in 2019?", "What was the population of France in 2020?"),
        ("How do I convert 5 km to miles?", "How do I convert six km to miles?"),
        ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
        ("Can I take ibuprofen with alcohol?", "Can't I take ibuprofen with alcohol?"),
        ("Should I use tabs for indentation?", "Should I never use tabs for indentation?"),
    ],
)
def test_different_number_or_negation_never_hits(embedder: Embedder, stored: str, asked: str) -> None:
    lenient = Decider.from_dict(Decider.default().to_dict() | {"threshold": 0.0, "cosine_floor": 0.0})
    assert not ask(lenient, embedder, asked, stored)
    assert veto(TextFacts.of(asked), TextFacts.of(stored)) in ("numbers", "negation")


def test_same_numbers_in_words_and_digits_are_not_vetoed() -> None:
    assert veto(TextFacts.of("Convert 2 miles to km"), TextFacts.of("How many km are two miles?")) is None


def test_facts() -> None:
    facts = TextFacts.of("Why doesn't the iPhone 15 charge with USB-C in New York?")
    assert facts.numbers == {"15"}
    assert facts.negated
    assert facts.qtype == "why"
    assert {"iphone", "usb", "new", "york"} <= facts.names
    assert TextFacts.of("Is Python fast?").qtype == "yesno"


def test_paraphrase_hits_with_a_lenient_threshold(embedder: Embedder) -> None:
    lenient = Decider.from_dict(Decider.default().to_dict() | {"threshold": 0.3})
    assert ask(lenient, embedder, "How can I change my password?", "How do I reset my password?")
    assert not ask(lenient, embedder, "What is the capital of France?", "How do I reset my password?")


def test_ambiguous_between_two_close_entries() -> None:
    decider = Decider.from_dict(Decider.default().to_dict() | {"threshold": 0.0})
    neighbours = [Neighbour("a", "How do I sort a list in Python?", 0.95)] * 2
    assert decider.decide("How to sort a list in Python?", neighbours).hit  # the same text twice is no rival
    rivals = [neighbours[0], Neighbour("b", "How do I sort a dict in Python?", 0.949)]
    match = decider.decide("How to sort a Python list?", rivals)
    assert match.reason in ("hit", "ambiguous")
    assert Decider().decide("anything", []).reason == "empty"


def test_parameters_round_trip_through_json() -> None:
    decider = Decider.default()
    data = json.loads(json.dumps(decider.to_dict()))
    assert data["features"] == list(FEATURES)
    assert Decider.from_dict(data) == decider
    with pytest.raises(ValueError, match="fitted for features"):
        Decider.from_dict(data | {"features": ["cosine"]})


def test_calibrate_threshold_meets_target() -> None:
    probabilities = [0.99, 0.95, 0.9, 0.9, 0.8, 0.7, 0.6, 0.5]
    same = [True, True, True, False, True, False, True, False]
    assert calibrate_threshold(probabilities, same, 0.0) == 0.95
    assert calibrate_threshold(probabilities, same, 0.2) == 0.8
    assert calibrate_threshold([0.9], [False], 0.02) == 1.0


def _synthetic(n: int, seed: int) -> list[LabelledPair]:
    """Pairs whose sameness depends on cosine and on word overlap (a fixed, small, noisy sample)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    pairs = []
    for _ in range(n):
        base = rng.sample(words, 6)
        same = rng.random() < 0.5
        other = base[:] if same else base[:3] + rng.sample(words, 3)
        if same:
            rng.shuffle(other)
        cosine = min(1.0, max(0.7, rng.gauss(0.9 if same else 0.85, 0.05)))
        label = same if rng.random() > 0.03 else not same
        pairs.append(LabelledPair("what is " + " ".join(other), "what is " + " ".join(base), cosine, label))
    return pairs


def test_calibration_reaches_its_target_on_held_out_pairs() -> None:
    decider = fit(_synthetic(1500, 1), _synthetic(1500, 2), target_error=0.05)
    held_out = _synthetic(2000, 3)
    hits = [p for p in held_out if decider.decide(p.query, [Neighbour("k", p.stored, p.cosine)]).hit]
    wrong = sum(not p.same for p in hits)
    assert len(hits) > 200
    assert wrong / len(hits) <= 0.05 + 0.02  # the target, with sampling slack
