"""Regenerate the semantic cache's shipped decision weights, ``src/atajo/cache/semantic/decision.npz``.

    PYTHONPATH=src python scripts/fit_semantic_decision.py \\
        [--pairs ../shared/data/semantic/gptcache_mock_pairs.jsonl] [--target-error 0.02]

Only permissively licensed data goes into the shipped file: GPTCache's paraphrase pairs (MIT). Quora
Question Pairs may not be used: Quora's terms allow non-commercial use only, and Atajo is used commercially,
so Quora serves for evaluation alone.

Every ``origin`` of a split is stored and every ``similar`` asked, as ``atajo eval semantic`` does. The pair
models (the network over the embedding vectors and lexical features, and the lexical fallback) are fitted
on the ``fit`` hash split (30 %): each ``similar`` against its ``origin`` (same question), against the other
stored origins among its nearest neighbours above the cosine floor (different questions: what the cache
must reject), and rule-made hard negatives (the ``similar`` with a name-like token swapped for one from
another origin, against the origin; ``evaluate.swapped_names``). Both thresholds are calibrated to the
target share of wrong hits on the ``calibrate`` split (30 %); the ``test`` split (40 %) is held out, and the
script prints the figures on it. The output depends only on the pairs file, the embedding model and the
code (fixed seeds), so rerunning it rewrites the shipped file byte for byte. The same fit is
``atajo cache calibrate --pairs GPTCACHE``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atajo.cache.semantic import evaluate
from atajo.cache.semantic.decision import SHIPPED_MODEL
from atajo.cache.semantic.embedder import Embedder

GPTCACHE_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "semantic" / "gptcache_mock_pairs.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=GPTCACHE_PAIRS, help="GPTCache's {origin, similar} pairs.")
    parser.add_argument("--target-error", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL)
    args = parser.parse_args()
    embedder = Embedder()
    embedder.load()
    decider, report = evaluate.calibrate(args.pairs, embedder.embed, args.target_error)
    params = decider.to_dict()
    decider.model.save(args.out, **{k: float(v) for k, v in params.items() if k not in ("model", "cosine_floor")})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
