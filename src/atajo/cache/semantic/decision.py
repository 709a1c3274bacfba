"""The match decision: is a stored question the same question as the one asked?

One cosine threshold cannot be both precise and useful: near-identical wording can ask something else
("... in 2019?" / "... in 2020?", "Is X safe?" / "Is X not safe?"), and true paraphrases can score lower
than unrelated questions on the same topic. The decision combines:

- hard vetoes, where a difference always changes the answer: different numbers (when both texts carry
  numbers) and a negation present in one but not the other;
- a logistic model over features that tell paraphrases from different questions: cosine, numbers in one
  text only, unmatched name-like tokens (capitalised words, acronyms, words with digits), content-word
  Jaccard overlap and difference, ordered-bigram overlap (word order: "from Canada to India"), length
  ratio, a different question type (what / how / why / when / who / which / where / yes-no; a feature
  rather than a veto: "How can I…" and "What is the best way to…" are often the same question), and
  products of the overlaps with cosine;
- a probability threshold calibrated on held-out labelled pairs to a target share of wrong hits (default
  2 %);
- an ambiguity rule: when the second-best distinct stored question is nearly as close as the best
  (``margin`` below ``min_margin``), the cache cannot tell which one was meant and does not answer.

``Decider.to_dict`` / ``from_dict`` give a small JSON/YAML-able dict (weights, feature names, threshold),
so what ``atajo cache calibrate`` fits can live in the config, and serving and evaluation run the same code.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from atajo.cache.semantic.index import Neighbour

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?(?:[.,][0-9]+)*")
_NUMBER = re.compile(r"^[0-9]+(?:[.,][0-9]+)*$")


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "twenty": "20", "thirty": "30",
    "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000",
    "first": "1", "third": "3", "fourth": "4", "fifth": "5", "half": "0.5", "twice": "2",
}  # fmt: skip
NEGATIONS = _wordset(
    "not no never none nobody nothing neither nor nowhere cannot without isn't aren't wasn't weren't don't "
    "doesn't didn't can't couldn't won't wouldn't shouldn't mustn't hasn't haven't hadn't ain't n't"
)
WH_WORDS = ("what", "how", "why", "when", "who", "whom", "whose", "which", "where")
YES_NO_STARTS = _wordset(
    "is are am was were do does did can could should would will shall may might must has have had "
    "isn't aren't don't doesn't didn't can't won't"
)
STOPWORDS = _wordset(
    """a an the of to in on at for by with from as into about over under between through during before after
    and or but if then so than that this these those there here it its it's i me my mine we us our you your
    he him his she her they them their is are am was were be been being do does did doing have has had
    can could should would will shall may might must what how why when who whom whose which where
    some any all each every more most much many very too also just only own same such get got one
    s t ll re ve d m"""
)


def _words(text: str) -> list[str]:
    return [w.replace("\u2019", "'") for w in _WORD.findall(text)]


def _number(word: str) -> str | None:
    lower = word.lower()
    if _NUMBER.match(lower):
        return lower.replace(",", "")
    return NUMBER_WORDS.get(lower)


def _stem(word: str) -> str:
    """A crude suffix strip, enough for overlap counting (``passwords`` ~ ``password``)."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@dataclass(frozen=True, slots=True)
class TextFacts:
    """What the features need from one text, computed once per text."""

    numbers: frozenset[str]
    negated: bool
    qtype: str
    names: frozenset[str]
    content: frozenset[str]
    bigrams: frozenset[tuple[str, str]]
    """Adjacent content words, in order: "import from Canada, sell in India" is not the reverse."""

    @classmethod
    def of(cls, text: str) -> TextFacts:
        words = _words(text)
        lower = [w.lower() for w in words]
        numbers = frozenset(n for w in words if (n := _number(w)) is not None)
        negated = any(w in NEGATIONS or w.endswith("n't") for w in lower)
        qtype = "other"
        for w in lower:
            if w in WH_WORDS:
                qtype = "who" if w in ("whom", "whose") else w
                break
        else:
            if lower and lower[0] in YES_NO_STARTS:
                qtype = "yesno"
        names = frozenset(
            w.lower()
            for i, w in enumerate(words)
            if _number(w) is None
            and w.lower() not in STOPWORDS
            and ((i > 0 and w[0].isupper()) or any(c.isupper() for c in w[1:]) or any(c.isdigit() for c in w))
        )
        stems = [_stem(w) for w in lower if w not in STOPWORDS and w not in NEGATIONS]
        return cls(numbers, negated, qtype, names, frozenset(stems), frozenset(itertools.pairwise(stems)))


COSINE_FLOOR = 0.7
MIN_MARGIN = 0.1
RERANK_WINDOW = 0.02

FEATURES = (
    "bias",
    "cosine",
    "cosine_sq",
    "number_one_side",
    "names_unmatched",
    "jaccard",
    "cosine_x_jaccard",
    "length_ratio",
    "qtype_mismatch",
    "same_content",
    "content_diff",
    "bigram_jaccard",
    "cosine_x_bigram",
)


