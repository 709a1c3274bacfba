"""Deployments: where a public model name can be served, resolved from settings once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from atajo.settings import DEFAULT_BASE_URLS, DeploymentSettings, PoolSettings, SimulatedSettings


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    """``<public model>/<index>:<provider>``; used in metrics, logs and breaker state, never holds secrets."""
    provider: str
    upstream_model: str | None
    base_url: str
    api_key: str | None = field(repr=False)
    auth_header: str
    api_version: str | None
    headers: tuple[tuple[str, str], ...]
    timeout_s: float
    connect_timeout_s: float
    weight: float
    stream_usage: bool
    simulated: SimulatedSettings
    batch_api: bool = False
    """Deferred requests go through this upstream's Batch API (OpenAI's or Anthropic's Message Batches)."""

    def model_for(self, requested: str) -> str:
        return self.upstream_model or requested

    @classmethod
    def from_settings(cls, public: str, index: int, d: DeploymentSettings, pool: PoolSettings) -> Deployment:
        auth_header = d.auth_header or ("x-api-key" if d.provider == "anthropic" else "authorization")
        return cls(
            id=f"{public}/{index}:{d.provider}",
            provider=d.provider,
            upstream_model=d.model,
            base_url=d.base_url or DEFAULT_BASE_URLS[d.provider],
            api_key=d.api_key.get_secret_value() if d.api_key else None,
            auth_header=auth_header,
            api_version=d.api_version,
            headers=tuple(d.headers.items()),
            timeout_s=d.timeout_s or pool.timeout_s,
            connect_timeout_s=d.connect_timeout_s or pool.connect_timeout_s,
            weight=d.weight,
            stream_usage=d.stream_usage,
            simulated=d.simulated,
            batch_api=_batch_api(d),
        )


def _batch_api(d: DeploymentSettings) -> bool:
    """Explicit, else only OpenAI's and Anthropic's own APIs: most OpenAI-compatible servers (vLLM, Ollama…)
    have no Batch API, nor have proxies in front of Anthropic's."""
    if d.batch_api is not None:
        return d.batch_api
    if d.provider not in ("openai", "anthropic"):
        return False
    return (d.base_url or DEFAULT_BASE_URLS[d.provider]) == DEFAULT_BASE_URLS[d.provider]
