"""Measure the semantic cache's match decision on labelled pairs, and calibrate it.

Two formats of JSON lines are read:

- ``{origin, similar}``: every ``origin`` is stored in one index partition, every ``similar`` is asked; a
  hit is correct when the entry found holds the pair's origin text (origins that occur twice are stored
  once per occurrence, so either copy counts). Recall is correct hits over pairs.
- ``{text_a, text_b, duplicate}``: each pair gets its own partition holding ``text_a``; ``text_b`` is asked;
  a hit on a duplicate pair is correct, a hit on a non-duplicate is a wrong answer served. Recall is hits
  on duplicate pairs over duplicate pairs.

Both run the serving code: ``VectorIndex.search`` then ``Decider.decide`` with the query's vector. Pairs are
split deterministically by a hash of their texts into ``fit`` (30 %), ``calibrate`` (30 %) and ``test``
(40 %), so calibration never sees the pairs its result is judged on. A hit is judged on the neighbour the
decision chose (which need not be the nearest by cosine).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from atajo.cache.semantic.decision import (
    COSINE_FLOOR,
    Case,
    Decider,
    LabelledPair,
    Match,
    TextFacts,
    calibrate_thresholds,
    fit_model,
    text_words,
)
from atajo.cache.semantic.embedder import Vectors
from atajo.cache.semantic.index import Neighbour, VectorIndex

Split = Literal["all", "fit", "calibrate", "test"]
EmbedFn = Callable[[Sequence[str]], Vectors]
Progress = Callable[[int, str], AbstractContextManager[Any]]
"""``progress(length, label)`` returns a context manager whose value has ``update(n)`` (click.progressbar)."""


@dataclass(frozen=True, slots=True)
class Pair:
    stored: str
    asked: str
    same: bool
    """For ``{origin, similar}`` pairs always true; for QQP the ``duplicate`` label."""


@dataclass(frozen=True, slots=True)
class Pairs:
    kind: Literal["origin", "duplicate"]
    pairs: list[Pair]


def split_of(pair: Pair) -> Split:
    """The pair's fixed split, from a hash of its texts (stable across runs, machines and file orders)."""
    digest = hashlib.sha256(f"{pair.stored}\x1f{pair.asked}".encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 10
    return "fit" if bucket < 3 else "calibrate" if bucket < 6 else "test"


def load_pairs(path: str | Path, split: Split = "all", limit: int | None = None) -> Pairs:
    """Read a pairs file in either format; keep one split; keep at most ``limit`` pairs, chosen by hash."""
    kind: Literal["origin", "duplicate"] | None = None
    pairs: list[Pair] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "origin" in row and "similar" in row:
                row_kind: Literal["origin", "duplicate"] = "origin"
                pair = Pair(str(row["origin"]), str(row["similar"]), True)
            elif "text_a" in row and "text_b" in row and "duplicate" in row:
                row_kind = "duplicate"
                pair = Pair(str(row["text_a"]), str(row["text_b"]), bool(row["duplicate"]))
            else:
                raise ValueError(f"{path}:{number}: expected {{origin, similar}} or {{text_a, text_b, duplicate}}")
            if kind is not None and row_kind != kind:
                raise ValueError(f"{path}:{number}: mixes the two pair formats")
            kind = row_kind
            pairs.append(pair)
    if kind is None:
        raise ValueError(f"{path}: no pairs")
    if split != "all":
        pairs = [p for p in pairs if split_of(p) == split]
    if limit is not None and len(pairs) > limit:
        ranked = sorted(pairs, key=lambda p: hashlib.sha256(f"{p.stored}\x1e{p.asked}".encode()).digest())
        keep = set(map(id, ranked[:limit]))
        pairs = [p for p in pairs if id(p) in keep]
    return Pairs(kind, pairs)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One asked text: what the index found and what the decision said."""

    pair: Pair
    neighbours: tuple[Neighbour, ...]
    hit: bool
    reason: str
    probability: float
    found_right: bool
    """The chosen neighbour (else the nearest) is the right entry (origin format) / the pair is a duplicate
    (duplicate format)."""
    query_vector: Vectors | None = field(default=None, compare=False, repr=False)


def _no_progress(length: int, label: str) -> AbstractContextManager[Any]:
    class _Bar:
        def update(self, n: int) -> None:
            pass

    return nullcontext(_Bar())


def embed_all(texts: Iterable[str], embed: EmbedFn, progress: Progress = _no_progress) -> dict[str, Vectors]:
    """Unique texts → vectors, in batches, with progress."""
    unique = list(dict.fromkeys(texts))
    vectors: dict[str, Vectors] = {}
    batch = 64
    with progress(len(unique), "embedding") as bar:
        for start in range(0, len(unique), batch):
            chunk = unique[start : start + batch]
            for text, vector in zip(chunk, embed(chunk), strict=True):
                vectors[text] = vector
            bar.update(len(chunk))
    return vectors


def run(
    pairs: Pairs,
    embed: EmbedFn,
    decider: Decider | None,
    progress: Progress = _no_progress,
    k: int = 4,
    *,
    open_set: bool = False,
) -> list[Outcome]:
    """Store and ask as the format says, deciding every asked text with ``decider`` (``None``: only collect
    the neighbours; nothing hits).

    ``open_set`` (origin format): each paraphrase is asked with its own origin hidden from the index, as most
    questions in real traffic have no stored twin; every hit is then a wrong answer served."""
    if open_set and pairs.kind != "origin":
        raise ValueError("open-set evaluation needs an {origin, similar} file")
    vectors = embed_all([t for p in pairs.pairs for t in (p.stored, p.asked)], embed, progress)
    dimension = len(next(iter(vectors.values()))) if vectors else 384  # the model's, local or a provider's
    index = VectorIndex(dimension=dimension, max_entries=max(1, 2 * len(pairs.pairs)))
    outcomes: list[Outcome] = []
    if pairs.kind == "origin":
        for i, p in enumerate(pairs.pairs):
            index.add("all", f"origin/{i}", vectors[p.stored], p.stored)
    with progress(len(pairs.pairs), "deciding") as bar:
        for i, p in enumerate(pairs.pairs):
            partition = "all"
            if pairs.kind == "duplicate":
                partition = f"pair/{i}"
                index.add(partition, f"pair/{i}", vectors[p.stored], p.stored)
            query_vector = vectors[p.asked]
            if open_set:  # the origin (stored twice when it occurs twice) and nothing else is hidden
                found = index.search(partition, query_vector, k=k + 2)
                neighbours = [n for n in found if n.text != p.stored][:k]
            else:
                neighbours = index.search(partition, query_vector, k=k)
            match = (
                decider.decide(p.asked, neighbours, query_vector) if decider else Match(False, None, 0.0, "collected")
            )
            if pairs.kind == "duplicate":
                index.delete(f"pair/{i}")
                right = p.same
            else:
                chosen = match.neighbour or (neighbours[0] if neighbours else None)
                right = not open_set and chosen is not None and chosen.text == p.stored
            outcomes.append(
                Outcome(p, tuple(neighbours), match.hit, match.reason, match.probability, right, query_vector)
            )
            bar.update(1)
    return outcomes


def summarize(kind: str, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The figures: hits, correct and wrong hits, precision, recall, and why misses missed."""
    hits = sum(o.hit for o in outcomes)
    correct = sum(o.hit and o.found_right for o in outcomes)
    positives = len(outcomes) if kind == "origin" else sum(o.pair.same for o in outcomes)
    return {
        "format": kind,
        "pairs": len(outcomes),
        "positives": positives,
        "hits": hits,
        "correct_hits": correct,
        "wrong_hits": hits - correct,
        "misses": len(outcomes) - hits,
        "precision": round(correct / hits, 4) if hits else 1.0,
        "recall": round(correct / positives, 4) if positives else 0.0,
        "reasons": dict(sorted(Counter(o.reason for o in outcomes).items())),
    }


def sweep(outcomes: Sequence[Outcome], decider: Decider, points: int = 101) -> list[dict[str, float]]:
    """Precision, hit rate and recall as the probability threshold moves (vetoes and ambiguity held)."""
    eligible = [o for o in outcomes if o.reason in ("hit", "below_threshold")]
    probs = np.array([o.probability for o in eligible])
    right = np.array([o.found_right for o in eligible], dtype=bool)
    positives = max(1, sum(o.pair.same for o in outcomes))
    rows = []
    for t in np.linspace(0.0, 1.0, points):
        chosen = probs >= t
        hits = int(chosen.sum())
        correct = int((chosen & right).sum())
        rows.append(
            {
                "threshold": float(t),
                "precision": correct / hits if hits else 1.0,
                "hit_rate": hits / len(outcomes) if outcomes else 0.0,
                "recall": correct / positives,
            }
        )
    return rows


def at_recall(outcomes: Sequence[Outcome], recall: float) -> dict[str, float]:
    """The highest probability threshold whose recall reaches ``recall`` (vetoes and ambiguity held), and
    the precision there: one point of the trade-off, for comparing decisions whatever their threshold."""
    eligible = sorted(
        (o for o in outcomes if o.reason in ("hit", "below_threshold")), key=lambda o: o.probability, reverse=True
    )
    positives = max(1, sum(o.pair.same for o in outcomes))
    hits = correct = 0
    for o in eligible:
        hits += 1
        correct += o.found_right
        if correct / positives >= recall:
            return {
                "recall": round(correct / positives, 4),
                "precision": round(correct / hits, 4),
                "threshold": round(o.probability, 6),
            }
    return {
        "recall": round(correct / positives, 4),
        "precision": round(correct / hits, 4) if hits else 1.0,
        "threshold": 0.0,
    }


def plot(rows: Sequence[dict[str, float]], decider: Decider, path: str | Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'atajo[eval]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = [r["threshold"] for r in rows]
    ax.plot(t, [r["precision"] for r in rows], label="precision")
    ax.plot(t, [r["hit_rate"] for r in rows], label="hit rate")
    ax.plot(t, [r["recall"] for r in rows], label="recall", linestyle=":")
    ax.axvline(decider.threshold, color="grey", linestyle="--", label=f"threshold {decider.threshold:.3f}")
    ax.axhline(1 - decider.target_error, color="red", linewidth=0.6, linestyle="--", label="target precision")
    ax.set_xlabel("decision threshold (model probability)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def labelled(kind: str, outcomes: Sequence[Outcome], floor: float) -> Iterator[LabelledPair]:
    """What fitting learns from: the asked text against each neighbour at or above ``floor``, labelled
    same or different (origin format: whether it holds the pair's origin; duplicate format: the label)."""
    for o in outcomes:
        for n in o.neighbours:
            if n.score >= floor:
                same = n.text == o.pair.stored if kind == "origin" else o.pair.same
                yield LabelledPair(o.pair.asked, n.text, n.score, same, o.query_vector, n.vector)


def cases(kind: str, outcomes: Sequence[Outcome]) -> list[Case]:
    """What calibration decides: every asked text with its neighbours and how to judge a hit."""
    return [
        Case(o.pair.asked, o.neighbours, o.query_vector, o.pair.same, o.pair.stored if kind == "origin" else None)
        for o in outcomes
    ]


def swapped_names(outcomes: Sequence[Outcome], embed: EmbedFn) -> list[LabelledPair]:
    """Rule-made hard negatives for ``{origin, similar}`` files, which hold no different-question pairs
    of their own: each asked text with one of its name-like tokens (``TextFacts.names``: "PyTorch", "Paris")
    replaced by a name from another pair's origin, against the origin, labelled different. Numbers and
    negations need none: the vetoes refuse those. Deterministic (choices by hash)."""
    pool = sorted({n for o in outcomes for n in TextFacts.of(o.pair.stored).names if n.isalpha()})
    mutated: list[tuple[Outcome, str]] = []
    for o in outcomes:
        names = TextFacts.of(o.pair.asked).names | TextFacts.of(o.pair.stored).names
        words = [w for w in dict.fromkeys(text_words(o.pair.asked)) if w.lower() in names and w.isalpha()]
        others = [n for n in pool if n not in names]
        if not words or not others:
            continue
        digest = int.from_bytes(hashlib.sha256(o.pair.asked.encode()).digest()[:8], "big")
        word, other = words[digest % len(words)], others[(digest // len(words)) % len(others)]
        replacement = other.upper() if word.isupper() else other[:1].upper() + other[1:]
        mutated.append((o, re.sub(rf"\b{re.escape(word)}\b", replacement, o.pair.asked)))
    if not mutated:
        return []
    vectors = embed([text for _, text in mutated])
    pairs = []
    for (o, text), vector in zip(mutated, vectors, strict=True):
        stored = embed([o.pair.stored])[0] if o.query_vector is None else None
        origin = next((n for n in o.neighbours if n.text == o.pair.stored), None)
        stored_vector = origin.vector if origin is not None and origin.vector is not None else stored
        if stored_vector is None:
            continue
        pairs.append(
            LabelledPair(text, o.pair.stored, float(np.dot(vector, stored_vector)), False, vector, stored_vector)
        )
    return pairs


def _split_runs(
    path: str | Path, embed: EmbedFn, progress: Progress, limit: int | None
) -> tuple[str, dict[str, list[Outcome]]]:
    everything = load_pairs(path, "all", limit)
    by_split: dict[str, list[Pair]] = {"fit": [], "calibrate": [], "test": []}
    for p in everything.pairs:
        by_split[split_of(p)].append(p)
    return everything.kind, {
        name: run(Pairs(everything.kind, ps), embed, None, progress) for name, ps in by_split.items()
    }


def calibrate(
    path: str | Path,
    embed: EmbedFn,
    target_error: float = 0.02,
    progress: Progress = _no_progress,
    limit: int | None = None,
    calibration_path: str | Path | None = None,
    refit: bool = True,
) -> tuple[Decider, dict[str, Any]]:
    """Fit the pair models on the ``fit`` split of ``path`` (unless ``refit`` is false: then the shipped
    weights are kept), calibrate the thresholds to ``target_error`` on the ``calibrate`` split of
    ``calibration_path`` (default: ``path``), and report figures on the held-out ``test`` split of each.

    With a separate ``calibration_path``, the ``calibrate`` split of ``path`` would sit idle, so the models
    are fitted on the ``fit`` and ``calibrate`` splits of ``path`` (60 %); ``test`` stays held out."""
    kind, runs = _split_runs(path, embed, progress, limit)
    if refit:
        fitting = runs["fit"] + (runs["calibrate"] if calibration_path is not None else [])
        negatives = swapped_names(fitting, embed) if kind == "origin" else []
        model = fit_model(list(labelled(kind, fitting, COSINE_FLOOR)) + negatives, COSINE_FLOOR)
        decider = Decider(model=model, threshold=0.0, lexical_threshold=0.0)
    else:
        decider = Decider(threshold=0.0, lexical_threshold=0.0)
    calibration_kind, calibration_runs = (
        (kind, runs) if calibration_path is None else _split_runs(calibration_path, embed, progress, limit)
    )
    calibrate_thresholds(decider, cases(calibration_kind, calibration_runs["calibrate"]), target_error)
    report: dict[str, Any] = {"split": "test", "decision": decider.to_dict()}
    tests = [(Path(path).name, kind, runs["test"])]
    if calibration_path is not None:
        tests.append((Path(calibration_path).name, calibration_kind, calibration_runs["test"]))
    for name, test_kind, outcomes in tests:
        decided = [
            Outcome(
                o.pair, o.neighbours, m.hit, m.reason, m.probability, _judge(test_kind, o, m.neighbour), o.query_vector
            )
            for o in outcomes
            for m in (decider.decide(o.pair.asked, o.neighbours, o.query_vector),)
        ]
        figures = summarize(test_kind, decided)
        report |= figures if len(tests) == 1 else {name: figures}
    return decider, report


def _judge(kind: str, outcome: Outcome, chosen: Neighbour | None) -> bool:
    if kind == "duplicate":
        return outcome.pair.same
    chosen = chosen or (outcome.neighbours[0] if outcome.neighbours else None)
    return chosen is not None and chosen.text == outcome.pair.stored


class CachedEmbed:
    """An ``EmbedFn`` that remembers vectors in an ``.npz`` file (development: avoids re-embedding)."""

    def __init__(self, embed: EmbedFn, path: str | Path) -> None:
        self._embed = embed
        self._path = Path(path)
        self._known: dict[str, Vectors] = {}
        if self._path.exists():
            with np.load(self._path, allow_pickle=False) as data:
                self._known = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
        self._dirty = False

    def __call__(self, texts: Sequence[str]) -> Vectors:
        missing = [t for t in dict.fromkeys(texts) if t not in self._known]
        if missing:
            for t, v in zip(missing, self._embed(missing), strict=True):
                self._known[t] = v
            self._dirty = True
        return np.stack([self._known[t] for t in texts]).astype(np.float32)

    def save(self) -> None:
        if self._dirty and self._known:
            texts = list(self._known)
            np.savez(self._path, texts=np.array(texts), vectors=np.stack([self._known[t] for t in texts]))
            self._dirty = False
