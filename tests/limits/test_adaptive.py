"""The adaptive multipliers, driven by an injected clock and load signal, one tick at a time: each factor goes
down, holds, and recovers, in bounded steps; then the same through a running gateway (headers, admin, metrics)."""

from __future__ import annotations

import itertools

import httpx

from atajo.core.context import Principal
from atajo.limits.adaptive import Adaptive
from atajo.settings import AdaptiveSettings
from tests.conftest import GatewayFactory, openai_model
from tests.doubles import FakeClock
from tests.upstreams.live import LiveServer
from tests.upstreams.openai_server import Fault, OpenAIUpstream

SETTINGS = AdaptiveSettings()
CLIENT = Principal("app", tenant="acme")


class Load:
    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def sample(self) -> float:
        return self.value


def _ticks(adaptive: Adaptive, clock: FakeClock, n: int) -> list[float]:
    """Tick ``n`` times, a second apart; the load factor after each."""
    seen = []
    for _ in range(n):
        clock.advance(1)
        adaptive.tick()
        seen.append(adaptive.load.value)
    return seen


def test_high_load_halves_in_bounded_steps_and_low_load_raises_by_half() -> None:
    clock, load = FakeClock(), Load(0.5)
    adaptive = Adaptive(SETTINGS, load, clock=clock)
    assert _ticks(adaptive, clock, 5) == [1.0] * 5  # in the band from the start: nothing moves
    load.value = 1.0
    seen = _ticks(adaptive, clock, 20)
    assert all(abs(b - a) <= SETTINGS.max_step + 1e-9 for a, b in zip([1.0, *seen], seen, strict=False))
    assert seen[-1] == 0.5 and min(seen) == 0.5  # halved, never below
    assert seen.index(0.5) >= 5  # smoothed: the average has to cross 80 %, then 0.1 a tick
    load.value = 0.5  # back in the band: the target holds (no flapping)
    assert _ticks(adaptive, clock, 10)[-1] == 0.5
    load.value = 0.1  # recovery: below 30 % raises by half
    seen = _ticks(adaptive, clock, 30)
    assert seen[-1] == 1.5 and max(seen) == 1.5
    assert all(b >= a for a, b in itertools.pairwise(seen))  # monotonic on the way up


def test_a_load_hovering_around_the_threshold_does_not_flap() -> None:
    clock, load = FakeClock(), Load(0.79)
    adaptive = Adaptive(SETTINGS, load, clock=clock)
    _ticks(adaptive, clock, 30)
    seen = []
    for i in range(60):
        load.value = 0.86 if i % 2 else 0.74
        seen += _ticks(adaptive, clock, 1)
    changes = sum(1 for a, b, c in zip(seen, seen[1:], seen[2:], strict=False) if (b - a) * (c - b) < 0)
    assert changes == 0  # never reverses direction


def test_problematic_clients_get_40_percent_less_then_recover() -> None:
    clock = FakeClock()
    adaptive = Adaptive(SETTINGS, Load(0.5), clock=clock)
    other = Principal("other")
    for i in range(40):
        adaptive.record_request(CLIENT, bad=i % 2 == 0)  # half of them rejected or malformed
        adaptive.record_request(other, bad=False)
    _ticks(adaptive, clock, 10)
    assert adaptive.client_factor(CLIENT) == 0.6 and adaptive.clients["app"].state == "problematic"
    assert adaptive.client_factor(other) == 1.0
    assert adaptive.factor(CLIENT, "m") == 0.6
    clock.advance(SETTINGS.client_window_s)  # the bad requests age out of the window
    for _ in range(40):
        adaptive.record_request(CLIENT, bad=False)
    seen = [adaptive.client_factor(CLIENT)]
    for _ in range(10):
        clock.advance(1)
        adaptive.tick()
        seen.append(adaptive.client_factor(CLIENT))
    assert seen[-1] == 1.0 and all(b - a <= SETTINGS.max_step + 1e-9 for a, b in itertools.pairwise(seen))


