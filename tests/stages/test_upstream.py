"""The upstream stage on its own: retries, fallbacks and circuit breakers, driven by a scripted provider,
an injected clock and a recording sleep (nothing waits on real time)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import pytest

from atajo.core.context import RequestContext
from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest, Request
from atajo.core.results import ChunkStream, Completion, Result
from atajo.errors import (
    AllAttemptsFailed,
    CircuitOpen,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from atajo.observe.metrics import GatewayMetrics
from atajo.routing.breaker import BreakerBoard, State
from atajo.routing.retry import RetryPolicy
from atajo.routing.table import ModelTable
from atajo.settings import BreakerSettings, DeploymentSettings, PoolSettings
from atajo.stages.upstream import UpstreamStage, hurts_health
from atajo.types import JSONObject

# --- a scripted provider ------------------------------------------------------------------------------
from tests.doubles import FakeClock, RecordingSleep


@dataclass
class Answer:
    chunks: int = 3
    then: UpstreamError | None = None  # raised after the chunks: a mid-stream failure
    chunk_wait_s: float = 0.0


@dataclass
class Hang:
    """Never answer; set ``started`` once called."""

    started: asyncio.Event = field(default_factory=asyncio.Event)


Step = UpstreamError | Answer | Hang


class ScriptedProvider:
    """Each deployment answers from its own script, then with a plain answer; every call is recorded."""

    name = "openai"

    def __init__(self) -> None:
        self.scripts: dict[str, deque[Step]] = defaultdict(deque)
        self.calls: list[str] = []
        self.closed_streams = 0

    def script(self, deployment_id: str, *steps: Step) -> None:
        self.scripts[deployment_id].extend(steps)

    def always(self, deployment_id: str, step: Step, times: int = 50) -> None:
        self.scripts[deployment_id].extend([step] * times)

    async def _step(self, deployment: Deployment) -> Answer:
        self.calls.append(deployment.id)
        queue = self.scripts[deployment.id]
        step = queue.popleft() if queue else Answer()
        if isinstance(step, UpstreamError):
            raise step
        if isinstance(step, Hang):
            step.started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")
        return step

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion:
        await self._step(deployment)
        return Completion({"object": "chat.completion", "model": upstream_model, "served_by": deployment.id})

    async def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]:
        step = await self._step(deployment)
        try:
            for i in range(step.chunks):
                if step.chunk_wait_s:
                    await asyncio.sleep(step.chunk_wait_s)
                yield {"object": "chat.completion.chunk", "index": i, "served_by": deployment.id}
            if step.then is not None:
                raise step.then
        finally:
            self.closed_streams += 1

    async def embeddings(self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str) -> Completion:
        await self._step(deployment)
        return Completion({"object": "list", "data": [], "model": upstream_model})


@dataclass
class Rig:
    stage: UpstreamStage
    provider: ScriptedProvider
    clock: FakeClock
    sleep: RecordingSleep
    metrics: GatewayMetrics

    def state(self, deployment_id: str) -> State:
        return self.stage.breakers.get(deployment_id).state

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def rig(
    models: dict[str, int],
    fallbacks: dict[str, list[str]] | None = None,
    *,
    max_retries: int = 2,
    threshold: int = 3,
    cooldown_s: float = 30.0,
    max_retry_after_s: float = 10.0,
) -> Rig:
    """``models`` maps a public name to its number of deployments, tried in index order (by weight)."""
    deployments = {
        name: [
            Deployment.from_settings(
                name,
                i,
                DeploymentSettings(provider="openai", base_url=f"http://127.0.0.1:9/{name}/{i}", weight=1e-9**i),
                PoolSettings(),
            )
            for i in range(count)
        ]
        for name, count in models.items()
    }
    table = ModelTable(deployments, fallbacks or {}, rng=random.Random(0))
    provider = ScriptedProvider()
    clock = FakeClock()
    sleep = RecordingSleep()
    metrics = GatewayMetrics()
    breakers = BreakerBoard(BreakerSettings(failure_threshold=threshold, cooldown_s=cooldown_s), clock=clock)
    retry = RetryPolicy(max_retries, base_s=0.1, max_s=5.0, max_retry_after_s=max_retry_after_s, rng=random.Random(1))
    stage = UpstreamStage(table, {"openai": provider}, breakers, retry, metrics, sleep)
    for name, count in models.items():  # the weights make the order fixed; check it
        assert [d.id for p, d in table.plan(name) if p == name] == [f"{name}/{i}:openai" for i in range(count)]
    return Rig(stage, provider, clock, sleep, metrics)


def ctx() -> RequestContext:
    return RequestContext(request_id="req_test", route="chat", headers={})


def chat(model: str = "m", stream: bool = False) -> ChatRequest:
    return ChatRequest(
        model=model, body={"model": model, "messages": [{"role": "user", "content": "hi"}]}, stream=stream
    )


def served_by(result: Result) -> str:
    assert isinstance(result, Completion)
    return str(result.body["served_by"])


async def collect(result: Result) -> list[JSONObject]:
    assert isinstance(result, ChunkStream)
    return [chunk async for chunk in result.chunks]


def unavailable(status: int = 503, retry_after_s: float | None = None) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"answered {status}", upstream_status=status, retry_after_s=retry_after_s)


# --- retries ------------------------------------------------------------------------------------------


async def test_success_fills_in_the_context() -> None:
    r = rig({"m": 1})
    c = ctx()
    result = await r.stage(chat(), c)
    assert served_by(result) == "m/0:openai"
    assert (c.attempts, c.routed_model, c.deployment, c.provider, c.simulated) == (
        1,
        "m",
        "m/0:openai",
        "openai",
        False,
    )
    assert r.sleep.delays == []
    assert r.metric("atajo_upstream_attempts_total", provider="openai", deployment="m/0:openai", outcome="ok") == 1


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("cannot connect"),
        UpstreamTimeout("no answer"),
        UpstreamUnavailable("answered 500", upstream_status=500),
        UpstreamUnavailable("answered 429", upstream_status=429),
        UpstreamUnavailable("connection dropped"),
    ],
    ids=["connect", "timeout", "5xx", "429", "dropped"],
)
async def test_retryable_errors_are_retried_with_exponential_backoff(error: UpstreamError) -> None:
    r = rig({"m": 1}, max_retries=2)
    r.provider.script("m/0:openai", error, error)
    c = ctx()
    assert served_by(await r.stage(chat(), c)) == "m/0:openai"
    assert c.attempts == 3 and r.provider.calls == ["m/0:openai"] * 3
    first, second = r.sleep.delays
    assert 0.05 <= first <= 0.1  # base 0.1 s, equal jitter: [cap/2, cap]
    assert 0.1 <= second <= 0.2  # doubled
    assert r.metric("atajo_upstream_retries_total", deployment="m/0:openai") == 2


async def test_retries_run_out_then_the_error_is_reported() -> None:
    r = rig({"m": 1}, max_retries=2, threshold=10)
    r.provider.always("m/0:openai", UpstreamTimeout("no answer within 1 s"))
    c = ctx()
    with pytest.raises(AllAttemptsFailed) as info:
        await r.stage(chat(), c)
    assert c.attempts == 3 and len(r.sleep.delays) == 2
    assert info.value.status == 504 and info.value.message.count("m/0:openai: no answer within 1 s") == 3


async def test_no_retries_configured_raises_the_single_error_itself() -> None:
    r = rig({"m": 1}, max_retries=0)
    r.provider.always("m/0:openai", UpstreamConnectError("cannot connect to 127.0.0.1:9"))
    with pytest.raises(UpstreamConnectError):
        await r.stage(chat(), ctx())
    assert r.sleep.delays == []


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_rejections_are_not_retried_nor_sent_elsewhere(status: int) -> None:
    r = rig({"m": 2, "b": 1}, {"m": ["b"]})
    r.provider.always("m/0:openai", UpstreamRejected("bad 'temperature'", status=status, param="temperature"))
    c = ctx()
    with pytest.raises(UpstreamRejected) as info:
        await r.stage(chat(), c)
    assert info.value.status == status and info.value.param == "temperature"
    assert r.provider.calls == ["m/0:openai"] and c.attempts == 1 and r.sleep.delays == []
    assert r.state("m/0:openai") is State.CLOSED


async def test_credentials_failure_is_not_retried_but_falls_back() -> None:
    r = rig({"m": 2})
    r.provider.always("m/0:openai", UpstreamError("deployment m/0:openai rejected the gateway's credentials (401)"))
    c = ctx()
    assert served_by(await r.stage(chat(), c)) == "m/1:openai"
    assert r.provider.calls == ["m/0:openai", "m/1:openai"] and r.sleep.delays == []


async def test_retry_after_is_honoured() -> None:
    r = rig({"m": 1})
    r.provider.script("m/0:openai", unavailable(429, retry_after_s=3.0), unavailable(503, retry_after_s=0.0))
    assert served_by(await r.stage(chat(), ctx())) == "m/0:openai"
    assert r.sleep.delays == [3.0, 0.0]


async def test_retry_after_too_long_moves_on_without_waiting() -> None:
    r = rig({"m": 2}, max_retry_after_s=10.0)
    r.provider.script("m/0:openai", unavailable(429, retry_after_s=60.0))
    c = ctx()
    assert served_by(await r.stage(chat(), c)) == "m/1:openai"
    assert r.sleep.delays == [] and c.attempts == 2


# --- fallbacks ----------------------------------------------------------------------------------------


async def test_falls_back_to_the_next_deployment_then_to_fallback_models() -> None:
    r = rig({"m": 2, "b": 1, "c": 1}, {"m": ["b", "c"]}, max_retries=1, threshold=10)
    r.provider.always("m/0:openai", unavailable(500))
    r.provider.always("m/1:openai", UpstreamConnectError("cannot connect"))
    r.provider.always("b/0:openai", UpstreamTimeout("no answer"))
    c = ctx()
    assert served_by(await r.stage(chat(), c)) == "c/0:openai"
    assert c.attempts == 7 and (c.routed_model, c.deployment) == ("c", "c/0:openai")
    assert r.provider.calls == ["m/0:openai"] * 2 + ["m/1:openai"] * 2 + ["b/0:openai"] * 2 + ["c/0:openai"]
    assert r.metric("atajo_upstream_fallbacks_total", deployment="b/0:openai") == 1


async def test_every_deployment_failing_lists_every_attempt_with_the_last_status() -> None:
    r = rig({"m": 2, "b": 1}, {"m": ["b"]}, max_retries=0)
    r.provider.always("m/0:openai", unavailable(500))
    r.provider.always("m/1:openai", UpstreamConnectError("cannot connect"))
    r.provider.always("b/0:openai", UpstreamTimeout("no answer"))
    with pytest.raises(AllAttemptsFailed) as info:
        await r.stage(chat(), ctx())
    err = info.value
    assert [where for where, _ in err.errors] == ["m/0:openai", "m/1:openai", "b/0:openai"]
    assert all(d in err.message for d in ("m/0:openai", "m/1:openai", "b/0:openai"))
    assert err.message.startswith("all 3 attempts failed")
    assert (err.status, err.code) == (504, "upstream_timeout")


async def test_all_rate_limited_is_429_with_retry_after() -> None:
    r = rig({"m": 2}, max_retries=0)
    r.provider.always("m/0:openai", unavailable(429, retry_after_s=20.0))
    r.provider.always("m/1:openai", unavailable(429, retry_after_s=30.0))
    with pytest.raises(AllAttemptsFailed) as info:
        await r.stage(chat(), ctx())
    assert (info.value.status, info.value.retry_after_s) == (429, 30.0)
    assert r.sleep.delays == []


# --- circuit breakers ---------------------------------------------------------------------------------


async def test_circuit_opens_after_threshold_and_then_costs_no_call() -> None:
    r = rig({"m": 1}, max_retries=0, threshold=3)
    r.provider.always("m/0:openai", unavailable(500))
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            await r.stage(chat(), ctx())
    assert r.state("m/0:openai") is State.OPEN
    calls = len(r.provider.calls)
    for _ in range(20):
        c = ctx()
        with pytest.raises(CircuitOpen) as info:
            await r.stage(chat(), c)
        assert c.attempts == 0
    assert len(r.provider.calls) == calls  # the dead deployment was not called again
    assert info.value.status == 503 and "deployment m/0:openai is failing; circuit open for 30.0 s more" in str(
        info.value
    )


async def test_retries_stop_once_the_circuit_opens() -> None:
    r = rig({"m": 1}, max_retries=10, threshold=3)
    r.provider.always("m/0:openai", unavailable(502))
    with pytest.raises(AllAttemptsFailed):
        await r.stage(chat(), ctx())
    assert len(r.provider.calls) == 3 and len(r.sleep.delays) == 2


async def test_open_circuit_falls_back_at_once() -> None:
    r = rig({"m": 1, "b": 1}, {"m": ["b"]}, max_retries=0, threshold=1)
    r.provider.always("m/0:openai", UpstreamConnectError("cannot connect"))
    assert served_by(await r.stage(chat(), ctx())) == "b/0:openai"
    r.provider.calls.clear()
    c = ctx()
    assert served_by(await r.stage(chat(), c)) == "b/0:openai"
    assert r.provider.calls == ["b/0:openai"] and c.attempts == 1


async def test_half_open_probe_success_closes() -> None:
    r = rig({"m": 1}, max_retries=0, threshold=1, cooldown_s=30.0)
    r.provider.script("m/0:openai", unavailable(500))
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())
    with pytest.raises(CircuitOpen):
        await r.stage(chat(), ctx())
    r.clock.advance(30.0)
    assert served_by(await r.stage(chat(), ctx())) == "m/0:openai"
    assert r.state("m/0:openai") is State.CLOSED
    assert r.provider.calls == ["m/0:openai"] * 2


async def test_half_open_probe_failure_reopens() -> None:
    r = rig({"m": 1}, max_retries=3, threshold=1, cooldown_s=30.0)
    r.provider.always("m/0:openai", unavailable(500))
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())
    r.clock.advance(30.0)
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())  # the probe: one call, no retries
    assert r.state("m/0:openai") is State.OPEN and len(r.provider.calls) == 2
    with pytest.raises(CircuitOpen):
        await r.stage(chat(), ctx())
    assert len(r.provider.calls) == 2


async def test_only_one_probe_while_it_is_in_flight() -> None:
    r = rig({"m": 1}, max_retries=0, threshold=1)
    hang = Hang()
    r.provider.script("m/0:openai", unavailable(500), hang)
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())
    r.clock.advance(30.0)
    probe = asyncio.create_task(r.stage(chat(), ctx()))
    await hang.started.wait()
    for _ in range(5):
        with pytest.raises(CircuitOpen, match="a trial request is in flight"):
            await r.stage(chat(), ctx())
    assert len(r.provider.calls) == 2
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    # The probe ended without a verdict: the next caller is let through as the new probe.
    assert served_by(await r.stage(chat(), ctx())) == "m/0:openai"
    assert r.state("m/0:openai") is State.CLOSED


async def test_rate_limits_do_not_open_the_circuit() -> None:
    r = rig({"m": 1}, max_retries=0, threshold=2)
    r.provider.always("m/0:openai", unavailable(429), times=10)
    for _ in range(10):
        with pytest.raises(UpstreamUnavailable):
            await r.stage(chat(), ctx())
    assert r.state("m/0:openai") is State.CLOSED and len(r.provider.calls) == 10


async def test_rate_limited_probe_does_not_wedge_the_circuit() -> None:
    r = rig({"m": 1}, max_retries=0, threshold=1)
    r.provider.script("m/0:openai", unavailable(500), unavailable(429, retry_after_s=1.0))
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())
    r.clock.advance(30.0)
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())  # the probe is rate limited: busy, not down, and no verdict
    # The next caller may probe again (without waiting for another cooldown), and its success closes.
    assert served_by(await r.stage(chat(), ctx())) == "m/0:openai"
    assert r.state("m/0:openai") is State.CLOSED


async def test_rejected_probe_closes_the_circuit() -> None:
    r = rig({"m": 1}, max_retries=0, threshold=1)
    r.provider.script("m/0:openai", unavailable(500), UpstreamRejected("bad", status=400))
    with pytest.raises(UpstreamUnavailable):
        await r.stage(chat(), ctx())
    r.clock.advance(30.0)
    with pytest.raises(UpstreamRejected):
        await r.stage(chat(), ctx())
    assert r.state("m/0:openai") is State.CLOSED  # it answered, and sensibly


def test_what_hurts_a_deployments_health() -> None:
    assert hurts_health(UpstreamUnavailable("500", upstream_status=500))
    assert hurts_health(UpstreamUnavailable("invalid JSON"))
    assert hurts_health(UpstreamConnectError("x"))
    assert hurts_health(UpstreamTimeout("x"))
    assert hurts_health(UpstreamStreamBroken("x"))
    assert hurts_health(UpstreamError("credentials"))
    assert not hurts_health(UpstreamUnavailable("429", upstream_status=429))
    assert not hurts_health(UpstreamRejected("bad", status=400))


# --- streams ------------------------------------------------------------------------------------------


async def test_stream_failing_before_its_first_chunk_is_retried() -> None:
    r = rig({"m": 1}, max_retries=2)
    r.provider.script("m/0:openai", unavailable(503), UpstreamStreamBroken("stream broken (ClientPayloadError)"))
    c = ctx()
    chunks = await collect(await r.stage(chat(stream=True), c))
    assert [ch["index"] for ch in chunks] == [0, 1, 2]
    assert c.attempts == 3 and len(r.sleep.delays) == 2


async def test_empty_stream_is_retried() -> None:
    r = rig({"m": 1}, max_retries=1)
    r.provider.script("m/0:openai", Answer(chunks=0))
    c = ctx()
    assert len(await collect(await r.stage(chat(stream=True), c))) == 3
    assert c.attempts == 2


@pytest.mark.parametrize(
    "error",
    [UpstreamStreamBroken("stream broken"), UpstreamTimeout("stream stalled for 1 s")],
    ids=["broken", "stalled"],
)
async def test_mid_stream_failure_reaches_the_consumer_and_counts_against_the_breaker(error: UpstreamError) -> None:
    r = rig({"m": 1}, max_retries=2, threshold=1)
    r.provider.script("m/0:openai", Answer(chunks=2, then=error))
    result = await r.stage(chat(stream=True), ctx())
    assert isinstance(result, ChunkStream)
    got: list[JSONObject] = []
    with pytest.raises(type(error)):  # noqa: PT012  # the chunks before the failure matter too
        async for chunk in result.chunks:
            got.append(chunk)
    assert len(got) == 2  # what was sent stays sent; no retry after the first chunk
    assert len(r.provider.calls) == 1
    assert r.state("m/0:openai") is State.OPEN


async def test_consumer_leaving_closes_the_provider_stream() -> None:
    r = rig({"m": 1})
    result = await r.stage(chat(stream=True), ctx())
    assert isinstance(result, ChunkStream)
    await anext(result.chunks)
    await result.chunks.aclose()
    assert r.provider.closed_streams == 1
    assert r.state("m/0:openai") is State.CLOSED


async def test_time_waiting_on_stream_chunks_counts_as_upstream_time() -> None:
    r = rig({"m": 1})
    r.provider.script("m/0:openai", Answer(chunks=5, chunk_wait_s=0.02))
    c = ctx()
    await collect(await r.stage(chat(stream=True), c))
    # Four waits happen after the first chunk; the gateway's own overhead must not include them.
    assert c.upstream_ns >= 0.9 * 5 * 0.02 * 1e9


# --- embeddings ---------------------------------------------------------------------------------------


async def test_embeddings_retry_and_fallback_too() -> None:
    r = rig({"e": 2}, max_retries=1)
    r.provider.always("e/0:openai", unavailable(500))
    request: Request = EmbeddingsRequest(model="e", body={"model": "e", "input": "hi"})
    c = ctx()
    result = await r.stage(request, c)
    assert isinstance(result, Completion) and result.body["object"] == "list"
    assert c.deployment == "e/1:openai" and c.attempts == 3
