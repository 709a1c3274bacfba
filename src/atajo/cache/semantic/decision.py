"""The match decision: is a stored question the same question as the one asked?

One cosine threshold cannot be both precise and useful: near-identical wording can ask something else
("... in 2019?" / "... in 2020?", "Is X safe?" / "Is X not safe?"), true paraphrases can score lower
than unrelated questions on the same topic, and a store often holds near-duplicates of one another, so
the nearest entry is not always the one meant. The decision, for a query and its nearest neighbours:

1. considers the neighbours at or above ``cosine_floor``;
2. ranks them by ``cosine + rerank_weight * trigram`` (the character-trigram cosine of the two texts:
   wording breaks the near-ties of meaning that the embedding cannot);
3. hard vetoes, where a difference always changes the answer: different numbers (when both texts carry
   numbers) and a negation present in one but not the other;
4. an ambiguity rule: when the best-ranked entry beats the best other distinct stored text by less than
   ``min_gap`` in that ranking score, the cache cannot tell which one was meant and does not answer;
5. a pair model's probability that the two texts ask the same thing, against a threshold calibrated on
   held-out labelled pairs to a target share of wrong hits (default 2 %). The model is a small neural
   network (one hidden layer, numpy only) over SBERT-style pair features of the two embedding vectors,
   ``|u - v|`` and ``u * v``, plus lexical features (``FEATURES``: cosine, numbers in one text only,
   unmatched name-like tokens, content-word and ordered-bigram overlap, length ratio, question type,
   character-trigram cosine, references to unseen context such as "this video" or "the following code",
   and swapped word order). When the caller has no vectors, a logistic model over the lexical features
   alone decides, with its own calibrated threshold.

The fitted weights live in an ``.npz`` file (``decision.npz`` beside this module is the shipped one;
``scripts/fit_semantic_decision.py`` regenerates it). ``Decider.to_dict`` / ``from_dict`` give a small
JSON/YAML-able dict (the weights file, thresholds and rule parameters), so what ``atajo cache calibrate``
fits can live in the config, and serving and evaluation run the same code.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from atajo.cache.semantic.index import Neighbour, Vector

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?(?:[.,][0-9]+)*")
_NUMBER = re.compile(r"^[0-9]+(?:[.,][0-9]+)*$")
_SPACE = re.compile(r"\s+")
_DEIXIS = re.compile(r"\b(?:this|these|following|below|above|attached)\b", re.IGNORECASE)
"""Words that point at context the text does not carry ("this video", "the following code")."""


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


def text_words(text: str) -> list[str]:
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
    trigrams: Counter[str]
    """Character trigrams of the lower-cased text, with counts."""
    trigram_norm: float
    deictic: bool
    """The text points at context it does not carry ("this photo", "the code below")."""

    @classmethod
    def of(cls, text: str) -> TextFacts:
        words = text_words(text)
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
        padded = " " + _SPACE.sub(" ", text.lower()).strip() + " "
        trigrams = Counter(padded[i : i + 3] for i in range(len(padded) - 2))
        return cls(
            numbers,
            negated,
            qtype,
            names,
            frozenset(stems),
            frozenset(itertools.pairwise(stems)),
            trigrams,
            math.sqrt(sum(c * c for c in trigrams.values())),
            _DEIXIS.search(text) is not None,
        )


def trigram_cosine(a: TextFacts, b: TextFacts) -> float:
    """Cosine of the two texts' character-trigram counts (1.0 for two empty texts)."""
    if not a.trigram_norm or not b.trigram_norm:
        return 1.0 if a.trigram_norm == b.trigram_norm else 0.0
    small, large = (a.trigrams, b.trigrams) if len(a.trigrams) <= len(b.trigrams) else (b.trigrams, a.trigrams)
    dot = sum(count * large.get(gram, 0) for gram, count in small.items())
    return dot / (a.trigram_norm * b.trigram_norm)