def veto(a: TextFacts, b: TextFacts) -> str | None:
    """Why these two texts can never be the same question, or ``None``."""
    if a.numbers and b.numbers and a.numbers != b.numbers:
        return "numbers"
    if a.negated != b.negated:
        return "negation"
    return None


def features(cosine: float, a: TextFacts, b: TextFacts) -> list[float]:
    """The model's inputs for one (query, candidate) pair, in ``FEATURES`` order."""
    number_one_side = float(bool(a.numbers) != bool(b.numbers))
    names_union = a.names | b.names
    names_unmatched = len(a.names ^ b.names) / len(names_union) if names_union else 0.0
    union = a.content | b.content
    jaccard = len(a.content & b.content) / len(union) if union else 1.0
    la, lb = len(a.content), len(b.content)
    length_ratio = min(la, lb) / max(la, lb) if max(la, lb) else 1.0
    diff = len(a.content ^ b.content)
    bigrams = a.bigrams | b.bigrams
    bigram_jaccard = len(a.bigrams & b.bigrams) / len(bigrams) if bigrams else 1.0
    return [
        1.0,
        cosine,
        cosine * cosine,
        number_one_side,
        names_unmatched,
        jaccard,
        cosine * jaccard,
        length_ratio,
        float(a.qtype != b.qtype),
        float(diff == 0),
        min(diff, 4) / 4,
        bigram_jaccard,
        cosine * bigram_jaccard,
    ]


@dataclass(frozen=True, slots=True)
class Match:
    hit: bool
    neighbour: Neighbour | None
    probability: float
    """The model's probability that the best neighbour is the same question (0 when vetoed)."""
    reason: str
    """``hit``, ``empty``, ``below_floor``, ``ambiguous``, ``below_threshold`` or a veto name."""
    margin: float = 0.0
    """How much more probable the chosen neighbour is than the best other distinct one."""


DEFAULT_PARAMS: dict[str, Any] = {
    # ``atajo cache calibrate --pairs qqp_dev.jsonl --target-error 0.02`` (fit split 30 %, calibration
    # split 30 %). QQP's labels put a ceiling on precision (pairs at cosine >= 0.99 are 93 % duplicates),
    # so a 2 % target calibrates to a very strict threshold; configs choose their own trade-off.
    "weights": [
        -4.365903,
        2.351737,
        4.123813,
        0.345324,
        -0.385418,
        -1.081094,
        0.627277,
        -0.242834,
        -0.031308,
        1.036294,
        0.8163,
        -1.058308,
        0.389592,
    ],
    "threshold": 0.910989,
}


def _default_weights() -> list[float]:
    return list(DEFAULT_PARAMS["weights"])


@dataclass(slots=True)
class Decider:
    """The match decision with its fitted parameters. ``decide`` is what serving and evaluation call."""

    weights: list[float] = field(default_factory=_default_weights)
    threshold: float = DEFAULT_PARAMS["threshold"]
    """Minimum model probability for a hit (calibrated to ``target_error``)."""
    cosine_floor: float = COSINE_FLOOR
    """Below this cosine nothing is considered (saves the feature work on clear misses)."""
    min_margin: float = MIN_MARGIN
    """The chosen neighbour's probability must beat every other distinct candidate's by this much."""
    rerank_window: float = RERANK_WINDOW
    """Neighbours within this cosine of the best are candidates (and rivals)."""
    target_error: float = 0.02
    feature_names: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        if tuple(self.feature_names) != FEATURES:
            raise ValueError(
                f"parameters were fitted for features {list(self.feature_names)}, this code has {FEATURES}"
            )
        if len(self.weights) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} weights, got {len(self.weights)}")

    def probability(self, cosine: float, query: TextFacts, stored: TextFacts) -> float:
        z = sum(w * x for w, x in zip(self.weights, features(cosine, query, stored), strict=True))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def score(self, query: str, candidate: str, cosine: float) -> tuple[float, str | None]:
        """(probability, veto reason) for one pair; the probability is 0 when vetoed."""
        a, b = TextFacts.of(query), TextFacts.of(candidate)
        reason = veto(a, b)
        if reason is not None:
            return 0.0, reason
        return self.probability(cosine, a, b), None

    def decide(self, query: str, neighbours: Sequence[Neighbour]) -> Match:
        """Whether one of ``neighbours`` (best first, as the index returns them) answers ``query``.

        The candidates within ``rerank_window`` cosine of the best are scored by the model and the most
        probable one is chosen (lexical evidence breaks near-ties that cosine cannot); it must then beat
        every other distinct candidate by ``min_margin`` in probability, or the match is ambiguous.
        """
        if not neighbours:
            return Match(False, None, 0.0, "empty")
        top = neighbours[0].score
        if top < self.cosine_floor:
            return Match(False, neighbours[0], 0.0, "below_floor")
        facts = TextFacts.of(query)
        scored: list[tuple[float, Neighbour, str | None]] = []
        for n in neighbours:
            if n.score < self.cosine_floor or n.score < top - self.rerank_window:
                break
            stored = TextFacts.of(n.text)
            reason = veto(facts, stored)
            scored.append((0.0 if reason else self.probability(n.score, facts, stored), n, reason))
        best_p, best, reason = max(scored, key=lambda c: (c[0], c[1].score))
        if best_p == 0.0 and reason is not None:
            return Match(False, best, 0.0, reason)
        text = best.text.strip().lower()
        rival = max((p for p, n, _ in scored if n.text.strip().lower() != text), default=0.0)
        margin = best_p - rival
        if margin < self.min_margin:
            return Match(False, best, best_p, "ambiguous", margin)
        if best_p < self.threshold:
            return Match(False, best, best_p, "below_threshold", margin)
        return Match(True, best, best_p, "hit", margin)

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.feature_names),
            "weights": [round(w, 6) for w in self.weights],
            "threshold": round(self.threshold, 6),
            "cosine_floor": self.cosine_floor,
            "min_margin": self.min_margin,
            "rerank_window": self.rerank_window,
            "target_error": self.target_error,
        }

    @classmethod
    def default(cls) -> Decider:
        """The shipped parameters (``DEFAULT_PARAMS``)."""
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decider:
        return cls(
            weights=[float(w) for w in data["weights"]],
            threshold=float(data["threshold"]),
            cosine_floor=float(data.get("cosine_floor", COSINE_FLOOR)),
            min_margin=float(data.get("min_margin", MIN_MARGIN)),
            rerank_window=float(data.get("rerank_window", RERANK_WINDOW)),
            target_error=float(data.get("target_error", 0.02)),
            feature_names=tuple(data.get("features", FEATURES)),
        )


