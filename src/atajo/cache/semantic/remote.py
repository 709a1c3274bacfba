"""Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint, for ``atajo eval semantic`` and
``atajo cache calibrate`` when serving embeds through a provider (``cache.semantic.embedder``): a decision
must be fitted to the similarities of the model that will serve it.

Blocking (the CLI runs it on its own thread of work), standard library only, no retries beyond one for a
dropped connection; the key is read from an environment variable so it never appears on a command line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from atajo.cache.semantic.embedder import Vectors
from atajo.cache.semantic.tier import unit_rows, vectors_from_openai

BATCH = 64


class RemoteEmbeddingsError(RuntimeError):
    pass


class RemoteEmbedder:
    """``embed(texts)`` → unit vectors from ``{base_url}/embeddings`` for ``model``."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("the embeddings URL must start with http:// or https://")
        self.url = base_url.rstrip("/") + "/embeddings"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows = [self._call(list(texts[start : start + BATCH])) for start in range(0, len(texts), BATCH)]
        if not rows:
            return np.empty((0, 0), dtype=np.float32)
        return unit_rows(np.concatenate(rows))

    def _call(self, texts: list[str]) -> Vectors:
        payload = json.dumps({"model": self.model, "input": texts}).encode()
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise RemoteEmbeddingsError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RemoteEmbeddingsError(f"{self.url}: {exc}") from None
        try:
            return vectors_from_openai(body, len(texts))
        except ValueError as exc:
            raise RemoteEmbeddingsError(f"{self.url}: {exc}") from None
