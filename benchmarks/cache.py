"""Cache benchmark: what a hit costs per tier, memory hits under concurrency, a replay workload, the miss path.

Starts ``python -m atajo serve`` subprocesses (one worker, log level warning), each from its own generated
config under a temporary directory, on free 127.0.0.1 ports, and measures:

- hits: one gateway per tier chain with just that tier (memory, redis, sqlite, postgresql), so every hit
  comes from it. K distinct requests are primed, then sequential hits are timed on one keep-alive
  connection (concurrency 1), the chains interleaved in rounds; every answer must say ``hit-<tier>``.
  Also: the gateway's own time per hit (``x-atajo-overhead-ms``), the tier's lookup time (from
  ``atajo_cache_lookup_duration_seconds``) and, as the floor of any request, ``GET /health``;
- concurrent: memory hits with ``wrk -t1 -c16``, both as a closed loop (every connection sends its next
  request as soon as the answer is in: the throughput, and the latency at saturation) and paced (each
  connection waits a random think time between requests, tuned to a fixed total rate below saturation:
  the latency a client sees at that load);
- replay: a stream of requests of which 80 % repeat earlier ones, sent at concurrency 16 to a gateway whose
  upstream is the simulated provider with a realistic latency and a memory + sqlite chain; upstream calls
  (``atajo_upstream_attempts_total``) against unique requests, coalesced requests, and the latency of the
  workload against the same unique requests with the cache bypassed;
- miss: a cache miss (memory + sqlite chain, every request unique) against the same gateway with the cache
  disabled, both proxying to the instant local upstream of ``run.py`` (``upstream.py``), at concurrency 1.

Entries are isolated by a tenant (an API key made for the run) and a namespace per section, and the tenant
is flushed through ``POST /v1/cache/flush`` (master key) at the end; the SQLite file lives in the temporary
directory. Before each measurement the runner waits (within a bound) for other processes to go quiet, and
reports their load. Prints progress on stderr and Markdown at the end; ``--write docs/benchmarks.md``
replaces the cache section of that document. Talks only to 127.0.0.1.

    python benchmarks/cache.py                              # about 3 minutes
    python benchmarks/cache.py --write docs/benchmarks.md   # and record the results
    python benchmarks/cache.py --sections hits --tiers memory,redis   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import http.client
import importlib.util
import json
import math
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/cache.py` finds `benchmarks`

from benchmarks.run import (
    _UNIT_S,
    _WRK_NON2XX,
    _WRK_REQUESTS,
    _WRK_RPS,
    _WRK_SOCKET,
    CHAT_PATH,
    HOST,
    JSON_HEADERS,
    Client,
    Dist,
    Fleet,
    Quiet,
    Server,
    _interrupt,
    _rounds,
    _verdict,
    busy_cpu_seconds,
    children_cpu_seconds,
    command_line,
    cpu_seconds,
    environment,
    median,
    publish,
    replace_marked,
    say,
    self_cpu_seconds,
    wait_ready,
)

MODEL = "bench-cache"
MASTER_KEY = "sk-bench-master-not-a-secret"
BENCH_KEY = "sk-bench-cache-not-a-secret"
TTL_S = 3600
SECTIONS = ("hits", "concurrent", "replay", "miss")
TIERS = ("memory", "redis", "sqlite", "postgresql")
EXPECTED_HIT = {"memory": "hit-memory", "redis": "hit-redis", "sqlite": "hit-sql", "postgresql": "hit-sql"}
METRIC_TIER = {"memory": "memory", "redis": "redis", "sqlite": "sql", "postgresql": "sql"}
SERVICE_PROCESSES = frozenset({"redis-server", "postgres"})

FAST_SIMULATED = {"ttft_ms": 0, "tokens_per_s": 1_000_000, "jitter": 0, "output_tokens": 60}

BEGIN = "<!-- cache-results:begin -->"
END = "<!-- cache-results:end -->"
DOC_COMMAND = "python benchmarks/cache.py --write docs/benchmarks.md"
_STARTED = time.monotonic()

# --- goals (from the issue) --------------------------------------------------------------------------

SHARED_HIT_P50_MAX_MS = 3.0
"""Redis and SQLite hits, concurrency 1, median."""
MEMORY_C16_P50_MAX_MS = 1.0
MEMORY_C16_MIN_RPS = 5000.0
REPLAY_EXTRA_CALLS_MAX = 0.02
"""Upstream calls may exceed the unique requests by this share."""
REPLAY_P50_SPEEDUP_MIN = 10.0


# --- configuration -----------------------------------------------------------------------------------


def tier_url(tier: str, args: argparse.Namespace, workdir: Path) -> str:
    if tier == "memory":
        return "memory://"
    if tier == "redis":
        return str(args.redis_url)
    if tier == "sqlite":
        return f"sqlite:///{workdir / 'cache.db'}"
    return str(args.postgres_url)


def write_config(path: Path, tenant: str, tiers: Sequence[str] | None, deployment: dict[str, Any]) -> Path:
    """A gateway config (JSON is YAML): the master key, one key of the run's tenant, the cache chain
    (None: cache disabled) and one model with one deployment."""
    cache: dict[str, Any] = (
        {"enabled": False} if tiers is None else {"tiers": [{"url": url, "ttl_s": TTL_S} for url in tiers]}
    )
    config = {
        "log_level": "warning",
        "server": {"access_log": False},
        "auth": {"master_key": MASTER_KEY, "keys": [{"name": "bench", "key": BENCH_KEY, "tenant": tenant}]},
        "cache": cache,
        "models": {MODEL: {"deployments": [deployment]}},
    }
    path.write_text("# generated by benchmarks/cache.py\n" + json.dumps(config, indent=2) + "\n")
    return path


def simulated(settings: dict[str, Any]) -> dict[str, Any]:
    return {"provider": "simulated", "simulated": settings}


def chat_body(text: str) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]}, separators=(",", ":")).encode()


def reachable(url: str) -> str | None:
    """Why the server of a redis:// or postgresql:// URL cannot be used, or None."""
    module = "redis" if url.startswith("redis") else "asyncpg"
    if importlib.util.find_spec(module) is None:
        return f"the {module} package is not installed"
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (6379 if module == "redis" else 5432)
    try:
        with socket.create_connection((parts.hostname or HOST, port), timeout=1):
            return None
    except OSError as exc:
        return f"nothing answers on {parts.hostname}:{port} ({exc.strerror or exc})"


