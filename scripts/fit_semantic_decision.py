"""Regenerate the semantic cache's shipped decision weights, ``src/atajo/cache/semantic/decision.npz``.

    PYTHONPATH=src python scripts/fit_semantic_decision.py \\
        --fit-pairs ../shared/data/semantic/qqp_dev.jsonl \\
        --calibration-pairs ../shared/data/semantic/gptcache_mock_pairs.jsonl \\
        [--target-error 0.02] [--embeddings-cache /tmp/sem-emb.npz]

The pair models (the network over the embedding vectors and lexical features, and the lexical fallback)
are fitted on the ``fit`` hash split (30 %) of Quora Question Pairs; both thresholds are calibrated to the
target share of wrong hits on the ``calibrate`` split (30 %) of the GPTCache paraphrase pairs, whose
labels are clean (a wrong hit is another stored entry). QQP's labels are not: about 6 % of its pairs with
near-identical wording (cosine >= 0.99) are labelled different questions, so a 2 % target calibrated on
QQP allows almost no hits. The ``test`` splits (40 %) of both files are held out; the script prints the
figures on them. The same fit is ``atajo cache calibrate --pairs QQP --calibration-pairs GPTCACHE``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atajo.cache.semantic import evaluate
from atajo.cache.semantic.decision import SHIPPED_MODEL
from atajo.cache.semantic.embedder import Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-pairs", required=True, type=Path)
    parser.add_argument("--calibration-pairs", required=True, type=Path)
    parser.add_argument("--target-error", type=float, default=0.02)
    parser.add_argument("--embeddings-cache", type=Path)
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL)
    args = parser.parse_args()
    embedder = Embedder()
    embedder.load()
    embed = evaluate.CachedEmbed(embedder.embed, args.embeddings_cache) if args.embeddings_cache else embedder.embed
    try:
        decider, report = evaluate.calibrate(
            args.fit_pairs, embed, args.target_error, calibration_path=args.calibration_pairs
        )
    finally:
        if isinstance(embed, evaluate.CachedEmbed):
            embed.save()
    params = decider.to_dict()
    decider.model.save(args.out, **{k: float(v) for k, v in params.items() if k not in ("model", "cosine_floor")})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