# --- fitting and calibration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelledPair:
    query: str
    stored: str
    cosine: float
    same: bool


def design_matrix(pairs: Sequence[LabelledPair]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Features of the pairs that pass the vetoes and the floor, and which rows those are."""
    rows: list[list[float]] = []
    kept = np.zeros(len(pairs), dtype=bool)
    for i, p in enumerate(pairs):
        a, b = TextFacts.of(p.query), TextFacts.of(p.stored)
        if veto(a, b) is None:
            rows.append(features(p.cosine, a, b))
            kept[i] = True
    return np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES)), kept


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], l2: float = 1e-3, iterations: int = 50
) -> npt.NDArray[np.float64]:
    """L2-regularised logistic regression by Newton's method (IRLS); the bias (column 0) is not penalised."""
    n, d = x.shape
    w = np.zeros(d)
    penalty = np.full(d, l2 * n)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -60, 60)))
        gradient = x.T @ (p - y) + penalty * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(d)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return w


def calibrate_threshold(probabilities: Sequence[float], same: Sequence[bool], target_error: float) -> float:
    """The lowest probability threshold whose hits are wrong at most ``target_error`` of the time.

    Scans thresholds from the top: the hit set grows, and the last point where the wrong share of hits is
    still within target wins. Returns 1.0 (never hit) when no threshold meets it.
    """
    order = np.argsort(-np.asarray(probabilities, dtype=np.float64), kind="stable")
    probs = np.asarray(probabilities, dtype=np.float64)[order]
    wrong = np.cumsum(~np.asarray(same, dtype=bool)[order])
    hits = np.arange(1, len(order) + 1)
    ok = wrong / hits <= target_error
    # Only cut between distinct probability values.
    distinct = np.append(probs[1:] < probs[:-1], True)
    ok &= distinct
    if not ok.any():
        return 1.0
    last = int(np.flatnonzero(ok)[-1])
    return float(probs[last])


def fit(
    fit_pairs: Sequence[LabelledPair],
    calibration_pairs: Sequence[LabelledPair],
    target_error: float = 0.02,
    cosine_floor: float = COSINE_FLOOR,
    min_margin: float = MIN_MARGIN,
    rerank_window: float = RERANK_WINDOW,
) -> Decider:
    """Fit the model's weights on ``fit_pairs``, then calibrate its threshold to ``target_error`` on
    ``calibration_pairs`` (disjoint from the first: a threshold set on the fitting data promises a lower
    error than new data shows)."""
    floor = cosine_floor
    usable = [p for p in fit_pairs if p.cosine >= floor]
    x, kept = design_matrix(usable)
    y = np.array([p.same for p, k in zip(usable, kept, strict=True) if k], dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("fitting needs both same and different pairs above the cosine floor")
    weights = fit_logistic(x, y)
    decider = Decider(
        weights=[float(w) for w in weights],
        target_error=target_error,
        cosine_floor=cosine_floor,
        min_margin=min_margin,
        rerank_window=rerank_window,
    )
    probabilities, labels = [], []
    for p in calibration_pairs:
        if p.cosine < floor:
            continue
        probability, reason = decider.score(p.query, p.stored, p.cosine)
        if reason is None:
            probabilities.append(probability)
            labels.append(p.same)
    decider.threshold = calibrate_threshold(probabilities, labels, target_error)
    return decider