COSINE_FLOOR = 0.7
MIN_GAP = 0.03
RERANK_WEIGHT = 0.2
TARGET_ERROR = 0.02
SHIPPED_MODEL = Path(__file__).with_name("decision.npz")

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
    "trigram",
    "cosine_x_trigram",
    "deictic_both",
    "deictic_one_side",
    "order_swap",
)


def veto(a: TextFacts, b: TextFacts) -> str | None:
    """Why these two texts can never be the same question, or ``None``."""
    if a.numbers and b.numbers and a.numbers != b.numbers:
        return "numbers"
    if a.negated != b.negated:
        return "negation"
    return None


def features(cosine: float, a: TextFacts, b: TextFacts, trigram: float | None = None) -> list[float]:
    """The lexical inputs for one (query, candidate) pair, in ``FEATURES`` order."""
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
    tri = trigram_cosine(a, b) if trigram is None else trigram
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
        tri,
        cosine * tri,
        float(a.deictic and b.deictic),
        float(a.deictic != b.deictic),
        float(diff == 0 and a.bigrams != b.bigrams),
    ]


Array = npt.NDArray[np.float64]


def pair_inputs(lexical: Sequence[float], u: npt.ArrayLike, v: npt.ArrayLike) -> Array:
    """The network's input for one pair: the lexical features (without the bias), ``|u - v|`` and ``u * v``."""
    a = np.asarray(u, dtype=np.float64).reshape(-1)
    b = np.asarray(v, dtype=np.float64).reshape(-1)
    return np.concatenate([np.asarray(lexical[1:], dtype=np.float64), np.abs(a - b), a * b])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclass(frozen=True, slots=True, eq=False)
class PairModel:
    """The fitted pair models: a one-hidden-layer network over ``pair_inputs`` and a lexical logistic
    fallback over ``features``. ``defaults`` carries the decision parameters calibrated with them."""

    lexical: Array
    """Logistic weights over ``FEATURES``."""
    mean: Array
    scale: Array
    w1: Array
    b1: Array
    w2: Array
    b2: float
    defaults: dict[str, float]
    feature_names: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        if tuple(self.feature_names) != FEATURES:
            raise ValueError(
                f"parameters were fitted for features {list(self.feature_names)}, this code has {FEATURES}"
            )
        if self.lexical.shape != (len(FEATURES),):
            raise ValueError(f"expected {len(FEATURES)} lexical weights, got {self.lexical.shape}")
        if self.w1.shape != (self.mean.shape[0], self.b1.shape[0]) or self.w2.shape != self.b1.shape:
            raise ValueError("inconsistent network shapes")

    @property
    def dimension(self) -> int:
        """The embedding size the network was fitted on (its input is the lexical features, |u - v|, u * v)."""
        return int(self.mean.shape[0] - (len(FEATURES) - 1)) // 2

    def lexical_probability(self, lexical: Sequence[float]) -> float:
        return _sigmoid(float(np.dot(self.lexical, np.asarray(lexical, dtype=np.float64))))

    def probability(self, lexical: Sequence[float], u: npt.ArrayLike, v: npt.ArrayLike) -> float:
        x = (pair_inputs(lexical, u, v) - self.mean) / self.scale
        hidden = np.maximum(x @ self.w1 + self.b1, 0.0)
        return _sigmoid(float(hidden @ self.w2) + self.b2)

    def probabilities(self, inputs: Array) -> Array:
        """``probability`` for many rows of ``pair_inputs`` at once (fitting and evaluation)."""
        hidden = np.maximum(((inputs - self.mean) / self.scale) @ self.w1 + self.b1, 0.0)
        result: Array = 1.0 / (1.0 + np.exp(-np.clip(hidden @ self.w2 + self.b2, -60, 60)))
        return result

    def save(self, path: str | Path, **defaults: float) -> None:
        """Write the weights (and the decision parameters, ``defaults`` overriding) to an ``.npz`` file."""
        meta = {"features": list(self.feature_names), "defaults": self.defaults | defaults}
        with open(path, "wb") as f:  # np.savez on a path would append ".npz" to other suffixes
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                lexical=self.lexical,
                mean=self.mean,
                scale=self.scale,
                w1=self.w1.astype(np.float32),
                b1=self.b1,
                w2=self.w2,
                b2=np.array(self.b2),
            )

    @classmethod
    def load(cls, path: str | Path) -> PairModel:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return cls(
                lexical=data["lexical"].astype(np.float64),
                mean=data["mean"].astype(np.float64),
                scale=data["scale"].astype(np.float64),
                w1=data["w1"].astype(np.float64),
                b1=data["b1"].astype(np.float64),
                w2=data["w2"].astype(np.float64),
                b2=float(data["b2"]),
                defaults={k: float(v) for k, v in meta.get("defaults", {}).items()},
                feature_names=tuple(meta["features"]),
            )