def test_flagged_requests_count_as_bad() -> None:
    clock = FakeClock()
    adaptive = Adaptive(SETTINGS, Load(0.5), clock=clock)
    for i in range(30):
        (adaptive.flag if i % 3 == 0 else lambda p: adaptive.record_request(p, bad=False))(CLIENT)
    _ticks(adaptive, clock, 5)
    assert adaptive.clients["app"].state == "problematic"


def test_a_long_clean_history_earns_trust_and_one_bad_spell_loses_it() -> None:
    clock = FakeClock()
    adaptive = Adaptive(SETTINGS, Load(0.5), clock=clock)
    for _ in range(60):  # an hour, 20 clean requests a minute
        for _ in range(20):
            adaptive.record_request(CLIENT, bad=False)
        clock.advance(60)
        adaptive.tick()
    _ticks(adaptive, clock, 5)
    assert adaptive.clients["app"].state == "trusted" and adaptive.client_factor(CLIENT) == 1.2
    for _ in range(30):
        adaptive.record_request(CLIENT, bad=True)
    _ticks(adaptive, clock, 10)
    assert adaptive.client_factor(CLIENT) == 0.6


def test_a_pinned_trust_setting_wins() -> None:
    adaptive = Adaptive(SETTINGS, Load(0.5), clock=FakeClock())
    assert adaptive.client_factor(Principal("a", trust="trusted")) == 1.2
    assert adaptive.client_factor(Principal("b", trust="untrusted")) == 0.6


def test_an_upstream_error_rate_above_10_percent_lowers_that_models_limits_and_below_2_restores_them() -> None:
    clock = FakeClock()
    adaptive = Adaptive(SETTINGS, Load(0.5), clock=clock)
    for i in range(100):
        adaptive.record_upstream("flaky", ok=i % 5 != 0)  # 20 % errors
        adaptive.record_upstream("fine", ok=True)
    _ticks(adaptive, clock, 10)
    assert adaptive.upstream_factor("flaky") == 0.5 and adaptive.upstream_factor("fine") == 1.0
    assert adaptive.factor(CLIENT, "flaky") == 0.5 and adaptive.factor(CLIENT, "fine") == 1.0
    clock.advance(SETTINGS.upstream_window_s)
    for i in range(100):
        adaptive.record_upstream("flaky", ok=i != 0)  # 1 %
    _ticks(adaptive, clock, 2)
    assert 0.5 < adaptive.upstream_factor("flaky") < 1.0  # on its way, in bounded steps
    _ticks(adaptive, clock, 5)
    assert adaptive.upstream_factor("flaky") == 1.0


def test_disabled_means_every_multiplier_is_one() -> None:
    adaptive = Adaptive(AdaptiveSettings(enabled=False), Load(1.0), clock=FakeClock())
    for _ in range(30):
        adaptive.tick()
    assert adaptive.factor(Principal("x", trust="untrusted"), "m") == 1.0


def test_the_effective_limit_shows_in_headers_admin_and_metrics(gateway: GatewayFactory) -> None:
    clock = FakeClock()
    config = {
        "auth": {"master_key": "sk-m", "keys": [{"name": "app", "key": "sk-app", "limits": {"rpm": 100}}]},
        "limits": {"gateway": {"rpm": 1000}, "keys": {"rpm": 10, "adaptive": False}},
    }
    gw = gateway(config, clock=clock)
    adaptive = gw.gateway.services.adaptive
    assert adaptive is not None
    adaptive.load_signal = Load(0.05)  # idle: limits rise by half, step by step
    for _ in range(20):
        clock.advance(1)
        adaptive.tick()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-app"})
    assert resp.headers["x-ratelimit-limit-requests"] == "150"  # the key's 100, times 1.5
    limits = httpx.get(gw.url + "/admin/limits", headers={"authorization": "Bearer sk-m"}).json()
    assert limits["adaptive"]["load"]["factor"] == 1.5
    assert {"scope": "gateway", "name": "*", "rpm": 1000, "adaptive": True} in limits["configured"]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'atajo_ratelimit_multiplier{factor="load",name=""} 1.5' in metrics
    assert 'atajo_ratelimit_effective_limit{name="*",scope="gateway",unit="requests"} 1500.0' in metrics
    assert 'atajo_ratelimit_effective_limit{name="*",scope="key",unit="requests"} 10.0' in metrics  # pinned
    key = httpx.post(
        gw.url + "/admin/keys", json={"tenant": "acme", "limits": {"rpm": 40}}, headers={"authorization": "Bearer sk-m"}
    ).json()
    shown = httpx.get(gw.url + f"/admin/keys/{key['id']}", headers={"authorization": "Bearer sk-m"}).json()
    assert shown["effective"]["limits"] == {"rpm": 60} and shown["effective"]["factors"]["load"] == 1.5


