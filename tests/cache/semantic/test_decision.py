from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from atajo.cache.semantic.decision import (
    FEATURES,
    SHIPPED_MODEL,
    Decider,
    LabelledPair,
    PairModel,
    TextFacts,
    calibrate_threshold,
    fit,
    fit_model,
    trigram_cosine,
    veto,
)
from atajo.cache.semantic.embedder import Embedder
from atajo.cache.semantic.index import Neighbour


def ask(decider: Decider, embedder: Embedder, query: str, stored: str, vectors: bool = True) -> bool:
    q, s = embedder.embed([query, stored])
    if not vectors:
        return decider.decide(query, [Neighbour("k", stored, float(q @ s))]).hit
    return decider.decide(query, [Neighbour("k", stored, float(q @ s), s)], q).hit


def lenient(**overrides: float) -> Decider:
    data = Decider.default().to_dict() | {"threshold": 0.0, "lexical_threshold": 0.0, "cosine_floor": 0.0}
    return Decider.from_dict(data | overrides)


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
    for vectors in (True, False):
        assert not ask(lenient(), embedder, asked, stored, vectors)
    assert veto(TextFacts.of(asked), TextFacts.of(stored)) in ("numbers", "negation")


def test_same_numbers_in_words_and_digits_are_not_vetoed() -> None:
    assert veto(TextFacts.of("Convert 2 miles to km"), TextFacts.of("How many km are two miles?")) is None


def test_facts() -> None:
    facts = TextFacts.of("Why doesn't the iPhone 15 charge with USB-C in New York?")
    assert facts.numbers == {"15"}
    assert facts.negated
    assert facts.qtype == "why"
    assert {"iphone", "usb", "new", "york"} <= facts.names
    assert not facts.deictic
    assert TextFacts.of("Is Python fast?").qtype == "yesno"
    assert TextFacts.of("What is wrong with the following code?").deictic


def test_trigram_cosine() -> None:
    a, b = TextFacts.of("Sort a list"), TextFacts.of("sort  a LIST")
    assert trigram_cosine(a, b) == pytest.approx(1.0)
    assert trigram_cosine(a, TextFacts.of("xyz qwv")) == 0.0
    assert 0.0 < trigram_cosine(a, TextFacts.of("Sort a dict")) < 1.0


def test_shipped_decision_hits_a_paraphrase_and_not_an_unrelated_question(embedder: Embedder) -> None:
    decider = Decider.default()
    assert ask(decider, embedder, "How can I change my password?", "How do I change my password?")
    assert not ask(decider, embedder, "What is the capital of France?", "How do I reset my password?")
    q, s = embedder.embed(["How can I change my password?", "How do I change my password?"])
    neighbour = Neighbour("k", "How do I change my password?", float(q @ s), s)
    assert decider.decide("How can I change my password?", [neighbour], q).vectors
    assert not decider.decide("How can I change my password?", [neighbour]).vectors  # the lexical fallback


def test_ambiguous_between_two_close_entries() -> None:
    decider = lenient()
    neighbours = [Neighbour("a", "How do I sort a list in Python?", 0.95)] * 2
    assert decider.decide("How to sort a list in Python?", neighbours).hit  # the same text twice is no rival
    rivals = [neighbours[0], Neighbour("b", "How do I sort a dict in Python?", 0.949)]
    match = decider.decide("How to sort a Python list?", rivals)
    assert match.reason == "ambiguous"
    assert match.margin < decider.min_gap
    # Far enough apart in cosine and wording, the better one is chosen.
    apart = [neighbours[0], Neighbour("c", "What is a Python dictionary?", 0.80)]
    assert decider.decide("How to sort a list in Python?", apart).neighbour == neighbours[0]
    assert Decider().decide("anything", []).reason == "empty"


def test_wording_picks_between_near_ties_of_cosine() -> None:
    decider = lenient()
    neighbours = [
        Neighbour("a", "What is the best way to learn French quickly?", 0.91),
        Neighbour("b", "How can I learn Spanish fast on my own?", 0.90),
    ]
    match = decider.decide("How do I learn Spanish fast on my own?", neighbours)
    assert match.neighbour is not None and match.neighbour.key == "b"