@functools.lru_cache(maxsize=8)
def load_model(path: str) -> PairModel:
    """A weights file, loaded once per path."""
    return PairModel.load(path)


@dataclass(frozen=True, slots=True)
class Match:
    hit: bool
    neighbour: Neighbour | None
    probability: float
    """The pair model's probability that the chosen neighbour is the same question (0 when vetoed)."""
    reason: str
    """``hit``, ``empty``, ``below_floor``, ``ambiguous``, ``below_threshold`` or a veto name."""
    margin: float = 0.0
    """How far the chosen neighbour's ranking score is ahead of the best other distinct candidate's."""
    vectors: bool = False
    """Whether the vector model decided (else the lexical fallback)."""


_UNSET = -1.0


@dataclass(slots=True)
class Decider:
    """The match decision with its fitted parameters. ``decide`` is what serving and evaluation call.

    Thresholds and rule parameters left unset come from the weights file's calibrated defaults.
    """

    model_file: str | None = None
    """The weights file; ``None`` for the shipped ``decision.npz``."""
    threshold: float = _UNSET
    """Minimum network probability for a hit (calibrated to ``target_error``)."""
    lexical_threshold: float = _UNSET
    """Minimum probability of the lexical fallback (used when the vectors are not given)."""
    cosine_floor: float = COSINE_FLOOR
    """Neighbours below this cosine are not considered."""
    min_gap: float = _UNSET
    """The chosen neighbour's ranking score must beat every other distinct candidate's by this much."""
    rerank_weight: float = _UNSET
    """Ranking score = cosine + ``rerank_weight`` * character-trigram cosine."""
    target_error: float = _UNSET
    model: PairModel = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if cast("PairModel | None", self.model) is None:
            self.model = load_model(str(Path(self.model_file) if self.model_file else SHIPPED_MODEL))
        defaults = self.model.defaults
        for name, fallback in (
            ("threshold", 0.5),
            ("lexical_threshold", 0.5),
            ("min_gap", MIN_GAP),
            ("rerank_weight", RERANK_WEIGHT),
            ("target_error", TARGET_ERROR),
        ):
            if getattr(self, name) == _UNSET:
                setattr(self, name, float(defaults.get(name, fallback)))

    def probability(
        self, cosine: float, query: TextFacts, stored: TextFacts, u: Vector | None = None, v: Vector | None = None
    ) -> float:
        """The pair model's probability: the network when both vectors are given, else the lexical model."""
        lexical = features(cosine, query, stored)
        if u is not None and v is not None:
            return self.model.probability(lexical, u, v)
        return self.model.lexical_probability(lexical)

    def score(
        self, query: str, candidate: str, cosine: float, u: Vector | None = None, v: Vector | None = None
    ) -> tuple[float, str | None]:
        """(probability, veto reason) for one pair; the probability is 0 when vetoed."""
        a, b = TextFacts.of(query), TextFacts.of(candidate)
        reason = veto(a, b)
        if reason is not None:
            return 0.0, reason
        return self.probability(cosine, a, b, u, v), None

    def decide(self, query: str, neighbours: Sequence[Neighbour], query_vector: Vector | None = None) -> Match:
        """Whether one of ``neighbours`` (best first, as the index returns them) answers ``query``.

        With ``query_vector`` (the query's embedding) and the neighbours' ``vector``, the network decides;
        without them, the lexical fallback and its own threshold.
        """
        if not neighbours:
            return Match(False, None, 0.0, "empty")
        if neighbours[0].score < self.cosine_floor:
            return Match(False, neighbours[0], 0.0, "below_floor")
        facts = TextFacts.of(query)
        ranked: list[tuple[float, Neighbour, TextFacts]] = []
        for n in neighbours:
            if n.score < self.cosine_floor:
                break
            stored = TextFacts.of(n.text)
            ranked.append((n.score + self.rerank_weight * trigram_cosine(facts, stored), n, stored))
        best_score, best, stored = max(ranked, key=lambda c: c[0])
        reason = veto(facts, stored)
        if reason is not None:
            return Match(False, best, 0.0, reason)
        text = best.text.strip().lower()
        rival = max((s for s, n, _ in ranked if n.text.strip().lower() != text), default=None)
        margin = 1.0 if rival is None else best_score - rival
        # The network only knows the embedding it was fitted on; vectors of another size (another model) get
        # the lexical fallback.
        vectors = query_vector is not None and best.vector is not None and len(query_vector) == self.model.dimension
        probability = self.probability(
            best.score, facts, stored, query_vector if vectors else None, best.vector if vectors else None
        )
        if margin < self.min_gap:
            return Match(False, best, probability, "ambiguous", margin, vectors)
        if probability < (self.threshold if vectors else self.lexical_threshold):
            return Match(False, best, probability, "below_threshold", margin, vectors)
        return Match(True, best, probability, "hit", margin, vectors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_file or "default",
            "threshold": round(self.threshold, 6),
            "lexical_threshold": round(self.lexical_threshold, 6),
            "cosine_floor": self.cosine_floor,
            "min_gap": self.min_gap,
            "rerank_weight": self.rerank_weight,
            "target_error": self.target_error,
        }

    @classmethod
    def default(cls) -> Decider:
        """The shipped weights (``decision.npz``) with the parameters calibrated with them."""
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: str | Path | None = None) -> Decider:
        """Parameters as ``to_dict`` writes them; a relative ``model`` path is taken from ``base`` (the
        config file's directory) when given."""
        if "weights" in data:
            raise ValueError("these decision parameters predate the weights file; run atajo cache calibrate again")
        unknown = sorted(set(data) - DECISION_KEYS)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(DECISION_KEYS))}")
        model = str(data.get("model", "default"))
        if model != "default" and base is not None and not Path(model).is_absolute():
            model = str(Path(base) / model)

        def number(key: str) -> float:
            return float(data[key]) if key in data else _UNSET

        return cls(
            model_file=None if model == "default" else model,
            threshold=number("threshold"),
            lexical_threshold=number("lexical_threshold"),
            cosine_floor=float(data.get("cosine_floor", COSINE_FLOOR)),
            min_gap=number("min_gap"),
            rerank_weight=number("rerank_weight"),
            target_error=number("target_error"),
        )


