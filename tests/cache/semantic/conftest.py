from __future__ import annotations

import pytest

from atajo.cache.semantic.embedder import Embedder, EmbedderUnavailable


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real model, loaded once per session (skips with the install hint when the extra is absent)."""
    model = Embedder()
    try:
        model.load()
    except EmbedderUnavailable as exc:
        pytest.skip(str(exc))
    return model