def test_parameters_round_trip_through_json(tmp_path: Path) -> None:
    decider = Decider.default()
    data = json.loads(json.dumps(decider.to_dict()))
    assert data["model"] == "default"
    assert Decider.from_dict(data) == decider
    changed = Decider.from_dict(data | {"threshold": 0.9, "min_gap": 0.05})
    assert (changed.threshold, changed.min_gap) == (0.9, 0.05)
    with pytest.raises(ValueError, match="predate"):
        Decider.from_dict({"weights": [0.0] * 13, "threshold": 0.5})
    # A weights file written elsewhere, named relative to the config's directory.
    decider.model.save(tmp_path / "w.npz", threshold=0.42)
    loaded = Decider.from_dict({"model": "w.npz"}, base=tmp_path)
    assert loaded.threshold == 0.42
    assert loaded.to_dict()["model"] == str(tmp_path / "w.npz")


def test_shipped_weights_load_and_agree_with_their_defaults() -> None:
    assert SHIPPED_MODEL.is_file()
    model = PairModel.load(SHIPPED_MODEL)
    assert model.feature_names == FEATURES
    assert model.w1.shape[0] == len(FEATURES) - 1 + 2 * 384
    decider = Decider.default()
    assert decider.threshold == model.defaults["threshold"]
    assert 0.0 < decider.threshold < 1.0 and decider.target_error == 0.02
    rng = np.random.default_rng(0)
    u, v = (x / np.linalg.norm(x) for x in rng.standard_normal((2, 384)))
    a, b = TextFacts.of("How do I bake bread?"), TextFacts.of("How to bake bread at home?")
    assert decider.probability(float(u @ v), a, b, u.astype(np.float32), v.astype(np.float32)) == pytest.approx(
        model.probability(features_of(a, b, float(u @ v)), u, v)
    )


def features_of(a: TextFacts, b: TextFacts, cosine: float) -> list[float]:
    from atajo.cache.semantic.decision import features

    return features(cosine, a, b)


def test_weights_of_other_features_are_refused(tmp_path: Path) -> None:
    import dataclasses

    model = PairModel.load(SHIPPED_MODEL)
    path = tmp_path / "old.npz"
    model.save(path)
    raw = dict(np.load(path, allow_pickle=False))
    meta = json.loads(str(raw["meta"]))
    raw["meta"] = np.array(json.dumps(meta | {"features": ["bias", "cosine"]}))
    with open(path, "wb") as f:
        np.savez(f, **raw)
    with pytest.raises(ValueError, match="fitted for features"):
        PairModel.load(path)
    with pytest.raises(ValueError, match="lexical weights"):
        dataclasses.replace(model, lexical=model.lexical[:3])


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


def _synthetic_vectors(n: int, seed: int) -> list[LabelledPair]:
    """Pairs whose sameness is written in one direction of the vectors, not in the words or the cosine."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        same = bool(rng.random() < 0.5)
        u = rng.standard_normal(16)
        v = u + 0.3 * rng.standard_normal(16)
        v[0] = abs(v[0]) * (1 if same else -1) * 2
        u[0] = abs(u[0]) * 2
        u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
        cosine = 0.8 + 0.1 * float(rng.random())
        pairs.append(LabelledPair("what is x", "what is x", cosine, same, u.astype(np.float32), v.astype(np.float32)))
    return pairs


def test_the_network_learns_from_the_vectors_deterministically() -> None:
    train = _synthetic_vectors(1200, 1)
    model = fit_model(train)
    again = fit_model(train)
    assert np.array_equal(model.w1, again.w1)
    held_out = _synthetic_vectors(400, 2)
    from atajo.cache.semantic.decision import features, pair_inputs

    facts = TextFacts.of("what is x")
    rows = []
    for p in held_out:
        assert p.query_vector is not None and p.stored_vector is not None
        rows.append(pair_inputs(features(p.cosine, facts, facts), p.query_vector, p.stored_vector))
    inputs = np.stack(rows)
    predicted = model.probabilities(inputs) >= 0.5
    accuracy = float(np.mean(predicted == np.array([p.same for p in held_out])))
    assert accuracy > 0.8  # chance is 0.5, and the lexical model sees nothing (below)
    # The lexical fallback cannot see the difference: the words are the same on both sides.
    assert abs(model.lexical_probability(features(0.85, facts, facts)) - 0.5) < 0.1