DECISION_KEYS = frozenset(
    {"model", "threshold", "lexical_threshold", "cosine_floor", "min_gap", "rerank_weight", "target_error"}
)
"""What ``to_dict`` writes and ``from_dict`` reads (a config's ``cache.semantic.decision``)."""


# --- fitting and calibration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class LabelledPair:
    query: str
    stored: str
    cosine: float
    same: bool
    query_vector: Vector | None = None
    stored_vector: Vector | None = None


def design_matrix(pairs: Sequence[LabelledPair]) -> tuple[Array, npt.NDArray[np.bool_]]:
    """Lexical features of the pairs that pass the vetoes, and which rows those are."""
    rows: list[list[float]] = []
    kept = np.zeros(len(pairs), dtype=bool)
    for i, p in enumerate(pairs):
        a, b = TextFacts.of(p.query), TextFacts.of(p.stored)
        if veto(a, b) is None:
            rows.append(features(p.cosine, a, b))
            kept[i] = True
    return np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES)), kept


SMALL_DATA = 5000
"""Below this many usable pairs the network gets ``SMALL_HIDDEN`` units, else ``LARGE_HIDDEN``."""
SMALL_HIDDEN = 16
LARGE_HIDDEN = 64


def fit_logistic(x: Array, y: Array, l2: float = 1e-3, iterations: int = 50) -> Array:
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


