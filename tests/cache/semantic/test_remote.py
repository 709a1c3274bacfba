"""Embeddings from an OpenAI-compatible endpoint (for fitting a decision to a provider's model), against a
local server speaking the embeddings wire format."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from atajo.cache.semantic.remote import RemoteEmbedder, RemoteEmbeddingsError
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream


def by_text(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [float(b) + 1.0 for b in digest[:8]]


def test_batches_keep_order_and_come_back_unit_length() -> None:
    upstream = OpenAIUpstream(embed_text=by_text)
    texts = [f"text {i}" for i in range(150)]
    with LiveServer(upstream.app()) as server:
        vectors = RemoteEmbedder(server.url + "/v1", "emb", api_key="sk-test").embed(texts)
    assert vectors.shape == (150, 8)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = np.asarray(by_text("text 149"), dtype=np.float32)
    assert np.allclose(vectors[149], expected / np.linalg.norm(expected), atol=1e-6)
    calls = [r for r in upstream.received if r.path == "/v1/embeddings"]
    assert [len(r.body["input"]) for r in calls] == [64, 64, 22]
    assert calls[0].headers["Authorization"] == "Bearer sk-test" and calls[0].body["model"] == "emb"


def test_errors_say_what_the_endpoint_answered() -> None:
    upstream = OpenAIUpstream(embed_text=by_text)
    upstream.faults.append(Fault(status=401, message="bad key"))
    with LiveServer(upstream.app()) as server, pytest.raises(RemoteEmbeddingsError, match=r"HTTP 401.*bad key"):
        RemoteEmbedder(server.url + "/v1", "emb").embed(["x"])
    with pytest.raises(ValueError, match="http"):
        RemoteEmbedder("ftp://x", "emb")
