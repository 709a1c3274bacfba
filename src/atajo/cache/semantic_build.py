"""Build the semantic tier from settings, importing its heavy parts only when it is enabled."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from atajo.cache.entry import Clock, Entry
from atajo.errors import ConfigError
from atajo.settings import SemanticSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    from atajo.cache.semantic.decision import Decider
    from atajo.cache.semantic.store import VectorStore
    from atajo.cache.semantic.tier import AsyncEmbedFn, EmbedFn, SemanticObserver, SemanticTier

EXTRA = "pip install 'atajo[semantic]'"


def build_semantic(
    settings: SemanticSettings,
    *,
    clock: Clock = time.time,
    observer: SemanticObserver | None = None,
    vetoed: Callable[[Entry, int], bool] | None = None,
    embed: EmbedFn | AsyncEmbedFn | None = None,
    write_queue: int = 10_000,
) -> SemanticTier:
    """The tier ``cache.semantic`` describes. ``embed`` replaces the local model (a provider's embeddings, tests).
    Raises ``ConfigError`` naming the setting when the extra is missing or a value is wrong."""
    try:
        from atajo.cache.semantic.embedder import Embedder, EmbedderUnavailable
        from atajo.cache.semantic.store import MemoryVectorStore
        from atajo.cache.semantic.tier import SemanticTier
    except ImportError as exc:
        raise ConfigError(
            f"cache.semantic.enabled: the semantic tier needs {exc.name!r}: {EXTRA}", param="cache.semantic.enabled"
        ) from None
    decider = load_decider(settings)
    load = None
    if embed is None:
        embedder = Embedder()
        try:
            from atajo.cache.semantic.embedder import locate_model, locate_tokenizer

            locate_model(), locate_tokenizer()
        except EmbedderUnavailable as exc:
            raise ConfigError(f"cache.semantic.enabled: {exc}", param="cache.semantic.enabled") from None
        embed, load = embedder.embed, embedder.load
    store: VectorStore
    if settings.store.startswith("memory://"):
        store = MemoryVectorStore(max_entries=settings.max_entries, dimension=settings.dimension)
    else:
        store = _pgvector(settings.store, settings.dimension)
    return SemanticTier(
        store,
        embed,
        decider,
        clock=clock,
        neighbours=settings.neighbours,
        timeout_s=settings.timeout_s,
        write_queue=write_queue,
        observer=observer,
        vetoed=vetoed,
        load=load,
    )


def load_decider(settings: SemanticSettings) -> Decider:
    """The configured match decision, weights loaded; ``ConfigError`` naming the setting when it is wrong
    (``atajo config check`` calls this too, so a bad decision is caught before serving)."""
    try:
        from atajo.cache.semantic.decision import Decider
    except ImportError as exc:
        raise ConfigError(
            f"cache.semantic.enabled: the semantic tier needs {exc.name!r}: {EXTRA}", param="cache.semantic.enabled"
        ) from None
    try:
        return Decider.from_dict(settings.decision) if settings.decision else Decider.default()
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"cache.semantic.decision: {exc}", param="cache.semantic.decision") from None


def _pgvector(url: str, dimension: int) -> VectorStore:
    try:
        from atajo.cache.semantic.pgvector import PgVectorStore
    except ImportError as exc:
        raise ConfigError(
            f"cache.semantic.store: postgresql:// needs {exc.name!r}: pip install 'atajo[postgres,semantic]'",
            param="cache.semantic.store",
        ) from None
    store: VectorStore = PgVectorStore(url, dimension=dimension)
    return store