# --- clients ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    ms: float
    cache: str
    overhead_ms: float


class Caller(Client):
    """run.py's keep-alive client, with the run's headers and any body."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        super().__init__(port)
        self.headers = {**JSON_HEADERS, **headers}

    def chat(self, body: bytes) -> Reply:
        started = time.perf_counter_ns()
        self.conn.request("POST", CHAT_PATH, body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter_ns() - started
        if resp.status != 200 or b'"choices"' not in data:
            raise RuntimeError(f"port {self.port}: HTTP {resp.status}: {data[:300]!r}")
        overhead = resp.getheader("x-atajo-overhead-ms")
        return Reply(elapsed / 1e6, resp.getheader("x-atajo-cache") or "", float(overhead) if overhead else math.nan)

    def get(self, path: str) -> float:
        started = time.perf_counter_ns()
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter_ns() - started
        if resp.status != 200:
            raise RuntimeError(f"port {self.port}: GET {path}: HTTP {resp.status}: {data[:300]!r}")
        return elapsed / 1e6


def admin_post(port: int, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        headers = {**JSON_HEADERS, "authorization": f"Bearer {MASTER_KEY}"}
        conn.request("POST", path, json.dumps(payload).encode(), headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}: {data[:300]!r}")
        answer: dict[str, Any] = json.loads(data)
        return answer
    finally:
        conn.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> Samples:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    samples: Samples = []
    for line in text.splitlines():
        if m := _SAMPLE.match(line):
            samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == want for k, want in labels.items())
    )


# --- load accounting ---------------------------------------------------------------------------------


def service_cpu_seconds() -> float:
    """CPU of the Redis and PostgreSQL servers' processes (they work for the redis and postgresql tiers)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (proc / "comm").read_text().strip() in SERVICE_PROCESSES:
                total += cpu_seconds(int(proc.name))
    return total


class Load:
    """Cores used over a span by processes other than ours (our servers, this process, its finished children
    such as wrk) and other than the Redis and PostgreSQL servers, which are counted apart."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = servers
        self.other_cores = math.nan
        self.service_cores = math.nan

    def _ours(self) -> float:
        return sum(cpu_seconds(s.pid) for s in self.servers) + self_cpu_seconds() + children_cpu_seconds()

    def __enter__(self) -> Load:
        self._busy, self._ours0, self._services = busy_cpu_seconds(), self._ours(), service_cpu_seconds()
        self._wall = time.monotonic()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        wall = max(1e-6, time.monotonic() - self._wall)
        services = service_cpu_seconds() - self._services
        ours = self._ours() - self._ours0
        self.service_cores = max(0.0, services / wall)
        self.other_cores = max(0.0, (busy_cpu_seconds() - self._busy - ours - services) / wall)


# --- results -----------------------------------------------------------------------------------------


@dataclass
class TierHits:
    tier: str
    url: str
    rtt: Dist
    server: Dist
    """The gateway's own time per hit (x-atajo-overhead-ms)."""
    lookup_ms: float
    """Mean time of the tier's lookup on a hit, from atajo_cache_lookup_duration_seconds."""
    non_hits: int


@dataclass
class WrkRun:
    mode: str
    """closed (as fast as answers come) or paced (think time between requests)."""
    round: int
    rps: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    cpu_ms_per_request: float
    busy_cores: float
    """The gateway process's CPU over the run, in cores (1.0: one core saturated)."""
    think_ms: float
    hits: int
    misses: int
    other_cores: float


@dataclass
class Replay:
    requests: int
    unique: int
    concurrency: int
    seed: int
    upstream_calls: int
    coalesced: int
    statuses: dict[str, int]
    workload: Dist
    workload_s: float
    upstream: Dist
    """The unique requests again, cache bypassed."""
    upstream_s: float
    bypass_calls: int


@dataclass
class Miss:
    requests: int
    cache: Dist
    """memory + sqlite chain."""
    memory: Dist | None
    """memory-only chain, to tell the SQLite tier's share."""
    off: Dist
    added: Dist
    cpu_ms: dict[str, float]
    non_misses: int


@dataclass
class Results:
    started_utc: str
    command: str
    environment: dict[str, str]
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    hits: dict[str, TierHits] = field(default_factory=dict)
    floor: Dist | None = None
    concurrent: list[WrkRun] = field(default_factory=list)
    replay: Replay | None = None
    miss: Miss | None = None
    other_cores: dict[str, list[float]] = field(default_factory=dict)
    """Per section, other processes' load over each measured span."""
    service_cores: dict[str, list[float]] = field(default_factory=dict)
    flushed: dict[str, int] = field(default_factory=dict)
    quiet_waited_s: float = 0.0
    elapsed_s: float = 0.0

    def load(self, section: str, load: Load) -> None:
        self.other_cores.setdefault(section, []).append(load.other_cores)
        self.service_cores.setdefault(section, []).append(load.service_cores)


# --- the run's gateways ------------------------------------------------------------------------------


class Gateways:
    """Starts gateways from generated configs, and flushes the run's tenant from shared tiers before stopping."""

    def __init__(self, fleet: Fleet, tenant: str, res: Results) -> None:
        self.fleet = fleet
        self.tenant = tenant
        self.res = res
        self.shared: dict[str, Server] = {}

    def start(self, name: str, tiers: Sequence[str] | None, deployment: dict[str, Any]) -> Server:
        config = write_config(self.fleet.workdir / f"{name}.yaml", self.tenant, tiers, deployment)
        server = self.fleet.gateway(config)
        server.name = f"gateway-{name}"
        if tiers and any(not url.startswith(("memory:", "sqlite:")) for url in tiers):
            self.shared[name] = server
        return server

    def stop(self, *servers: Server) -> None:
        for server in servers:
            name = next((n for n, s in self.shared.items() if s is server), None)
            if name is not None and server.proc.poll() is None:
                try:
                    answer = admin_post(server.port, "/v1/cache/flush", {"tenant": self.tenant})
                    self.res.flushed[name] = int(answer.get("dropped", 0))
                except (OSError, RuntimeError, http.client.HTTPException, ValueError) as exc:
                    say(f"could not flush tenant {self.tenant} through {name}: {exc}")
                del self.shared[name]
            self.fleet.stop(server)


