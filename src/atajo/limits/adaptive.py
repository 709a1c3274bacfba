"""Adaptive multipliers on every adaptive limit, recomputed every ``interval_s`` (``tick``):

- **load**: the gateway's own saturation (the largest of event-loop lag against ``max_loop_lag_s``, requests
  in flight against ``capacity``, and the process's CPU share), smoothed (a moving average). Above
  ``high_load`` (80 %) the target is ``overload_factor`` (0.5), below ``low_load`` (30 %) ``spare_factor``
  (1.5); in between the target holds (hysteresis: no flapping around a threshold).
- **client** (per key): over ``client_window_s``, a key with at least ``client_min_requests`` of which a share
  above ``problem_ratio`` were bad (rejected by the limiter, malformed, refused, flagged by a guard) is
  problematic (``problem_factor``, 0.6) until its share falls to ``clean_ratio`` or it goes quiet; a key clean
  for ``trusted_after_s`` with ``trusted_min_requests`` requests is trusted (``trusted_factor``, 1.2). A key's
  ``trust: trusted | untrusted`` pins it.
- **upstream** (per model): over ``upstream_window_s``, an error rate above ``upstream_error_high`` (10 %)
  targets ``upstream_factor`` (0.5); below ``upstream_error_low`` (2 %) back to 1; in between it holds.

Every multiplier moves towards its target by at most ``max_step`` per tick (bounded steps, smoothed). The
clock and the load signal are injected, so tests drive ticks and load by hand. State is per process; the
limits it scales may be shared (Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from atajo.core.context import Principal
from atajo.settings import AdaptiveSettings
from atajo.types import JSONObject

SLOTS = 30
"""Each window is counted in this many slots (bounded memory per key and model)."""


class LoadSignal(Protocol):
    def sample(self) -> float:
        """The gateway's saturation now: 0 idle, 1 full (may exceed 1)."""
        ...


@dataclass(slots=True)
class Factor:
    value: float = 1.0
    target: float = 1.0

    def step(self, max_step: float) -> None:
        self.value += max(-max_step, min(max_step, self.target - self.value))
        self.value = round(self.value, 6)


