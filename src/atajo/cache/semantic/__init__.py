"""The semantic cache tier's mechanism: local embeddings, a partitioned vector index, the match decision.

Importing this package is cheap: numpy is the only dependency loaded here; onnxruntime, tokenizers and
usearch load on first use (the ``semantic`` extra).
"""

try:
    import numpy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the semantic cache needs numpy: pip install 'atajo[semantic]'") from exc

from atajo.cache.semantic.decision import Decider, Match
from atajo.cache.semantic.embedder import Embedder, EmbedderUnavailable
from atajo.cache.semantic.index import Neighbour, VectorIndex

__all__ = ["Decider", "Embedder", "EmbedderUnavailable", "Match", "Neighbour", "VectorIndex"]