# --- 1. hits per tier at concurrency 1 -----------------------------------------------------------------


def prime(client: Caller, bodies: Sequence[bytes], expected: str, timeout_s: float = 20.0) -> None:
    """Send every body once, then until each is answered as ``expected`` (writes land behind the response)."""
    for body in bodies:
        client.chat(body)
    pending = list(bodies)
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = [body for body in pending if client.chat(body).cache != expected]
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} primed requests still not answered {expected} after {timeout_s} s")
            time.sleep(0.05)


def measure_hits(
    gateways: dict[str, Server], urls: dict[str, str], args: argparse.Namespace, quiet: Quiet, res: Results, ns: str
) -> None:
    headers = {"authorization": f"Bearer {BENCH_KEY}", "x-atajo-cache-namespace": ns}
    bodies = [chat_body(f"Cached question number {i}: what does the cache cost?") for i in range(args.hit_keys)]
    clients = {tier: Caller(server.port, headers) for tier, server in gateways.items()}
    floor_client = Caller(next(iter(gateways.values())).port, headers)
    rtt: dict[str, list[float]] = {tier: [] for tier in gateways}
    server_ms: dict[str, list[float]] = {tier: [] for tier in gateways}
    non_hits = dict.fromkeys(gateways, 0)
    floor: list[float] = []
    try:
        for tier, client in clients.items():
            prime(client, bodies, EXPECTED_HIT[tier])
            for i in range(args.hit_warmup):
                client.chat(bodies[i % len(bodies)])
            say(f"hits: {tier}: {len(bodies)} requests primed, every one answered {EXPECTED_HIT[tier]}")
        for _ in range(args.hit_warmup):
            floor_client.get("/health")
        before = {tier: scrape(server.port) for tier, server in gateways.items()}
        sent = 0
        for r, n in enumerate(_rounds(args.hit_requests, args.hit_rounds)):
            quiet()
            with Load(list(gateways.values())) as load:
                for tier, client in clients.items():
                    gc.collect()
                    gc.disable()
                    try:
                        for j in range(sent, sent + n):
                            reply = client.chat(bodies[j % len(bodies)])
                            if reply.cache == EXPECTED_HIT[tier]:
                                rtt[tier].append(reply.ms)
                                server_ms[tier].append(reply.overhead_ms)
                            else:
                                non_hits[tier] += 1
                    finally:
                        gc.enable()
                gc.collect()
                gc.disable()
                try:
                    floor.extend(floor_client.get("/health") for _ in range(n))
                finally:
                    gc.enable()
            res.load("hits", load)
            sent += n
            say(f"hits: round {r + 1}: {sent}/{args.hit_requests} per tier (other load {load.other_cores:.2f} cores)")
        after = {tier: scrape(server.port) for tier, server in gateways.items()}
    finally:
        for client in [*clients.values(), floor_client]:
            client.close()
    for tier in gateways:
        label = METRIC_TIER[tier]
        name = "atajo_cache_lookup_duration_seconds"
        count = metric(after[tier], f"{name}_count", tier=label) - metric(before[tier], f"{name}_count", tier=label)
        total = metric(after[tier], f"{name}_sum", tier=label) - metric(before[tier], f"{name}_sum", tier=label)
        lookup_ms = 1000 * total / count if count else math.nan
        res.hits[tier] = TierHits(
            tier, urls[tier], Dist.of(rtt[tier]), Dist.of(server_ms[tier]), lookup_ms, non_hits[tier]
        )
        d = res.hits[tier].rtt
        say(
            f"hits: {tier}: p50 {d.p50:.3f} ms, p99 {d.p99:.3f} ms (gateway {res.hits[tier].server.p50:.3f} ms, "
            f"lookup {lookup_ms:.3f} ms){f'; {non_hits[tier]} NOT HITS' if non_hits[tier] else ''}"
        )
    res.floor = Dist.of(floor)


# --- 2. memory hits at concurrency 16 ------------------------------------------------------------------

_DONE_LINE = re.compile(r"CACHEBENCH (.*)")