def fit_network(
    x: Array,
    y: Array,
    hidden: int = LARGE_HIDDEN,
    epochs: int = 100,
    l2: float = 3e-2,
    dropout: float = 0.3,
    learning_rate: float = 1e-3,
    batch: int = 128,
    seed: int = 0,
) -> tuple[Array, Array, Array, Array, Array, float]:
    """One hidden ReLU layer, trained with Adam on the log loss (input dropout, weight decay).

    A tenth of the rows (chosen by ``seed``) is held out to pick the epoch with the lowest log loss.
    Returns ``(mean, scale, w1, b1, w2, b2)``; deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    held = order[: max(1, len(y) // 10)]
    train = order[len(held) :] if len(y) > 10 else order
    mean = x[train].mean(axis=0)
    scale = x[train].std(axis=0) + 1e-6
    z = (x - mean) / scale
    d = x.shape[1]
    params = [
        rng.normal(0.0, math.sqrt(2.0 / d), (d, hidden)),
        np.zeros(hidden),
        rng.normal(0.0, math.sqrt(1.0 / hidden), hidden),
        np.zeros(1),
    ]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    step = 0
    best: tuple[float, list[Array]] = (math.inf, [p.copy() for p in params])

    def forward(inputs: Array, w1: Array, b1: Array, w2: Array, b2: Array) -> tuple[Array, Array]:
        h = np.maximum(inputs @ w1 + b1, 0.0)
        return h, 1.0 / (1.0 + np.exp(-np.clip(h @ w2 + b2[0], -30, 30)))

    for _ in range(epochs):
        shuffled = rng.permutation(train)
        for start in range(0, len(shuffled), batch):
            idx = shuffled[start : start + batch]
            inputs = z[idx]
            if dropout:
                inputs = inputs * (rng.random(inputs.shape) > dropout) / (1.0 - dropout)
            h, p = forward(inputs, *params)
            g = (p - y[idx]) / len(idx)
            gh = np.outer(g, params[2]) * (h > 0)
            grads = [inputs.T @ gh + l2 * params[0], gh.sum(axis=0), h.T @ g + l2 * params[2], np.array([g.sum()])]
            step += 1
            for i, grad in enumerate(grads):
                moments[i] = 0.9 * moments[i] + 0.1 * grad
                squares[i] = 0.999 * squares[i] + 0.001 * grad * grad
                params[i] -= (
                    learning_rate * (moments[i] / (1 - 0.9**step)) / (np.sqrt(squares[i] / (1 - 0.999**step)) + 1e-8)
                )
        _, p = forward(z[held], *params)
        loss = float(-np.mean(y[held] * np.log(p + 1e-9) + (1 - y[held]) * np.log(1 - p + 1e-9)))
        if loss < best[0]:
            best = (loss, [q.copy() for q in params])
    w1, b1, w2, b2 = best[1]
    return mean, scale, w1, b1, w2, float(b2[0])


def hidden_units(pairs: int) -> int:
    """The network's width for a training set of ``pairs`` rows. Chosen by 5-fold cross-validation inside
    GPTCache's fit split (~1,000 pairs from ~290 paraphrases): 16 units ranked its out-of-fold probabilities
    as well as 64 (AUC 0.960 / 0.955) with a quarter of the weights; larger sets of pairs (a user's
    labelled traffic) support the wider layer."""
    return SMALL_HIDDEN if pairs < SMALL_DATA else LARGE_HIDDEN


def fit_model(pairs: Sequence[LabelledPair], cosine_floor: float = COSINE_FLOOR, seed: int = 0) -> PairModel:
    """Fit both pair models on labelled pairs (those above the floor that pass the vetoes). The network
    needs every pair's two vectors; without them it is left untrained (always 0.5)."""
    usable = [p for p in pairs if p.cosine >= cosine_floor]
    x, kept = design_matrix(usable)
    kept_pairs = [p for p, k in zip(usable, kept, strict=True) if k]
    y = np.array([p.same for p in kept_pairs], dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("fitting needs both same and different pairs above the cosine floor")
    lexical = fit_logistic(x, y)
    vectors = [(p.query_vector, p.stored_vector) for p in kept_pairs]
    dimension = next((len(u) for u, _ in vectors if u is not None), 0)
    complete = [(u, v) for u, v in vectors if u is not None and v is not None]
    if dimension and len(complete) == len(vectors):
        inputs = np.stack([pair_inputs(row, u, v) for row, (u, v) in zip(x, complete, strict=True)])
        mean, scale, w1, b1, w2, b2 = fit_network(inputs, y, hidden=hidden_units(len(y)), seed=seed)
    else:
        width = len(FEATURES) - 1 + 2 * max(dimension, 1)
        mean, scale = np.zeros(width), np.ones(width)
        w1, b1, w2, b2 = np.zeros((width, 1)), np.zeros(1), np.zeros(1), 0.0
    return PairModel(lexical, mean, scale, w1, b1, w2, b2, defaults={})


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


@dataclass(frozen=True, slots=True, eq=False)
class Case:
    """One labelled lookup for calibration: the query, its neighbours best first, and how to judge a hit."""

    query: str
    neighbours: Sequence[Neighbour]
    query_vector: Vector | None
    same: bool
    """For pairs of texts: the label. Ignored when ``right_text`` is given."""
    right_text: str | None = None
    """For a store of many entries: the stored text that is the right answer."""

    def right(self, chosen: Neighbour) -> bool:
        return chosen.text == self.right_text if self.right_text is not None else self.same


def calibrate_thresholds(decider: Decider, cases: Sequence[Case], target_error: float) -> Decider:
    """Set ``decider``'s two thresholds to ``target_error`` on ``cases``, deciding each the way serving
    does (vetoes, floor and ambiguity held; only the threshold moves), with and without the vectors."""
    with_vectors: tuple[list[float], list[bool]] = ([], [])
    lexical: tuple[list[float], list[bool]] = ([], [])
    for case in cases:
        for collected, vector in ((with_vectors, case.query_vector), (lexical, None)):
            match = decider.decide(case.query, case.neighbours, vector)
            if match.reason in ("hit", "below_threshold") and match.neighbour is not None:
                collected[0].append(match.probability)
                collected[1].append(case.right(match.neighbour))
    decider.threshold = calibrate_threshold(*with_vectors, target_error)
    decider.lexical_threshold = calibrate_threshold(*lexical, target_error)
    decider.target_error = target_error
    return decider


def fit(
    fit_pairs: Sequence[LabelledPair],
    calibration_pairs: Sequence[LabelledPair],
    target_error: float = TARGET_ERROR,
    cosine_floor: float = COSINE_FLOOR,
) -> Decider:
    """Fit the pair models on ``fit_pairs``, then calibrate both thresholds to ``target_error`` on
    ``calibration_pairs`` (disjoint from the first: a threshold set on the fitting data promises a lower
    error than new data shows). Each calibration pair is decided as a lookup with one neighbour."""
    model = fit_model(fit_pairs, cosine_floor)
    decider = Decider(model=model, threshold=0.0, lexical_threshold=0.0, cosine_floor=cosine_floor)
    cases = [
        Case(p.query, [Neighbour("stored", p.stored, p.cosine, p.stored_vector)], p.query_vector, p.same)
        for p in calibration_pairs
    ]
    return calibrate_thresholds(decider, cases, target_error)
