"""End to end with the OpenAI SDK: the gateway in front of scripted local upstreams that fail in every way an
upstream can, showing retries, fallbacks, circuit breakers, streams, the connection pool, the simulated
provider's faults, and that a client can never choose where the gateway sends its request.

Nothing here waits on real time for back-off or cooldowns: the gateway gets a recording ``sleep`` and its
breakers a fake clock. Upstream delays are real but short, and no assertion is about how long anything took:
"fails fast" is shown by counting what the dead upstream received.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from atajo.app import Services, build_app
from atajo.settings import Settings
from tests.doubles import FakeClock, RecordingSleep
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import CountingUpstream, Fault

HI: Any = [{"role": "user", "content": "hi"}]


@dataclass
class Gateway:
    server: LiveServer
    services: Services
    sleep: RecordingSleep
    clock: FakeClock

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key="client-key", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.server.url + "/v1", api_key="client-key", max_retries=0)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.server.url + "/metrics") as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def ok(self, model: str = "m", **kw: Any) -> tuple[str | None, Mapping[str, str]]:
        raw = self.client.chat.completions.with_raw_response.create(model=model, messages=HI, **kw)
        return raw.parse().choices[0].message.content, raw.headers

    def fails(self, model: str = "m", **kw: Any) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as info:
            self.client.chat.completions.create(model=model, messages=HI, **kw)
        return info.value


GatewayFactory = Callable[[dict[str, Any]], Gateway]
UpstreamFactory = Callable[[], tuple[CountingUpstream, LiveServer]]


@pytest.fixture
def gateway() -> Iterator[GatewayFactory]:
    started: list[LiveServer] = []

    def start(config: dict[str, Any]) -> Gateway:
        sleep, clock = RecordingSleep(), FakeClock()
        config.setdefault("cache", {"enabled": False})  # these tests count upstream calls
        config.setdefault("ledger", {"enabled": False})  # it would write under ~/.cache/atajo
        app = build_app(Settings.model_validate(config), sleep=sleep, clock=clock)
        services = app.services
        server = LiveServer(app).start()
        started.append(server)
        return Gateway(server, services, sleep, clock)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def upstream() -> Iterator[UpstreamFactory]:
    started: list[LiveServer] = []

    def start() -> tuple[CountingUpstream, LiveServer]:
        fake = CountingUpstream()
        server = LiveServer(fake.app()).start()
        started.append(server)
        return fake, server

    yield start
    for server in started:
        server.stop()


def dep(url: str, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "base_url": url + "/v1", "api_key": "sk-upstream", **extra}


def one(url: str, **extra: Any) -> dict[str, Any]:
    return {"deployments": [dep(url, **extra)]}


def attempts(headers: Mapping[str, str]) -> int:
    return int(headers["x-atajo-attempts"])


# --- retries ------------------------------------------------------------------------------------------


def test_connect_errors_are_retried_with_exponential_backoff(gateway: GatewayFactory, closed_port: int) -> None:
    gw = gateway({"models": {"m": one(f"http://127.0.0.1:{closed_port}")}})
    err = gw.fails()
    assert err.status_code == 502 and err.code == "upstream_connect_error"
    assert attempts(err.response.headers) == 3  # max_retries: 2
    first, second = gw.sleep.delays
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2  # 100 ms base, doubled, equal jitter
    assert gw.services.pool.sent[f"127.0.0.1:{closed_port}"] == 3


def test_timeouts_are_retried(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url, timeout_s=0.2)}})
    fake.fail_next(Fault(delay_s=2.0))
    text, headers = gw.ok()
    assert text == fake.reply and attempts(headers) == 2 and len(fake.received) == 2
    assert len(gw.sleep.delays) == 1


def test_lasting_timeouts_answer_504(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"retry": {"max_retries": 1}, "models": {"m": one(up.url, timeout_s=0.2)}})
    fake.always = Fault(delay_s=2.0)
    err = gw.fails()
    assert err.status_code == 504 and err.code == "upstream_timeout"
    assert attempts(err.response.headers) == 2


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_rate_limits_and_server_errors_are_retried(
    gateway: GatewayFactory, upstream: UpstreamFactory, status: int
) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=status), Fault(status=status))
    text, headers = gw.ok()
    assert text == fake.reply and attempts(headers) == 3
    assert len(gw.sleep.delays) == 2 and 0.05 <= gw.sleep.delays[0] <= 0.1


def test_dropped_connection_is_retried(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.fail_next(Fault(drop=True))
    text, headers = gw.ok()
    assert text == fake.reply and attempts(headers) == 2


def test_retry_after_seconds_is_honoured(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=429, retry_after="3"), Fault(status=503, retry_after="1"))
    text, headers = gw.ok()
    assert text == fake.reply and attempts(headers) == 3
    assert gw.sleep.delays == [3.0, 1.0]


def test_retry_after_http_date_is_honoured(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=429, retry_after=formatdate(time.time() + 6, usegmt=True)))
    text, _ = gw.ok()
    assert text == fake.reply
    (delay,) = gw.sleep.delays
    assert 3 < delay <= 6


def test_retry_after_longer_than_we_wait_is_passed_to_the_client(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})  # max_retry_after_s: 10
    fake.fail_next(Fault(status=429, retry_after="60", message="Rate limit reached for requests"))
    err = gw.fails()
    assert isinstance(err, openai.RateLimitError)
    assert err.response.headers["retry-after"] == "60"
    assert attempts(err.response.headers) == 1 and gw.sleep.delays == []


def test_unreadable_retry_after_does_not_break_the_answer(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"retry": {"max_retries": 0}, "models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=429, retry_after="inf"))
    err = gw.fails()
    assert err.status_code == 429 and err.code == "upstream_rate_limited"


@pytest.mark.parametrize(("status", "kind"), [(400, openai.BadRequestError), (422, openai.UnprocessableEntityError)])
def test_rejections_are_not_retried_and_keep_their_status(
    gateway: GatewayFactory, upstream: UpstreamFactory, status: int, kind: type[openai.APIStatusError]
) -> None:
    fake, up = upstream()
    other, other_up = upstream()
    gw = gateway({"models": {"m": {"deployments": [dep(up.url, weight=1e6), dep(other_up.url, weight=1e-6)]}}})
    fake.fail_next(Fault(status=status, message="Invalid value for 'temperature': must be at most 2."))
    err = gw.fails()
    assert isinstance(err, kind) and err.status_code == status
    assert err.body == {
        "message": "Invalid value for 'temperature': must be at most 2.",
        "type": "invalid_request_error",
        "param": None,
        "code": "upstream_error",
    }
    assert len(fake.received) == 1 and other.received == []  # any deployment would say the same
    assert attempts(err.response.headers) == 1 and gw.sleep.delays == []


def test_upstream_401_is_502_and_never_echoes_the_upstream(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=401, message="Incorrect API key provided: sk-upstream. Find yours at ..."))
    err = gw.fails()
    assert isinstance(err, openai.InternalServerError) and err.status_code == 502
    assert "sk-upstream" not in err.response.text and "Incorrect" not in err.response.text
    assert "credentials" in err.message
    assert len(fake.received) == 1  # not retried: the same key would be refused again


def test_invalid_json_from_upstream_is_502(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.always = Fault(invalid_json=True)
    err = gw.fails()
    assert err.status_code == 502 and "invalid JSON" in err.message
    assert attempts(err.response.headers) == 3
    fake.always = None
    fake.fail_next(Fault(invalid_json=True))
    text, headers = gw.ok()
    assert text == fake.reply and attempts(headers) == 2


# --- fallbacks ----------------------------------------------------------------------------------------


def test_falls_back_to_the_next_deployment_then_to_fallback_models(
    gateway: GatewayFactory, upstream: UpstreamFactory, closed_port: int
) -> None:
    first, first_up = upstream()
    backup, backup_up = upstream()
    first.always = Fault(status=500)
    gw = gateway(
        {
            "breaker": {"failure_threshold": 100},
            "models": {
                "m": {
                    "deployments": [dep(first_up.url, weight=1e6), dep(f"http://127.0.0.1:{closed_port}", weight=1e-6)],
                    "fallbacks": ["backup"],
                },
                "backup": one(backup_up.url, model="backup-upstream-name"),
            },
        }
    )
    text, headers = gw.ok()
    assert text == backup.reply
    assert headers["x-atajo-model"] == "backup"
    assert headers["x-atajo-deployment"] == "backup/0:openai"
    assert attempts(headers) == 7  # 3 on each dead deployment, then 1
    assert len(first.received) == 3 and backup.received[0].body["model"] == "backup-upstream-name"
    assert gw.metric("atajo_upstream_fallbacks_total", deployment="m/1:openai") == 1


def test_next_deployment_of_the_same_model(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    dead, dead_up = upstream()
    alive, alive_up = upstream()
    dead.always = Fault(status=503)
    gw = gateway(
        {
            "retry": {"max_retries": 0},
            "models": {"m": {"deployments": [dep(dead_up.url, weight=1e6), dep(alive_up.url, weight=1e-6)]}},
        }
    )
    text, headers = gw.ok()
    assert text == alive.reply
    assert (headers["x-atajo-model"], headers["x-atajo-deployment"], attempts(headers)) == ("m", "m/1:openai", 2)


def test_when_everything_fails_one_error_lists_every_attempt(
    gateway: GatewayFactory, upstream: UpstreamFactory, closed_port: int
) -> None:
    broken, broken_up = upstream()
    slow, slow_up = upstream()
    broken.always = Fault(status=500, message="boom")
    slow.always = Fault(delay_s=2.0)
    gw = gateway(
        {
            "retry": {"max_retries": 0},
            "models": {
                "m": {
                    "deployments": [
                        dep(broken_up.url, weight=1e6),
                        dep(f"http://127.0.0.1:{closed_port}", weight=1e-6),
                    ],
                    "fallbacks": ["slow"],
                },
                "slow": one(slow_up.url, timeout_s=0.2),
            },
        }
    )
    err = gw.fails()
    assert err.status_code == 504 and err.code == "upstream_timeout"  # the last attempt timed out
    message = str(err.body["message"]) if isinstance(err.body, dict) else ""
    assert message.startswith("all 3 attempts failed")
    assert "m/0:openai: deployment m/0:openai answered 500: boom" in message
    assert f"m/1:openai: deployment m/1:openai: cannot connect to 127.0.0.1:{closed_port}" in message
    assert "slow/0:openai: deployment slow/0:openai: no answer within 0.2 s" in message
    assert attempts(err.response.headers) == 3


def test_when_every_deployment_is_rate_limited_the_answer_is_429_with_retry_after(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    a, a_up = upstream()
    b, b_up = upstream()
    a.always = Fault(status=429, retry_after="30")
    b.always = Fault(status=429, retry_after="45")
    gw = gateway({"models": {"m": {"deployments": [dep(a_up.url, weight=1e6), dep(b_up.url, weight=1e-6)]}}})
    err = gw.fails()
    assert isinstance(err, openai.RateLimitError)
    assert err.response.headers["retry-after"] == "45"
    assert len(a.received) == 1 and len(b.received) == 1  # 30 s and 45 s are too long to wait here
    assert gw.sleep.delays == []


# --- circuit breakers ---------------------------------------------------------------------------------


def test_open_circuit_fails_without_touching_the_dead_upstream_then_a_probe_closes_it(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    fake.always = Fault(status=500)
    gw = gateway(
        {
            "retry": {"max_retries": 5},
            "breaker": {"failure_threshold": 3, "cooldown_s": 30},
            "models": {"m": one(up.url)},
        }
    )
    err = gw.fails()
    assert err.status_code == 502 and attempts(err.response.headers) == 3  # no retries once it opened
    assert len(fake.received) == 3
    assert gw.metric("atajo_circuit_state", deployment="m/0:openai") == 2
    for _ in range(20):
        err = gw.fails()
        assert err.status_code == 503 and err.code == "circuit_open"
        assert attempts(err.response.headers) == 0
    assert len(fake.received) == 3 and fake.connections <= 1  # twenty answers, not one call upstream

    gw.clock.advance(29.0)
    assert gw.fails().code == "circuit_open"
    fake.always = None  # the upstream recovers
    gw.clock.advance(1.0)
    text, headers = gw.ok()  # the probe
    assert text == fake.reply and attempts(headers) == 1
    assert gw.metric("atajo_circuit_state", deployment="m/0:openai") == 0
    for _ in range(3):
        assert gw.ok()[0] == fake.reply
    assert len(fake.received) == 3 + 4


def test_failed_probe_reopens(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    fake.always = Fault(status=503)
    gw = gateway({"retry": {"max_retries": 0}, "breaker": {"failure_threshold": 1}, "models": {"m": one(up.url)}})
    assert gw.fails().status_code == 502
    assert gw.fails().code == "circuit_open"
    gw.clock.advance(30.0)
    assert gw.fails().status_code == 502  # the probe went through, and failed
    assert len(fake.received) == 2
    assert gw.fails().code == "circuit_open"
    assert len(fake.received) == 2


def test_rate_limited_probe_does_not_leave_the_circuit_stuck(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    gw = gateway({"retry": {"max_retries": 0}, "breaker": {"failure_threshold": 1}, "models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=500), Fault(status=429, retry_after="60"))
    assert gw.fails().status_code == 502
    gw.clock.advance(30.0)
    assert gw.fails().status_code == 429  # the probe was rate limited: busy, not down, and no verdict
    text, _ = gw.ok()  # the next request may probe (no second cooldown), and its success closes the circuit
    assert text == fake.reply
    assert gw.metric("atajo_circuit_state", deployment="m/0:openai") == 0
    assert len(fake.received) == 3


def test_open_circuit_falls_back_without_connecting_to_the_dead_host(
    gateway: GatewayFactory, upstream: UpstreamFactory, closed_port: int
) -> None:
    backup, backup_up = upstream()
    dead_url = f"http://127.0.0.1:{closed_port}"
    gw = gateway(
        {
            "retry": {"max_retries": 0},
            "breaker": {"failure_threshold": 2},
            "models": {"m": {"deployments": [dep(dead_url)], "fallbacks": ["b"]}, "b": one(backup_up.url)},
        }
    )
    for _ in range(2):
        assert attempts(gw.ok()[1]) == 2
    for _ in range(10):
        text, headers = gw.ok()
        assert text == backup.reply and headers["x-atajo-deployment"] == "b/0:openai" and attempts(headers) == 1
    dead_host = dead_url.removeprefix("http://")
    assert gw.services.pool.sent[dead_host] == 2  # no connection attempt once the circuit opened
    assert gw.metric("atajo_upstream_requests_sent_total", host=dead_host) == 2


async def test_half_open_lets_one_probe_through_while_others_are_turned_away(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    gw = gateway({"retry": {"max_retries": 0}, "breaker": {"failure_threshold": 1}, "models": {"m": one(up.url)}})
    fake.fail_next(Fault(status=500), Fault(delay_s=0.5))  # then the probe is slow
    assert gw.fails().status_code == 502
    gw.clock.advance(30.0)
    client = gw.async_client()
    try:
        probe = asyncio.create_task(client.chat.completions.create(model="m", messages=HI))
        for _ in range(1000):  # until the probe reaches the upstream (it then waits there 0.5 s)
            if len(fake.received) == 2:
                break
            await asyncio.sleep(0.005)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="m", messages=HI)
        assert info.value.status_code == 503 and info.value.code == "circuit_open"
        assert (await probe).choices[0].message.content == fake.reply
    finally:
        await client.close()
    assert len(fake.received) == 2


# --- streams ------------------------------------------------------------------------------------------


def stream_text(gw: Gateway, model: str = "m") -> tuple[str, Mapping[str, str]]:
    raw = gw.client.chat.completions.with_raw_response.create(model=model, messages=HI, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, raw.headers


def stream_until_error(gw: Gateway, model: str = "m") -> tuple[str, openai.APIError]:
    """The text streamed before the stream failed, and the SDK's error: an error event the gateway sent (an
    ``APIError`` itself), not a dropped connection (``APIConnectionError``)."""
    received: list[ChatCompletionChunk] = []
    failure: openai.APIError | None = None
    try:
        for chunk in gw.client.chat.completions.create(model=model, messages=HI, stream=True):
            received.append(chunk)
    except openai.APIError as err:
        failure = err
    assert failure is not None, f"the stream ended normally after {len(received)} chunks"
    assert type(failure) is openai.APIError
    return "".join(c.choices[0].delta.content or "" for c in received if c.choices), failure


@pytest.mark.parametrize(
    "fault",
    [
        Fault(drop=True),
        Fault(status=503),
        Fault(stream_break_after=0),
        Fault(stream_break_after=0, stream_error_event=True),
    ],
    ids=["dropped", "503", "cut_before_first_chunk", "error_event_before_first_chunk"],
)
def test_stream_failing_before_its_first_chunk_is_retried(
    gateway: GatewayFactory, upstream: UpstreamFactory, fault: Fault
) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    fake.fail_next(fault)
    text, headers = stream_text(gw)
    assert text == fake.reply and attempts(headers) == 2


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault(stream_break_after=3), "stream broken"),
        (Fault(stream_break_after=3, stream_error_event=True), "overloaded mid-stream"),
    ],
    ids=["cut", "error_event"],
)
def test_stream_failing_midway_reaches_the_sdk_and_counts_against_the_breaker(
    gateway: GatewayFactory, upstream: UpstreamFactory, fault: Fault, message: str
) -> None:
    fake, up = upstream()
    gw = gateway({"breaker": {"failure_threshold": 1}, "models": {"m": one(up.url)}})
    fake.fail_next(fault)
    text, err = stream_until_error(gw)
    assert text == "Hello from"  # what was sent stays sent
    assert message in err.message
    assert len(fake.received) == 1  # not retried: the client already has part of an answer
    assert gw.fails().code == "circuit_open"  # that failure opened the circuit
    assert len(fake.received) == 1


def test_stream_stalling_midway_reaches_the_sdk_and_counts_against_the_breaker(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    gw = gateway({"breaker": {"failure_threshold": 1}, "models": {"m": one(up.url, timeout_s=0.2)}})
    fake.fail_next(Fault(chunk_delay_s=1.0))
    text, err = stream_until_error(gw)
    assert text == "" and "stalled" in err.message
    assert gw.fails().code == "circuit_open"
    assert len(fake.received) == 1


def test_slow_stream_completes(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url, timeout_s=0.3)}})
    fake.fail_next(Fault(chunk_delay_s=0.08))  # each gap well under timeout_s; the whole stream well over it
    text, headers = stream_text(gw)
    assert text == fake.reply and attempts(headers) == 1


# --- the connection pool ------------------------------------------------------------------------------


def test_sequential_requests_reuse_connections(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    gw = gateway({"models": {"m": one(up.url)}})
    for _ in range(20):
        assert gw.ok()[0] == fake.reply
        assert stream_text(gw)[0] == fake.reply
    assert len(fake.received) == 40 and fake.connections <= 2
    host = f"127.0.0.1:{up.port}"
    opened = gw.metric("atajo_upstream_connections_opened_total", host=host)
    sent = gw.metric("atajo_upstream_requests_sent_total", host=host)
    assert sent == 40 and 1 <= opened <= 2


async def test_connections_per_host_are_limited(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    fake.always = Fault(delay_s=0.1)
    gw = gateway({"pool": {"max_connections_per_host": 2}, "models": {"m": one(up.url)}})
    client = gw.async_client()
    try:
        answers = await asyncio.gather(*(client.chat.completions.create(model="m", messages=HI) for _ in range(10)))
    finally:
        await client.close()
    assert [a.choices[0].message.content for a in answers] == [fake.reply] * 10
    assert fake.peak == 2 and fake.connections <= 2
    assert gw.metric("atajo_upstream_connections_opened_total", host=f"127.0.0.1:{up.port}") <= 2


async def test_queueing_for_a_connection_is_not_a_connect_failure(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    fake.always = Fault(delay_s=0.2)
    gw = gateway(
        {
            "retry": {"max_retries": 0},
            "pool": {"max_connections_per_host": 1},
            "models": {"m": one(up.url, connect_timeout_s=0.05)},
        }
    )
    client = gw.async_client()
    try:
        answers = await asyncio.gather(*(client.chat.completions.create(model="m", messages=HI) for _ in range(4)))
    finally:
        await client.close()
    assert len(answers) == 4 and fake.peak == 1


# --- the simulated provider behind the gateway --------------------------------------------------------


def simulated(**settings: Any) -> dict[str, Any]:
    return {"deployments": [{"provider": "simulated", "simulated": {"jitter": 0, **settings}}]}


@pytest.mark.parametrize(("status", "client_status"), [(429, 429), (503, 502), (422, 422)])
def test_simulated_error_rate_one_answers_the_configured_status(
    gateway: GatewayFactory, status: int, client_status: int
) -> None:
    gw = gateway({"models": {"gpt-4o-mini": simulated(error_rate=1.0, error_status=status)}})
    err = gw.fails("gpt-4o-mini")
    assert err.status_code == client_status
    assert err.response.headers["x-atajo-attempts"] == ("1" if status == 422 else "3")


def test_simulated_drop_rate_one_breaks_streams_midway(gateway: GatewayFactory) -> None:
    gw = gateway({"models": {"gpt-4o-mini": simulated(drop_rate=1.0)}})
    text, err = stream_until_error(gw, "gpt-4o-mini")
    assert text.startswith("[simulated gpt-4o-mini]") and "dropped mid-stream" in err.message


def test_simulated_latency_goes_through_the_gateways_sleep(gateway: GatewayFactory) -> None:
    gw = gateway({"models": {"gpt-4o-mini": simulated()}})
    raw = gw.client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.headers["x-atajo-simulated"] == "true"
    tokens = raw.parse().usage
    assert tokens is not None
    assert gw.sleep.delays == [pytest.approx(0.3 + (tokens.completion_tokens - 1) / 110)]  # the catalog's figures


# --- clients never choose the upstream ----------------------------------------------------------------


def test_request_fields_cannot_redirect_the_gateway(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    decoy, decoy_up = upstream()
    gw = gateway({"models": {"m": one(up.url), "*": one(up.url)}})
    steer = {
        "base_url": decoy_up.url + "/v1",
        "api_base": decoy_up.url + "/v1",
        "url": decoy_up.url + "/v1/chat/completions",
        "headers": {"Authorization": "Bearer sk-client", "Host": f"127.0.0.1:{decoy_up.port}"},
        "extra_headers": {"x-target": decoy_up.url},
        "api_key": "sk-client",
    }
    text, _ = gw.ok(extra_body=steer, extra_headers={"x-forwarded-host": f"127.0.0.1:{decoy_up.port}"})
    assert text == fake.reply
    text, _ = gw.ok(model=decoy_up.url + "/v1", extra_body=steer)  # a URL as the model name: just a name
    assert text == fake.reply
    assert stream_text(gw)[0] == fake.reply
    assert decoy.received == [] and decoy.connections == 0
    assert len(fake.received) == 3
    for received in fake.received:
        assert received.path == "/v1/chat/completions"
        assert received.headers["Authorization"] == "Bearer sk-upstream"  # the deployment's key, not the client's
        assert "x-forwarded-host" not in {k.lower() for k in received.headers}


def test_a_deployment_that_cannot_express_the_request_falls_through(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    gw = gateway(
        {
            "models": {
                "m": {
                    "deployments": [
                        {"provider": "anthropic", "base_url": "http://127.0.0.1:9/v1", "weight": 1e9},
                        {"provider": "openai", "base_url": up.url + "/v1", "weight": 1e-9},
                    ]
                }
            }
        }
    )
    # Anthropic has no `n`: its adapter refuses before any network call, and the OpenAI deployment answers.
    text, headers = gw.ok(n=2)
    assert text == fake.reply
    assert headers["x-atajo-deployment"] == "m/1:openai"
    assert (
        gw.metric(
            "atajo_upstream_attempts_total",
            provider="anthropic",
            deployment="m/0:anthropic",
            outcome="unsupported_parameter",
        )
        == 1
    )


def test_only_deployment_refusing_the_request_is_a_400(gateway: GatewayFactory) -> None:
    gw = gateway({"models": {"m": {"deployments": [{"provider": "anthropic", "base_url": "http://127.0.0.1:9/v1"}]}}})
    err = gw.fails(n=2)
    assert err.status_code == 400
    assert err.code == "unsupported_parameter"


def test_open_circuit_answers_503_with_retry_after(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    fake, up = upstream()
    fake.always = Fault(status=500)
    gw = gateway(
        {
            "retry": {"max_retries": 0},
            "breaker": {"failure_threshold": 1, "cooldown_s": 30},
            "models": {"m": one(up.url)},
        }
    )
    assert gw.fails().status_code == 502
    gw.clock.advance(10)
    err = gw.fails()
    assert err.status_code == 503
    assert err.response.headers["retry-after"] == "20"  # the cooldown left, rounded up


def test_client_leaving_mid_stream_is_counted_and_the_upstream_released(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    fake, up = upstream()
    fake.reply = " ".join(f"word{i}" for i in range(40))
    fake.always = Fault(chunk_delay_s=0.5)  # 20 s to send it all: far past the deadlines below
    gw = gateway({"models": {"m": one(up.url)}})
    stream = gw.client.chat.completions.create(model="m", messages=HI, stream=True)
    first = next(iter(stream))
    assert first.choices
    stream.close()  # the client goes away after the first chunk
    deadline = time.monotonic() + 8
    while gw.metric("atajo_errors_total", route="chat", code="client_closed") < 1:
        assert time.monotonic() < deadline, "the gateway never noticed the client leaving"
        time.sleep(0.02)
    while fake.in_flight:  # the gateway drops the upstream stream instead of draining all 40 chunks
        assert time.monotonic() < deadline, "the upstream stream was never released"
        time.sleep(0.02)