def write_wrk_lua(path: Path, body: bytes | None, ns: str, think_ms: float | None) -> Path:
    """POST the same body (None: GET the URL); with ``think_ms``, an exponential think time (mean think_ms)
    before each request. ``done`` prints wrk's latency percentiles in microseconds."""
    lines = []
    if body is not None:
        lines += [
            'wrk.method = "POST"',
            f"wrk.body = [==[{body.decode()}]==]",
            'wrk.headers["Content-Type"] = "application/json"',
            f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"',
            f'wrk.headers["x-atajo-cache-namespace"] = "{ns}"',
        ]
    if think_ms is not None:
        lines += [
            "math.randomseed(os.time())",
            f"local think = {think_ms:.4f}",
            "function delay()",
            "  return math.floor(-math.log(1 - math.random()) * think + 0.5)",
            "end",
        ]
    lines += [
        "function done(summary, latency, requests)",
        '  io.write(string.format("CACHEBENCH p50=%.0f p90=%.0f p99=%.0f p999=%.0f mean=%.1f max=%.0f\\n",',
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),",
        "    latency.mean, latency.max))",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(
    url: str, lua: Path, connections: int, duration_s: float, server: Server, watched: Sequence[Server]
) -> tuple[dict[str, float], Samples, Samples, float, Load]:
    """One wrk run: (figures, metrics before, metrics after, server CPU seconds, load)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "5s", "-s", str(lua), url]
    before = scrape(server.port)
    cpu_before = cpu_seconds(server.pid)
    with Load(watched) as load:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    cpu = cpu_seconds(server.pid) - cpu_before
    after = scrape(server.port)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    m_req, m_rps, m_done = _WRK_REQUESTS.search(out.stdout), _WRK_RPS.search(out.stdout), _DONE_LINE.search(out.stdout)
    if m_req is None or m_rps is None or m_done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out.stdout}\n{out.stderr}")
    figures = {k: float(v) for k, v in (kv.split("=") for kv in m_done.group(1).split())}
    figures["requests"] = int(m_req.group(1))
    figures["seconds"] = float(m_req.group(2)) * _UNIT_S[m_req.group(3)]
    figures["rps"] = float(m_rps.group(1))
    errors = 0
    if m_sock := _WRK_SOCKET.search(out.stdout):
        errors += sum(int(g) for g in m_sock.groups())
    if m_bad := _WRK_NON2XX.search(out.stdout):
        errors += int(m_bad.group(1))
    figures["errors"] = errors
    return figures, before, after, cpu, load


def measure_concurrent(
    server: Server, body: bytes, ns: str, args: argparse.Namespace, quiet: Quiet, res: Results, c1_p50_ms: float
) -> None:
    workdir = Path(server.log_path).parent
    url = f"http://{HOST}:{server.port}{CHAT_PATH}"
    c = args.connections
    closed = write_wrk_lua(workdir / "closed.lua", body, ns, None)
    floor = write_wrk_lua(workdir / "floor.lua", None, ns, None)
    floor_url = f"http://{HOST}:{server.port}/health"
    cycle_ms = 1000 * c / args.paced_rate  # each connection's time from one request to the next
    think = max(0.0, cycle_ms - c1_p50_ms)

    def one(mode: str, r: int, duration_s: float) -> WrkRun:
        nonlocal think
        lua = {"closed": closed, "floor": floor}.get(mode) or write_wrk_lua(workdir / "paced.lua", body, ns, think)
        f, before, after, cpu, load = wrk(floor_url if mode == "floor" else url, lua, c, duration_s, server, [server])
        hits = metric(after, "atajo_cache_lookups_total", tier="memory", outcome="hit") - metric(
            before, "atajo_cache_lookups_total", tier="memory", outcome="hit"
        )
        misses = metric(after, "atajo_cache_lookups_total", outcome="miss") - metric(
            before, "atajo_cache_lookups_total", outcome="miss"
        )
        requests = int(f["requests"])
        run = WrkRun(
            mode,
            r,
            f["rps"],
            requests,
            f["p50"] / 1000,
            f["p90"] / 1000,
            f["p99"] / 1000,
            f["p999"] / 1000,
            f["mean"] / 1000,
            f["max"] / 1000,
            int(f["errors"]),
            1000 * cpu / requests if requests else math.nan,
            cpu / f["seconds"] if f["seconds"] else math.nan,
            think if mode == "paced" else 0.0,
            int(hits),
            int(misses),
            load.other_cores,
        )
        if mode == "paced" and f["rps"] > 0:  # steer the think time toward the wanted rate for the next run
            think = max(0.0, think + cycle_ms - 1000 * c / f["rps"])
        return run

    say(f"concurrent: warm-up, closed loop ({args.wrk_warmup:g} s) and paced ({args.wrk_warmup:g} s)")
    one("closed", 0, args.wrk_warmup)
    one("paced", 0, args.wrk_warmup)
    for r in range(1, args.wrk_rounds + 1):
        for mode in ("closed", "paced", "floor"):
            quiet()
            run = one(mode, r, args.wrk_duration)
            res.concurrent.append(run)
            res.other_cores.setdefault("concurrent", []).append(run.other_cores)
            say(
                f"concurrent: round {r}/{args.wrk_rounds} {mode}: {run.rps:,.0f} req/s, p50 {run.p50_ms:.3f} ms, "
                f"p99 {run.p99_ms:.3f} ms, {run.cpu_ms_per_request:.3f} ms CPU/request ({run.busy_cores:.2f} cores), "
                f"{run.misses} misses "
                f"(other load {run.other_cores:.2f} cores){f'; {run.errors} ERRORS' if run.errors else ''}"
            )


# --- 3. replay workload --------------------------------------------------------------------------------


def replay_stream(total: int, unique: int, seed: int) -> list[int]:
    """Every one of ``unique`` prompts once, the rest repeats drawn uniformly, shuffled with ``seed``."""
    rng = random.Random(seed)
    stream = list(range(unique)) + [rng.randrange(unique) for _ in range(total - unique)]
    rng.shuffle(stream)
    return stream


async def _send_all(
    port: int, bodies: Sequence[bytes], headers: dict[str, str], concurrency: int
) -> tuple[list[float], list[str], int, float]:
    """Send the bodies in order from ``concurrency`` workers on as many keep-alive connections: (latencies in
    ms, x-atajo-cache values, answers marked coalesced, seconds)."""
    url = f"http://{HOST}:{port}{CHAT_PATH}"
    latencies = [math.nan] * len(bodies)
    statuses = [""] * len(bodies)
    coalesced = 0
    queue = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal coalesced
            for i in queue:
                started = time.perf_counter_ns()
                async with session.post(url, data=bodies[i], headers=headers) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"replay: HTTP {resp.status}: {data[:300]!r}")
                    statuses[i] = resp.headers.get("x-atajo-cache", "")
                    coalesced += resp.headers.get("x-atajo-coalesced") == "true"
                latencies[i] = (time.perf_counter_ns() - started) / 1e6

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return latencies, statuses, coalesced, elapsed


def measure_replay(server: Server, ns: str, args: argparse.Namespace, quiet: Quiet, res: Results) -> None:
    stream = replay_stream(args.replay_requests, args.replay_unique, args.seed)
    prompts = [
        chat_body(f"Replayed question {k} of the workload: summarise item {k}.") for k in range(args.replay_unique)
    ]
    headers = {**JSON_HEADERS, "authorization": f"Bearer {BENCH_KEY}", "x-atajo-cache-namespace": ns}
    c = args.connections

    quiet()
    before = scrape(server.port)
    with Load([server]) as load:
        latencies, statuses, _, elapsed = asyncio.run(_send_all(server.port, [prompts[k] for k in stream], headers, c))
    time.sleep(0.2)
    after = scrape(server.port)
    res.load("replay", load)
    calls = int(metric(after, "atajo_upstream_attempts_total") - metric(before, "atajo_upstream_attempts_total"))
    coalesced = int(metric(after, "atajo_coalesced_requests_total") - metric(before, "atajo_coalesced_requests_total"))
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    say(
        f"replay: {len(stream)} requests ({args.replay_unique} unique) in {elapsed:.1f} s: {calls} upstream calls, "
        f"{coalesced} coalesced, {counts} (other load {load.other_cores:.2f} cores)"
    )

    first_seen = list(dict.fromkeys(stream))
    bypass = {**headers, "cache-control": "no-cache, no-store"}
    quiet()
    before = scrape(server.port)
    with Load([server]) as load:
        base, base_statuses, _, base_elapsed = asyncio.run(
            _send_all(server.port, [prompts[k] for k in first_seen], bypass, c)
        )
    after = scrape(server.port)
    res.load("replay", load)
    bypass_calls = int(metric(after, "atajo_upstream_attempts_total") - metric(before, "atajo_upstream_attempts_total"))
    if any(s != "bypass" for s in base_statuses):
        res.notes.append("replay: some bypassed requests were not answered `bypass`")
    res.replay = Replay(
        len(stream),
        args.replay_unique,
        c,
        args.seed,
        calls,
        coalesced,
        dict(sorted(counts.items())),
        Dist.of(latencies),
        elapsed,
        Dist.of(base),
        base_elapsed,
        bypass_calls,
    )
    say(
        f"replay: workload p50 {res.replay.workload.p50:.2f} ms, p99 {res.replay.workload.p99:.1f} ms; "
        f"cache bypassed p50 {res.replay.upstream.p50:.1f} ms (other load {load.other_cores:.2f} cores)"
    )


# --- 4. the miss path ----------------------------------------------------------------------------------


def measure_miss(servers: dict[str, Server], ns: str, args: argparse.Namespace, quiet: Quiet, res: Results) -> None:
    headers = {"authorization": f"Bearer {BENCH_KEY}", "x-atajo-cache-namespace": ns}
    clients = {name: Caller(server.port, headers) for name, server in servers.items()}
    samples: dict[str, list[float]] = {name: [] for name in servers}
    non_misses = 0
    serial = 0

    def body() -> bytes:
        nonlocal serial
        serial += 1
        return chat_body(f"Unique question {serial:08d}: is this answer cached anywhere yet?")

    try:
        for client in clients.values():
            for _ in range(args.miss_warmup):
                client.chat(body())
        cpu_before = {name: cpu_seconds(server.pid) for name, server in servers.items()}
        done = 0
        for r, n in enumerate(_rounds(args.miss_requests, args.miss_rounds)):
            quiet()
            with Load(list(servers.values())) as load:
                bodies = [body() for _ in range(n)]  # the same unique bodies to every gateway
                for name, client in clients.items():
                    gc.collect()
                    gc.disable()
                    try:
                        for b in bodies:
                            reply = client.chat(b)
                            samples[name].append(reply.ms)
                            non_misses += name != "off" and reply.cache != "miss"
                    finally:
                        gc.enable()
            res.load("miss", load)
            done += n
            say(f"miss: round {r + 1}: {done}/{args.miss_requests} per path (other load {load.other_cores:.2f} cores)")
        time.sleep(0.2)  # let the last writes behind the response finish, so their CPU is counted
        cpu = {name: cpu_seconds(server.pid) - cpu_before[name] for name, server in servers.items()}
    finally:
        for client in clients.values():
            client.close()
    cache, off = Dist.of(samples["cache"]), Dist.of(samples["off"])
    res.miss = Miss(
        args.miss_requests,
        cache,
        Dist.of(samples["memory"]) if "memory" in samples else None,
        off,
        cache.minus(off),
        {name: 1000 * s / len(samples[name]) for name, s in cpu.items()},
        non_misses,
    )
    say(f"miss: a miss adds {res.miss.added.p50:.3f} ms at p50, {res.miss.added.p99:.3f} ms at p99")


# --- report --------------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _median_of(runs: Sequence[WrkRun], attr: str) -> float:
    return median([float(getattr(r, attr)) for r in runs]) if runs else math.nan


def goals(res: Results) -> list[tuple[str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, bool | None]] = []
    for tier, label in (("redis", "Redis"), ("sqlite", "SQLite")):
        h = res.hits.get(tier)
        rows.append(
            (
                f"{label} hit, concurrency 1, p50",
                f"< {SHARED_HIT_P50_MAX_MS:g} ms",
                f"{h.rtt.p50:.3f} ms" if h else "-",
                h.rtt.p50 < SHARED_HIT_P50_MAX_MS if h else None,
            )
        )
    closed = [r for r in res.concurrent if r.mode == "closed"]
    paced = [r for r in res.concurrent if r.mode == "paced"]
    rps, closed_p50, paced_p50 = _median_of(closed, "rps"), _median_of(closed, "p50_ms"), _median_of(paced, "p50_ms")
    rows.append(
        (
            "Memory hits, one worker, c=16 closed loop: throughput",
            f">= {MEMORY_C16_MIN_RPS:,.0f} hits/s",
            f"{rps:,.0f} hits/s" if closed else "-",
            rps >= MEMORY_C16_MIN_RPS if closed else None,
        )
    )
    rows.append(
        (
            "Memory hits, c=16 closed loop (saturated): p50",
            "none: about 16 / throughput (Little's law); the paced row below is the goal",
            f"{closed_p50:.3f} ms" if closed else "-",
            None,
        )
    )
    offered = _median_of(paced, "rps")
    rows.append(
        (
            f"Memory hits, c=16 paced at {offered:,.0f} req/s: p50" if paced else "Memory hits, c=16 paced: p50",
            f"< {MEMORY_C16_P50_MAX_MS:g} ms",
            f"{paced_p50:.3f} ms" if paced else "-",
            paced_p50 < MEMORY_C16_P50_MAX_MS if paced else None,
        )
    )
    rp = res.replay
    rows.append(
        (
            "Replay: upstream calls vs unique requests",
            f"<= +{100 * REPLAY_EXTRA_CALLS_MAX:g} %",
            f"{rp.upstream_calls} calls for {rp.unique} unique ({100 * (rp.upstream_calls / rp.unique - 1):+.1f} %)"
            if rp
            else "-",
            rp.upstream_calls <= rp.unique * (1 + REPLAY_EXTRA_CALLS_MAX) if rp else None,
        )
    )
    speedup = rp.upstream.p50 / rp.workload.p50 if rp else math.nan
    rows.append(
        (
            "Replay: p50 against the upstream's p50",
            f"> {REPLAY_P50_SPEEDUP_MIN:g}x lower",
            f"{_ms(rp.workload.p50, 2)} ms vs {_ms(rp.upstream.p50, 1)} ms ({speedup:,.0f}x)" if rp else "-",
            speedup > REPLAY_P50_SPEEDUP_MIN if rp else None,
        )
    )
    return rows


def _load_summary(values: Sequence[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    return f"{median(clean):.2f} / {max(clean):.2f}" if clean else "-"


def render(res: Results) -> str:
    p = res.params
    out: list[str] = [f"Measured {res.started_utc} in {res.elapsed_s:.0f} s with:\n", f"```sh\n{res.command}\n```\n"]
    out.append("| Machine | |\n| --- | --- |")
    out.extend(f"| {k} | {v} |" for k, v in res.environment.items())
    for section, values in res.other_cores.items():
        out.append(f"| other processes' CPU during {section} (median / max, cores) | {_load_summary(values)} |")
    for section, values in res.service_cores.items():
        if any(v > 0.005 for v in values if not math.isnan(v)):
            out.append(f"| Redis + PostgreSQL servers' CPU during {section} (median / max) | {_load_summary(values)} |")
    if res.quiet_waited_s >= 1:
        out.append(f"| time spent waiting for other processes to go quiet | {res.quiet_waited_s:.0f} s |")
    out.append("")
    out.append("### Goals\n")
    out.append("| Goal | Target | Measured | Result |\n| --- | --- | --- | --- |")
    out.extend(
        f"| {g} | {t} | {m} | {'for reference' if t.startswith('none') else _verdict(ok)} |"
        for g, t, m, ok in goals(res)
    )
    out.append("")
    if res.notes:
        out.extend(f"- {note}" for note in res.notes)
        out.append("")
    if res.hits:
        out.append(
            f"### Hits per tier, concurrency 1\n\nOne gateway per chain holding just that tier. {p['hit_keys']} "
            f"distinct requests primed, then {p['hit_requests']} sequential hits per tier cycling through them on "
            f"one keep-alive connection, in {p['hit_rounds']} rounds interleaving the tiers, after "
            f"{p['hit_warmup']} warm-up hits. Client round trip in ms; *gateway* is its own time per hit "
            "(`x-atajo-overhead-ms`), *lookup* the tier's mean lookup time on the server "
            "(`atajo_cache_lookup_duration_seconds`). `GET /health` on the same kind of connection is the floor "
            "of any request to the gateway.\n"
        )
        out.append("| Tier | p50 | p90 | p99 | mean | gateway p50 | lookup mean | answers not a hit |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for tier, h in res.hits.items():
            d = h.rtt
            out.append(
                f"| {tier} (`{h.url if tier != 'sqlite' else 'sqlite:///TMP/cache.db'}`) | {_ms(d.p50)} | "
                f"{_ms(d.p90)} | {_ms(d.p99)} | {_ms(d.mean)} | {_ms(h.server.p50)} | {_ms(h.lookup_ms)} | "
                f"{h.non_hits} |"
            )
        if res.floor:
            f = res.floor
            out.append(f"| floor: `GET /health` | {_ms(f.p50)} | {_ms(f.p90)} | {_ms(f.p99)} | {_ms(f.mean)} | | | |")
        out.append("")
    if res.concurrent:
        out.append(
            f"### Memory hits at concurrency {p['connections']}\n\n"
            f"`wrk -t1 -c{p['connections']} -d{p['wrk_duration']:g}s` POSTing one primed request to the "
            f"memory-only gateway, {p['wrk_rounds']} rounds. *closed*: each connection sends its next request as "
            "soon as its answer is in, so the gateway is saturated and the median is about connections / "
            "throughput (Little's law). *paced*: each connection waits an exponential think time before its next "
            f"request, steered toward {p['paced_rate']:,.0f} req/s in all, below saturation: the latency a client "
            "sees at that load. *floor*: `GET /health` in a closed loop, the most one worker answers "
            "here. Latency from wrk (request written to answer read), ms; CPU is the gateway process's per "
            "request, *gateway busy* its CPU over the run (1.00 = one core saturated). Every POST was answered "
            "from memory unless the misses column says otherwise.\n"
        )
        out.append(
            "| Mode | Round | req/s | p50 | p90 | p99 | p99.9 | max | CPU/request | gateway busy | misses | errors "
            "| other load |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        order = {"closed": 0, "paced": 1, "floor": 2}
        for run in sorted(res.concurrent, key=lambda r: (order.get(r.mode, 9), r.round)):
            mode = "floor: `GET /health`, closed" if run.mode == "floor" else run.mode
            misses = "" if run.mode == "floor" else str(run.misses)
            out.append(
                f"| {mode} | {run.round} | {run.rps:,.0f} | {_ms(run.p50_ms)} | {_ms(run.p90_ms)} | "
                f"{_ms(run.p99_ms)} | {_ms(run.p999_ms)} | {_ms(run.max_ms, 1)} | {_ms(run.cpu_ms_per_request)} | "
                f"{run.busy_cores:.2f} cores | {misses} | {run.errors} | {run.other_cores:.2f} |"
            )
        out.append("")
    if res.replay:
        rp = res.replay
        extra = rp.upstream_calls - rp.unique
        out.append(
            f"### Replay workload\n\n{rp.requests} requests over {rp.unique} unique prompts "
            f"({100 * (1 - rp.unique / rp.requests):.0f} % repeat an earlier one; repeats drawn uniformly, order "
            f"shuffled with seed {rp.seed}, so a repeat may arrive while its first request is still in flight), "
            f"sent by {rp.concurrency} workers on keep-alive connections (aiohttp) to a gateway with a memory + "
            f"sqlite chain whose upstream is the simulated provider ({p['replay_latency']}). Then the {rp.unique} "
            "unique prompts again with `cache-control: no-cache, no-store` (cache bypassed): the upstream's own "
            "latency through the gateway. Milliseconds.\n"
        )
        out.append("| Run | requests | wall time | p50 | p90 | p99 | mean | upstream calls |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, d, secs, calls in (
            ("workload through the cache", rp.workload, rp.workload_s, rp.upstream_calls),
            ("unique prompts, cache bypassed", rp.upstream, rp.upstream_s, rp.bypass_calls),
        ):
            out.append(
                f"| {label} | {d.n:,} | {secs:.1f} s | {_ms(d.p50, 2)} | {_ms(d.p90, 1)} | {_ms(d.p99, 1)} | "
                f"{_ms(d.mean, 1)} | {calls} |"
            )
        statuses = ", ".join(f"{k or '(none)'} {v:,}" for k, v in rp.statuses.items())
        out.append(
            f"\nAnswers: {statuses}; {rp.coalesced} of the misses shared an identical request's upstream call "
            f"(`atajo_coalesced_requests_total`); upstream calls beyond the unique prompts: {extra}.\n"
        )
    if res.miss:
        m = res.miss
        out.append(
            f"### The miss path, concurrency 1\n\n{m.requests} sequential requests per path, every one unique, "
            f"on one keep-alive connection, paths interleaved in {p['miss_rounds']} rounds, to the instant upstream "
            "of `run.py`: *cache* is a gateway with a memory + sqlite chain (each request a miss: both tiers looked "
            "up, the answer written to both behind the response); *memory only* the same with just the memory "
            "tier, to tell the SQLite tier's share; *off* the same gateway with `cache.enabled: false`. "
            "Milliseconds; CPU is the gateway process's per request, writes behind the response included.\n"
        )
        out.append("| Path | p50 | p90 | p99 | mean | CPU/request |\n| --- | ---: | ---: | ---: | ---: | ---: |")
        out.append(
            f"| cache on, miss | {_ms(m.cache.p50)} | {_ms(m.cache.p90)} | {_ms(m.cache.p99)} | "
            f"{_ms(m.cache.mean)} | {_ms(m.cpu_ms.get('cache'))} |"
        )
        if m.memory is not None:
            out.append(
                f"| cache on, memory only, miss | {_ms(m.memory.p50)} | {_ms(m.memory.p90)} | {_ms(m.memory.p99)} | "
                f"{_ms(m.memory.mean)} | {_ms(m.cpu_ms.get('memory'))} |"
            )
        out.append(
            f"| cache off | {_ms(m.off.p50)} | {_ms(m.off.p90)} | {_ms(m.off.p99)} | {_ms(m.off.mean)} | "
            f"{_ms(m.cpu_ms.get('off'))} |"
        )
        cpu_added = m.cpu_ms.get("cache", math.nan) - m.cpu_ms.get("off", math.nan)
        out.append(
            f"| **added by a miss** (memory + sqlite - off) | {_ms(m.added.p50)} | {_ms(m.added.p90)} | "
            f"{_ms(m.added.p99)} | {_ms(m.added.mean)} | {_ms(cpu_added)} |"
        )
        if m.non_misses:
            out.append(f"\n{m.non_misses} answers of the cache path were not misses.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


DOC_INTRO = f"""## The cache

