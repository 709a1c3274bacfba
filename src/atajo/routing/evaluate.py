"""Measure a strong / weak router on labelled prompts, as RouteLLM does (arXiv 2406.18665).

Labels are JSON lines ``{benchmark, subject, prompt, weak_correct, strong_correct}``: whether the weak (cheap)
and the strong (expensive) model answered the prompt correctly. A router gives each prompt a score; sending the
prompts whose score is at or above a threshold to the strong model, and the rest to the weak one, gives an
accuracy (each prompt counts the answer of the model it went to) at a share of strong calls. Sweeping the
threshold draws the cost / quality curve, from (0, weak accuracy) to (1, strong accuracy). Prompts with equal
scores are taken as a group, in random order: between group boundaries the curve is a straight line (the
expected accuracy), so a router that cannot tell prompts apart draws the random router's diagonal.

- ``strong_share_at_95``: the smallest share of strong calls at which accuracy reaches 95 % of the strong
  model's (0 when the weak model alone does).
- ``apgr``: the area under the performance-gap-recovered curve, PGR(c) = (acc(c) - weak) / (strong - weak),
  over the share of strong calls c in [0, 1]; computed exactly on the piecewise-linear curve (RouteLLM
  approximates the same integral on ten steps). Random routing scores 0.5.

Prompts are split by a hash of their text into ``fit`` (2/3) and ``test`` (1/3): the fitting script sees only
``fit``, and the figures that count are on ``test``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Split = Literal["all", "fit", "test"]
TARGET = 0.95
FIELDS = "benchmark, subject, prompt, weak_correct, strong_correct"


@dataclass(frozen=True, slots=True)
class Labelled:
    benchmark: str
    subject: str
    prompt: str
    weak_correct: bool
    strong_correct: bool


def split_of(prompt: str) -> Literal["fit", "test"]:
    """The prompt's fixed split, from a hash of its text (stable across runs, machines and file orders)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 3
    return "test" if bucket == 0 else "fit"


def load_labels(path: str | Path, split: Split = "all") -> list[Labelled]:
    rows: list[Labelled] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not {"prompt", "weak_correct", "strong_correct"} <= row.keys():
                raise ValueError(
                    f"{path}:{number}: expected {{benchmark, subject, prompt, weak_correct, strong_correct}}"
                )
            item = Labelled(
                str(row.get("benchmark", "all")),
                str(row.get("subject", "")),
                str(row["prompt"]),
                bool(row["weak_correct"]),
                bool(row["strong_correct"]),
            )
            if split == "all" or split_of(item.prompt) == split:
                rows.append(item)
    if not rows:
        raise ValueError(f"{path}: no labelled prompts (split {split})")
    return rows


@dataclass(frozen=True, slots=True)
class Curve:
    shares: tuple[float, ...]
    """Share of prompts sent to the strong model at each group boundary, from 0 to 1."""
    accuracies: tuple[float, ...]
    thresholds: tuple[float, ...]
    """The score threshold that gives each point (inf for share 0)."""
    weak_accuracy: float
    strong_accuracy: float


def curve(scores: Sequence[float], items: Sequence[Labelled]) -> Curve:
    """Accuracy against the share of strong calls as the threshold sweeps down through the scores."""
    n = len(items)
    if n == 0 or len(scores) != n:
        raise ValueError("need one score per labelled prompt, and at least one")
    order = sorted(range(n), key=lambda i: -scores[i])
    correct = sum(item.weak_correct for item in items)
    shares, accuracies, thresholds = [0.0], [correct / n], [float("inf")]
    for rank, i in enumerate(order):
        correct += int(items[i].strong_correct) - int(items[i].weak_correct)
        if rank + 1 == n or scores[order[rank + 1]] != scores[i]:
            shares.append((rank + 1) / n)
            accuracies.append(correct / n)
            thresholds.append(scores[i])
    strong = sum(item.strong_correct for item in items) / n
    return Curve(tuple(shares), tuple(accuracies), tuple(thresholds), accuracies[0], strong)


def share_at(c: Curve, target: float = TARGET) -> float:
    """The smallest share of strong calls whose (interpolated) accuracy reaches ``target`` x strong accuracy."""
    goal = target * c.strong_accuracy
    for k, (share, acc) in enumerate(zip(c.shares, c.accuracies, strict=True)):
        if acc >= goal - 1e-12:
            if k == 0:
                return 0.0
            s0, a0 = c.shares[k - 1], c.accuracies[k - 1]
            return s0 + (share - s0) * (goal - a0) / (acc - a0)
    return 1.0  # pragma: no cover - the last point is the strong accuracy itself


def apgr(c: Curve) -> float | None:
    """Area under the performance-gap-recovered curve (None when the two models are equally accurate)."""
    gap = c.strong_accuracy - c.weak_accuracy
    if gap == 0:
        return None
    pgr = [(acc - c.weak_accuracy) / gap for acc in c.accuracies]
    return sum((c.shares[k] - c.shares[k - 1]) * (pgr[k] + pgr[k - 1]) / 2 for k in range(1, len(pgr)))


def random_share_at(c: Curve, target: float = TARGET) -> float:
    """What random routing needs: the diagonal from weak to strong accuracy."""
    gap = c.strong_accuracy - c.weak_accuracy
    goal = target * c.strong_accuracy
    return 0.0 if c.weak_accuracy >= goal or gap <= 0 else (goal - c.weak_accuracy) / gap


def figures(scores: Sequence[float], items: Sequence[Labelled]) -> dict[str, Any]:
    c = curve(scores, items)
    area = apgr(c)
    return {
        "prompts": len(items),
        "weak_accuracy": round(c.weak_accuracy, 4),
        "strong_accuracy": round(c.strong_accuracy, 4),
        "strong_share_at_95": round(share_at(c), 4),
        "random_share_at_95": round(random_share_at(c), 4),
        "apgr": None if area is None else round(area, 4),
    }


def summarize(scores: Sequence[float], items: Sequence[Labelled]) -> dict[str, Any]:
    """Overall figures, then per benchmark (each with its own threshold sweep)."""
    out = figures(scores, items)
    benchmarks = sorted({item.benchmark for item in items})
    if len(benchmarks) > 1:
        out["benchmarks"] = {
            name: figures(
                [s for s, it in zip(scores, items, strict=True) if it.benchmark == name],
                [it for it in items if it.benchmark == name],
            )
            for name in benchmarks
        }
    return out


def plot(curves: dict[str, Curve], path: str | Path, title: str) -> None:
    """Accuracy against the share of strong calls, one line per benchmark, with the random diagonal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("plotting needs matplotlib: pip install 'atajo[eval]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, c) in enumerate(curves.items()):
        color = f"C{k}"
        share = share_at(c)
        ax.plot(c.shares, c.accuracies, color=color, label=f"{name}: 95 % of strong at {share:.0%} strong calls")
        ax.plot([0, 1], [c.weak_accuracy, c.strong_accuracy], color=color, linestyle=":", linewidth=1)
        ax.axhline(TARGET * c.strong_accuracy, color=color, linestyle="--", linewidth=0.6)
        ax.plot([share], [TARGET * c.strong_accuracy], "o", color=color)
    ax.set_xlabel("share of prompts sent to the strong model (cost)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="dotted: random routing; dashed: 95 % of strong", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
