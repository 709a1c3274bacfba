from __future__ import annotations

import numpy as np
import pytest

from atajo.cache.semantic.embedder import TOKENIZER_ENV, Embedder, EmbedderUnavailable


def test_shapes_dtype_and_unit_length(embedder: Embedder) -> None:
    vectors = embedder.embed(["How do I reset my password?", "short", "x " * 400])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_deterministic_and_independent_of_batching(embedder: Embedder) -> None:
    texts = ["What is the capital of France?", "How do I bake bread at home without yeast?", "Hi"]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed_one(t) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_array_equal(embedder.embed(texts), together)


def test_paraphrases_score_higher_than_unrelated(embedder: Embedder) -> None:
    a, b, c, d = embedder.embed(
        [
            "How do I reset my password?",
            "How can I change my password?",
            "What is the weather like in Lisbon in May?",
            "Recommend a good book about the history of Rome.",
        ]
    )
    assert float(a @ b) > 0.75
    assert float(a @ b) > float(a @ c) + 0.4
    assert float(a @ b) > float(a @ d) + 0.4


def test_missing_tokenizer_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import atajo.cache.semantic.embedder as module

    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(module, "_package_dir", lambda name: None)
    with pytest.raises(EmbedderUnavailable, match=r"atajo\[semantic\]"):
        Embedder().load()