`benchmarks/cache.py` measures the exact cache (memory → Redis → SQL → provider), with `atajo serve` as a
subprocess (one worker, log level warning) and each tier chain in its own generated config:

- **hits per tier** at concurrency 1: a gateway per chain holding just that tier, so every hit comes from it
  (goal: Redis and SQLite hits under 3 ms at the median);
- **memory hits at concurrency 16** with `wrk`: a closed loop (throughput; goal at least 5,000 hits/s with
  one worker) and a paced run below saturation (goal: median under 1 ms). In a closed loop the median is
  about connections / throughput, so both goals at once there would take some 16,000 hits/s: the two runs
  are reported side by side, each for what it says. For reference, LiteLLM's in-memory cache hit took 17-72
  ms at the median on this machine;
- **a replay workload** where 80 % of the requests repeat earlier ones, against the simulated provider with a
  realistic latency: upstream calls against unique requests (goal: within 2 %), coalesced requests, and the
  median against the upstream's own (goal: more than 10x lower);
- **the miss path**: what a miss adds over the same gateway with the cache disabled (no goal: what the cache
  costs when it does not help).

Redis (`redis://127.0.0.1:6379/0`) and PostgreSQL (`postgresql://postgres@127.0.0.1:5432/test`) must be
running for their tiers (they are skipped otherwise); the run's entries are kept apart by a tenant and
namespaces of its own and flushed at the end. About 2.5 minutes; every count and duration is an option, see
`python benchmarks/cache.py --help`:

