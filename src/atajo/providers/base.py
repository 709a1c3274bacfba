"""What every provider adapter offers the upstream stage."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.core.results import Completion
from atajo.types import JSONObject


class Provider(Protocol):
    name: str

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion:
        """One whole completion. Raises an ``UpstreamError`` subclass on failure."""
        ...

    def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]:
        """OpenAI ``chat.completion.chunk`` objects. Connecting happens at the first ``anext``, so a failure
        before the first chunk can still be retried; a failure after it raises ``UpstreamStreamBroken``."""
        ...

    async def embeddings(
        self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str
    ) -> Completion: ...