class Window:
    """Counts (total, bad) over a sliding window, in ``SLOTS`` slots."""

    __slots__ = ("_slots", "slot_s")

    def __init__(self, window_s: float) -> None:
        self.slot_s = window_s / SLOTS
        self._slots: dict[int, list[int]] = {}

    def add(self, now: float, bad: bool) -> None:
        slot = self._slots.setdefault(int(now // self.slot_s), [0, 0])
        slot[0] += 1
        slot[1] += bad

    def counts(self, now: float) -> tuple[int, int]:
        oldest = int(now // self.slot_s) - SLOTS + 1
        for old in [s for s in self._slots if s < oldest]:
            del self._slots[old]
        total = sum(s[0] for s in self._slots.values())
        return total, sum(s[1] for s in self._slots.values())


@dataclass(slots=True)
class ClientState:
    window: Window
    factor: Factor = field(default_factory=Factor)
    state: str = "normal"
    """normal, problematic or trusted."""
    clean_since: float = 0.0
    clean_requests: int = 0
    seen: float = 0.0


@dataclass(slots=True)
class UpstreamState:
    window: Window
    factor: Factor = field(default_factory=Factor)
    error_rate: float = 0.0


class Adaptive:
    def __init__(
        self,
        settings: AdaptiveSettings,
        load: LoadSignal,
        *,
        clock: Callable[[], float] = time.monotonic,
        model_key: Callable[[str], str] = lambda model: model,
    ) -> None:
        self.settings = settings
        self.load_signal = load
        self.clock = clock
        self.model_key = model_key
        """Model name → the name its state is kept under (unknown names share one, so memory stays bounded)."""
        self.load = Factor()
        self.load_sample = 0.0
        self.load_smoothed = 0.0
        self.clients: dict[str, ClientState] = {}
        self.upstreams: dict[str, UpstreamState] = {}
        self._task: asyncio.Task[None] | None = None
        self._ticks = 0

    # --- what the limiter asks ----------------------------------------------------------------------

    def factor(self, principal: Principal, model: str) -> float:
        if not self.settings.enabled:
            return 1.0
        return self.load.value * self.client_factor(principal) * self.upstream_factor(model)

    def client_factor(self, principal: Principal) -> float:
        s = self.settings
        if principal.trust == "trusted":
            return s.trusted_factor
        if principal.trust == "untrusted":
            return s.problem_factor
        client = self.clients.get(principal.key_name)
        return client.factor.value if client is not None else 1.0

    def upstream_factor(self, model: str) -> float:
        upstream = self.upstreams.get(self.model_key(model))
        return upstream.factor.value if upstream is not None else 1.0

    # --- what the gateway reports -------------------------------------------------------------------

    def record_request(self, principal: Principal, bad: bool) -> None:
        """One answered request of a key: ``bad`` when it was rejected, malformed, refused or flagged."""
        if principal.is_admin:
            return
        now = self.clock()
        client = self.clients.get(principal.key_name)
        if client is None:
            client = self.clients[principal.key_name] = ClientState(Window(self.settings.client_window_s))
            client.clean_since = now
        client.window.add(now, bad)
        client.seen = now
        if bad:
            client.clean_since = now
            client.clean_requests = 0
        else:
            client.clean_requests += 1

    def flag(self, principal: Principal) -> None:
        """A guard found something wrong with a request (a prompt-injection attempt, say)."""
        self.record_request(principal, bad=True)

    def record_upstream(self, model: str, ok: bool) -> None:
        name = self.model_key(model)
        upstream = self.upstreams.get(name)
        if upstream is None:
            upstream = self.upstreams[name] = UpstreamState(Window(self.settings.upstream_window_s))
        upstream.window.add(self.clock(), not ok)

    # --- the recomputation ----------------------------------------------------------------------------

    def tick(self) -> None:
        s = self.settings
        now = self.clock()
        self.load_sample = self.load_signal.sample()
        if self._ticks == 0:
            self.load_smoothed = self.load_sample  # the average starts from the first sample, not from idle
        else:
            self.load_smoothed += s.smoothing * (self.load_sample - self.load_smoothed)
        self._ticks += 1
        if self.load_smoothed > s.high_load:
            self.load.target = s.overload_factor
        elif self.load_smoothed < s.low_load:
            self.load.target = s.spare_factor
        self.load.step(s.max_step)
        for name, client in list(self.clients.items()):
            self._judge(client, now)
            client.factor.step(s.max_step)
            if client.factor.value == 1.0 and client.state == "normal" and now - client.seen > s.client_window_s:
                del self.clients[name]  # quiet and unremarkable: forget it
        for upstream in self.upstreams.values():
            total, errors = upstream.window.counts(now)
            if total >= s.upstream_min_calls:
                upstream.error_rate = errors / total
                if upstream.error_rate > s.upstream_error_high:
                    upstream.factor.target = s.upstream_factor
                elif upstream.error_rate < s.upstream_error_low:
                    upstream.factor.target = 1.0
            elif total == 0:
                upstream.error_rate, upstream.factor.target = 0.0, 1.0  # no calls, no evidence
            upstream.factor.step(s.max_step)

    def _judge(self, client: ClientState, now: float) -> None:
        s = self.settings
        total, bad = client.window.counts(now)
        ratio = bad / total if total else 0.0
        if total >= s.client_min_requests and ratio > s.problem_ratio:
            client.state = "problematic"
        elif client.state == "problematic" and (
            total == 0 or (total >= s.client_min_requests and ratio <= s.clean_ratio)
        ):
            client.state = "normal"  # behaving again, or gone quiet
        if client.state != "problematic":
            trusted = now - client.clean_since >= s.trusted_after_s and client.clean_requests >= s.trusted_min_requests
            client.state = "trusted" if trusted else "normal"
        client.factor.target = {"problematic": s.problem_factor, "trusted": s.trusted_factor}.get(client.state, 1.0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="atajo-adaptive-limits")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            self.tick()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def describe(self) -> JSONObject:
        return {
            "enabled": self.settings.enabled,
            "load": {
                "sample": round(self.load_sample, 4),
                "smoothed": round(self.load_smoothed, 4),
                "factor": self.load.value,
                "target": self.load.target,
            },
            "clients": {
                name: {"state": c.state, "factor": c.factor.value, "target": c.factor.target}
                for name, c in sorted(self.clients.items())
            },
            "upstreams": {
                name: {"error_rate": round(u.error_rate, 4), "factor": u.factor.value, "target": u.factor.target}
                for name, u in sorted(self.upstreams.items())
            },
        }


class GatewayLoad:
    """The real load signal: the largest of event-loop lag (a probe task that sleeps ``probe_s`` and measures the
    overshoot), requests in flight against capacity, and this process's CPU share since the last sample."""

    def __init__(
        self,
        in_flight: Callable[[], float],
        capacity: int,
        max_loop_lag_s: float,
        *,
        probe_s: float = 0.1,
    ) -> None:
        self.in_flight = in_flight
        self.capacity = capacity
        self.max_loop_lag_s = max_loop_lag_s
        self.probe_s = probe_s
        self.lag_s = 0.0
        self._last = (time.monotonic(), time.process_time())
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        last_wall, last_cpu = self._last
        self._last = (wall, cpu)
        cpu_share = (cpu - last_cpu) / (wall - last_wall) if wall > last_wall else 0.0
        lag, self.lag_s = self.lag_s, 0.0
        return max(self.in_flight() / self.capacity, lag / self.max_loop_lag_s, cpu_share)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._probe(), name="atajo-loop-lag")

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.probe_s)
            self.lag_s = max(self.lag_s, loop.time() - started - self.probe_s)  # the worst since the last sample

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