```sh
{DOC_COMMAND}
```
"""


def write_doc(path: Path, section: str) -> None:
    replace_marked(path, BEGIN, END, section, DOC_INTRO)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--tiers", default=",".join(TIERS), help=f"tiers for the hits section, of {TIERS}")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--hit-keys", type=int, default=200, help="distinct primed requests per tier")
    parser.add_argument("--hit-requests", type=int, default=2000, help="timed sequential hits per tier")
    parser.add_argument("--hit-warmup", type=int, default=200, help="warm-up hits per tier")
    parser.add_argument("--hit-rounds", type=int, default=5, help="rounds interleaving the tiers")
    parser.add_argument("--connections", type=int, default=16, help="concurrency of the concurrent and replay runs")
    parser.add_argument("--wrk-duration", type=float, default=8, help="seconds per wrk run")
    parser.add_argument("--wrk-rounds", type=int, default=3, help="rounds of (closed, paced) wrk runs")
    parser.add_argument("--wrk-warmup", type=float, default=2, help="seconds of warm-up per wrk mode")
    parser.add_argument("--paced-rate", type=float, default=5000, help="total req/s of the paced wrk runs")
    parser.add_argument("--replay-requests", type=int, default=2000)
    parser.add_argument("--replay-unique", type=int, default=400)
    parser.add_argument("--seed", type=int, default=3, help="seed of the replay order")
    parser.add_argument("--ttft-ms", type=float, default=200, help="the replay upstream's time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=100)
    parser.add_argument("--output-tokens", type=int, default=20)
    parser.add_argument("--jitter", type=float, default=0.2)
    parser.add_argument("--miss-requests", type=int, default=2000, help="sequential unique requests per path")
    parser.add_argument("--miss-warmup", type=int, default=200)
    parser.add_argument("--miss-rounds", type=int, default=5)
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="before each measurement, wait while other processes use more cores than this",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="longest wait for a quiet machine per measurement (0: never)"
    )
    parser.add_argument("--quiet-budget", type=float, default=45.0, help="longest total wait for a quiet machine")
    parser.add_argument("--write", type=Path, metavar="DOC", help="replace the cache section of this Markdown file")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := wanted - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if unknown_tiers := set(tiers) - set(TIERS):
        parser.error(f"unknown tiers: {', '.join(sorted(unknown_tiers))}")
    if args.replay_unique < 1 or args.replay_requests < args.replay_unique:
        parser.error("--replay-requests must be at least --replay-unique, which must be at least 1")
    args.sections, args.tiers = wanted, tiers
    args.replay_latency = (
        f"ttft_ms {args.ttft_ms:g}, tokens_per_s {args.tokens_per_s:g}, output_tokens {args.output_tokens}, "
        f"jitter {args.jitter:g}"
    )
    return args


def _without_output(argv: Sequence[str]) -> list[str]:
    """The command line without ``--json FILE``, which changes no figure (so the documented command stays put)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


