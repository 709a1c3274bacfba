"""Fit the routing complexity estimator (``atajo.routing.complexity``) on RouteLLM-style labels.

    PYTHONPATH=src python scripts/fit_complexity.py --labels ../shared/data/routing/routellm_labels_dev.jsonl \
        --out src/atajo/routing/complexity.json --cv 20,40,80 --cross-fit --unseen-subjects

``--more-fold-salts s1,s2,s3,s4`` (with ``--cross-fit``) also prints the cross-fitted strong share over four
more fold splits and the mean of all five, as docs/routing.md quotes; the file written is the same.

Reads only the ``fit`` split (2/3 of the prompts, chosen by a hash of the prompt: ``evaluate.split_of``), fits
two L2-regularised logistic heads (strong model correct, weak model correct) over the serving code's own
features (``complexity.features`` and ``complexity.dense_features``) with full-batch Adam in numpy, writes the
weights, then scores the ``test`` split with the written model through ``ComplexityModel.score`` and records
the figures in the file's ``meta``. ``--cv`` first picks the regularisation by 3-fold cross-validation inside
the fit split (the test split is never used to choose anything). Needs numpy (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from atajo.routing.complexity import DENSE, MAX_CHARS, ComplexityModel, dense_features, features
from atajo.routing.evaluate import Labelled, load_labels, summarize

Floats = npt.NDArray[np.float64]


class Design:
    """The fit prompts as a sparse binary matrix (CSR-like arrays) plus the dense shape features."""

    def __init__(self, items: Sequence[Labelled], vocab: dict[str, int]) -> None:
        # Sorted: a set's order follows the string hash seed, and the order of a sum its last bits.
        rows = [sorted(vocab[f] for f in features(it.prompt, MAX_CHARS) if f in vocab) for it in items]
        self.n = len(items)
        self.n_features = len(vocab)
        self.columns = np.array([c for r in rows for c in r], dtype=np.int64)
        self.row_of = np.repeat(np.arange(self.n), [len(r) for r in rows])
        self.dense = np.array([dense_features(it.prompt) for it in items], dtype=np.float64)

    def logits(self, w: Floats, v: Floats, b: float) -> Floats:
        sparse = np.bincount(self.row_of, weights=w[self.columns], minlength=self.n)
        out: Floats = sparse + self.dense @ v + b
        return out


def vocabulary(items: Sequence[Labelled], min_df: int) -> dict[str, int]:
    df = Counter(f for it in items for f in features(it.prompt, MAX_CHARS))
    return {f: i for i, f in enumerate(sorted(f for f, c in df.items() if c >= min_df))}


def fit_head(x: Design, y: Floats, l2: float, epochs: int, lr: float = 0.05) -> tuple[Floats, Floats, float]:
    """Minimise mean log-loss + l2/2n * |weights|^2 by full-batch Adam (the bias is not penalised)."""
    params = [np.zeros(x.n_features), np.zeros(x.dense.shape[1]), np.zeros(1)]
    m = [np.zeros_like(p) for p in params]
    s = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, epochs + 1):
        p = 1.0 / (1.0 + np.exp(-x.logits(params[0], params[1], float(params[2][0]))))
        g = (p - y) / x.n
        grads = [
            np.bincount(x.columns, weights=g[x.row_of], minlength=x.n_features) + l2 * params[0] / x.n,
            x.dense.T @ g + l2 * params[1] / x.n,
            np.array([g.sum()]),
        ]
        for k, grad in enumerate(grads):
            m[k] = b1 * m[k] + (1 - b1) * grad
            s[k] = b2 * s[k] + (1 - b2) * grad * grad
            params[k] -= lr * (m[k] / (1 - b1**t)) / (np.sqrt(s[k] / (1 - b2**t)) + eps)
    return params[0], params[1], float(params[2][0])


def fit(items: Sequence[Labelled], l2: float, min_df: int, epochs: int, meta: dict[str, Any]) -> ComplexityModel:
    vocab = vocabulary(items, min_df)
    x = Design(items, vocab)
    ws, vs, bs = fit_head(x, np.array([it.strong_correct for it in items], dtype=np.float64), l2, epochs)
    ww, vw, bw = fit_head(x, np.array([it.weak_correct for it in items], dtype=np.float64), l2, epochs)
    names = sorted(vocab, key=vocab.__getitem__)
    weights = {
        name: (round(float(ws[i]), 4), round(float(ww[i]), 4))
        for i, name in enumerate(names)
        if abs(ws[i]) >= 5e-4 or abs(ww[i]) >= 5e-4
    }
    return ComplexityModel(
        weights=weights,
        dense_weights=tuple((round(float(a), 4), round(float(c), 4)) for a, c in zip(vs, vw, strict=True)),
        bias=(round(bs, 4), round(bw, 4)),
        meta=meta,
    )


def score_all(model: ComplexityModel, items: Sequence[Labelled]) -> list[float]:
    return [model.score(it.prompt) for it in items]


def cross_validate(items: Sequence[Labelled], grid: Sequence[float], min_df: int, epochs: int) -> float:
    """The L2 strength with the best mean of overall APGR and (1 - strong share at 95 %), on 3 hash folds."""

    def fold(it: Labelled) -> int:
        return int.from_bytes(hashlib.sha256(b"cv" + it.prompt.encode()).digest()[:4], "big") % 3

    best, best_value = grid[0], -1.0
    for l2 in grid:
        scores: list[float] = []
        held: list[Labelled] = []
        for k in range(3):
            train = [it for it in items if fold(it) != k]
            test = [it for it in items if fold(it) == k]
            model = fit(train, l2, min_df, epochs, {})
            scores += score_all(model, test)
            held += test
        figures = summarize(scores, held)
        value = ((figures["apgr"] or 0.0) + 1 - figures["strong_share_at_95"]) / 2
        print(f"cv l2={l2:g}: {json.dumps(figures)}", file=sys.stderr)
        if value > best_value:
            best, best_value = l2, value
    return best


def cross_fit(items: Sequence[Labelled], l2: float, min_df: int, epochs: int, salt: str = "crossfit") -> dict[str, Any]:
    """Every prompt scored by a model fitted without it (3 folds by a hash salted ``salt``): figures over all
    the labels, less noisy than the test split alone (for the record; the shipped model is the one fitted on
    ``fit``)."""

    def fold(it: Labelled) -> int:
        return int.from_bytes(hashlib.sha256(salt.encode() + it.prompt.encode()).digest()[:4], "big") % 3

    scores: list[float] = []
    held: list[Labelled] = []
    for k in range(3):
        model = fit([it for it in items if fold(it) != k], l2, min_df, epochs, {})
        test = [it for it in items if fold(it) == k]
        scores += score_all(model, test)
        held += test
    return summarize(scores, held)


def leave_subjects_out(items: Sequence[Labelled], l2: float, min_df: int, epochs: int) -> dict[str, Any]:
    """MMLU prompts of subjects the model never saw: 5 folds of subjects, each scored by a model fitted on the
    other subjects (and all GSM8K). The owners' held-out split may hold subjects this file does not."""
    subjects = sorted({it.subject for it in items if it.benchmark == "mmlu"})
    random.Random(1).shuffle(subjects)
    scores: list[float] = []
    held: list[Labelled] = []
    for k in range(5):
        chosen = set(subjects[k::5])
        model = fit([it for it in items if it.subject not in chosen], l2, min_df, epochs, {})
        test = [it for it in items if it.benchmark == "mmlu" and it.subject in chosen]
        scores += score_all(model, test)
        held += test
    return summarize(scores, held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="JSON lines {benchmark, subject, prompt, weak_correct, ...}")
    parser.add_argument("--out", default="src/atajo/routing/complexity.json")
    parser.add_argument("--l2", type=float, default=80.0, help="L2 strength (ignored with --cv)")
    parser.add_argument("--cv", default="", help="comma-separated L2 strengths to choose from by 3-fold CV")
    parser.add_argument("--min-df", type=int, default=3, help="keep features seen in at least this many prompts")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--cross-fit", action="store_true", help="also record 3-fold cross-fitted figures on all")
    parser.add_argument(
        "--more-fold-salts",
        default="",
        help="with --cross-fit: comma-separated salts of further 3-fold splits (docs: s1,s2,s3,s4); prints each "
        "one's and the mean strong share per benchmark (not written into the file)",
    )
    parser.add_argument("--unseen-subjects", action="store_true", help="also record leave-subjects-out MMLU figures")
    args = parser.parse_args()

    started = time.perf_counter()
    fit_items = load_labels(args.labels, "fit")
    l2 = args.l2
    if args.cv:
        l2 = cross_validate(fit_items, [float(v) for v in args.cv.split(",")], args.min_df, args.epochs)
    meta: dict[str, Any] = {
        "labels": Path(args.labels).name,
        "fitted_on": "split fit (2/3 of prompts by sha256 of the prompt)",
        "prompts": len(fit_items),
        "l2": l2,
        "min_df": args.min_df,
        "epochs": args.epochs,
        "features": f"multiple-choice prompts: u:<token>, b:<word>_<word> on the first {MAX_CHARS} chars "
        "lower-cased, each also prefixed by choice|; other prompts with a number: open|m:<count>=<bin> "
        f"(complexity_problem); dense {list(DENSE)}",
    }
    model = fit(fit_items, l2, args.min_df, args.epochs, meta)
    Path(args.out).write_text(json.dumps(model.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
    # Judge what was written, through the serving code, on prompts the fit never saw.
    shipped = ComplexityModel.load(args.out)
    test_items = load_labels(args.labels, "test")
    figures = summarize(score_all(shipped, test_items), test_items)
    meta["test"] = figures
    if args.cross_fit:
        meta["cross_fit_all"] = cross_fit(load_labels(args.labels, "all"), l2, args.min_df, args.epochs)
        print(f"cross-fitted on all labels: {json.dumps(meta['cross_fit_all'])}", file=sys.stderr)
        if args.more_fold_salts:
            runs = [meta["cross_fit_all"]] + [
                cross_fit(load_labels(args.labels, "all"), l2, args.min_df, args.epochs, salt)
                for salt in args.more_fold_salts.split(",")
            ]
            for name in runs[0]["benchmarks"]:
                shares = [r["benchmarks"][name]["strong_share_at_95"] for r in runs]
                mean = float(np.mean(shares))
                print(f"{name}: strong share at 95 % per fold salt {shares}, mean {mean:.4f}", file=sys.stderr)
    if args.unseen_subjects:
        meta["unseen_subjects_mmlu"] = leave_subjects_out(load_labels(args.labels, "all"), l2, args.min_df, args.epochs)
        print(f"MMLU, unseen subjects: {json.dumps(meta['unseen_subjects_mmlu'])}", file=sys.stderr)
    final = ComplexityModel(shipped.weights, shipped.dense_weights, shipped.bias, shipped.max_chars, meta)
    Path(args.out).write_text(json.dumps(final.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
    took = time.perf_counter() - started
    print(f"wrote {args.out}: {len(final.weights)} weighted features, l2={l2:g}, {took:.0f} s", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