def test_the_gateway_feeds_client_behaviour_and_upstream_errors(
    gateway: GatewayFactory, openai_upstream: tuple[OpenAIUpstream, LiveServer]
) -> None:
    upstream, server = openai_upstream
    upstream.always = Fault(status=500)
    clock = FakeClock()
    config = {
        "models": {"m": openai_model(server.url)},
        "auth": {"master_key": "sk-m", "keys": [{"name": "app", "key": "sk-app"}]},
        "retry": {"max_retries": 0},
        "breaker": {"failure_threshold": 1000},
    }
    gw = gateway(config, clock=clock)
    headers = {"authorization": "Bearer sk-app"}
    for _ in range(25):
        assert httpx.post(gw.url + "/v1/chat/completions", content=b"{not json", headers=headers).status_code == 400
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers).status_code == 502
    adaptive = gw.gateway.services.adaptive
    assert adaptive is not None
    clock.advance(1)
    gw.call(_tick(adaptive))
    described = httpx.get(gw.url + "/admin/limits", headers={"authorization": "Bearer sk-m"}).json()["adaptive"]
    assert described["clients"]["app"]["state"] == "problematic"  # half its requests were malformed
    assert described["upstreams"]["m"]["error_rate"] == 1.0 and described["upstreams"]["m"]["target"] == 0.5


async def _tick(adaptive: Adaptive) -> None:
    adaptive.tick()  # on the gateway's own loop, as its background task does


def test_the_upstream_error_rate_counts_every_attempt_retries_and_fallbacks_included(
    gateway: GatewayFactory, openai_upstream: tuple[OpenAIUpstream, LiveServer]
) -> None:
    upstream, server = openai_upstream
    clock = FakeClock()
    config = {
        "models": {"a": {**openai_model(server.url), "fallbacks": ["b"]}, "b": openai_model(server.url)},
        "auth": {"master_key": "sk-m", "keys": [{"name": "app", "key": "sk-app"}]},
        "retry": {"max_retries": 1, "backoff_base_ms": 0},
        "breaker": {"failure_threshold": 1000},
    }
    gw = gateway(config, clock=clock)
    adaptive = gw.gateway.services.adaptive
    assert adaptive is not None
    headers = {"authorization": "Bearer sk-app"}

    def calls(model: str) -> tuple[int, int]:
        """(attempts, failed attempts) recorded for ``model``."""
        state = adaptive.upstreams.get(model)
        return state.window.counts(clock()) if state is not None else (0, 0)

    # `a` fails, is retried and fails again; its fallback `b` answers: one request, three attempts.
    upstream.faults.extend([Fault(status=500), Fault(status=500)])
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200 and answer.headers["x-atajo-model"] == "b"
    assert calls("a") == (2, 2) and calls("b") == (1, 0)  # not one success under `a`, as the final outcome said
    # A stream's attempt is told when it ends: cut by the provider after its first chunks, a failure of `b`.
    upstream.faults.append(Fault(stream_break_after=2))
    streamed = httpx.post(gw.url + "/v1/chat/completions", json={**body, "model": "b", "stream": True}, headers=headers)
    assert streamed.status_code == 200
    assert calls("b") == (2, 1)
    # A rejected request (400) says nothing about the provider's health: not counted.
    upstream.faults.append(Fault(status=400))
    assert httpx.post(gw.url + "/v1/chat/completions", json={**body, "model": "b"}, headers=headers).status_code == 400
    assert calls("b") == (2, 1)