def run(args: argparse.Namespace, argv: Sequence[str]) -> Results:
    res = Results(
        started_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command_line(_without_output(argv)),
        environment=environment(),
        params={k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items() if k not in {"write", "json"}},
    )
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    say(f"machine: {res.environment['cpu']}; atajo {res.environment['atajo']}; run {run_id}")
    with tempfile.TemporaryDirectory(prefix="atajo-cache-bench-") as tmp:
        workdir = Path(tmp)
        fleet = Fleet(workdir)
        gws = Gateways(fleet, tenant, res)
        quiet = Quiet(fleet.servers, args.max_other_load, args.quiet_wait, args.quiet_budget)
        try:
            c1_memory_p50 = 1.0
            if args.sections & {"hits", "concurrent"}:
                tiers = args.tiers if "hits" in args.sections else ["memory"]
                if "concurrent" in args.sections and "memory" not in tiers:
                    tiers = ["memory", *tiers]
                urls: dict[str, str] = {}
                for tier in tiers:
                    url = tier_url(tier, args, workdir)
                    why = None if tier in ("memory", "sqlite") else reachable(url)
                    if why:
                        res.notes.append(f"{tier} tier skipped: {why}")
                        say(f"hits: skipping the {tier} tier: {why}")
                        continue
                    urls[tier] = url
                servers = {tier: gws.start(tier, [url], simulated(FAST_SIMULATED)) for tier, url in urls.items()}
                for server in servers.values():
                    wait_ready(server)
                say("hits: gateways ready: " + ", ".join(f"{t} :{s.port}" for t, s in servers.items()))
                try:
                    ns = f"bench-{run_id}-hits"
                    if "hits" in args.sections:
                        measure_hits(servers, urls, args, quiet, res, ns)
                        if "memory" in res.hits:
                            c1_memory_p50 = res.hits["memory"].rtt.p50
                    if "concurrent" in args.sections:
                        body = chat_body("Cached question number 0: what does the cache cost?")
                        client = Caller(servers["memory"].port, {"authorization": f"Bearer {BENCH_KEY}"})
                        client.headers["x-atajo-cache-namespace"] = ns
                        try:
                            prime(client, [body], "hit-memory")
                        finally:
                            client.close()
                        measure_concurrent(servers["memory"], body, ns, args, quiet, res, c1_memory_p50)
                finally:
                    gws.stop(*servers.values())

            if "replay" in args.sections:
                sim = {
                    "ttft_ms": args.ttft_ms,
                    "tokens_per_s": args.tokens_per_s,
                    "output_tokens": args.output_tokens,
                    "jitter": args.jitter,
                }
                chain = [tier_url("memory", args, workdir), tier_url("sqlite", args, workdir)]
                server = gws.start("replay", chain, simulated(sim))
                try:
                    wait_ready(server)
                    say(f"replay: gateway :{server.port} (memory + sqlite, simulated upstream: {args.replay_latency})")
                    measure_replay(server, f"bench-{run_id}-replay", args, quiet, res)
                finally:
                    gws.stop(server)

            if "miss" in args.sections:
                upstream = fleet.upstream(0.0)
                wait_ready(upstream)
                openai = {
                    "provider": "openai",
                    "base_url": f"http://{HOST}:{upstream.port}/v1",
                    "api_key": "sk-bench-not-a-secret",
                }
                chain = [tier_url("memory", args, workdir), f"sqlite:///{workdir / 'miss.db'}"]
                miss_servers = {
                    "cache": gws.start("miss-cache", chain, openai),
                    "memory": gws.start("miss-memory", chain[:1], openai),
                    "off": gws.start("miss-off", None, openai),
                }
                try:
                    for server in miss_servers.values():
                        wait_ready(server)
                    say(f"miss: upstream :{upstream.port}, gateways ready")
                    measure_miss(miss_servers, f"bench-{run_id}-miss", args, quiet, res)
                finally:
                    gws.stop(*miss_servers.values())
            res.quiet_waited_s = quiet.waited_s
        finally:
            gws.stop(*[s for s in list(gws.shared.values()) if s in fleet.servers])
            fleet.stop_all()
    if res.flushed:
        say("flushed the run's tenant: " + ", ".join(f"{k} {v} entries" for k, v in res.flushed.items()))
    res.elapsed_s = time.monotonic() - _STARTED
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "concurrent" in args.sections and shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk), or leave out the concurrent section", file=sys.stderr)
        return 2
    res = run(args, argv)
    publish(args, asdict(res), render(res), goals(res), write_doc, "cache")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
