"""Gateway overhead benchmark: the gateway against a direct call and a minimal pass-through, in one run.

Starts three processes on free 127.0.0.1 ports: the instant upstream (``upstream.py``), the baseline
pass-through proxy (``passthrough.py``) and the gateway (``python -m atajo serve`` with a generated config
that points one model at the upstream with provider ``openai``, one worker, log level warning). Then it
measures, interleaving the three paths so that machine noise hits them alike:

- latency at concurrency 1: one keep-alive connection, sequential requests, p50/p90/p99 per path and the
  gateway's added time (gateway - direct at each percentile);
- throughput with ``wrk`` (POST, ``-t1 -c32`` by default) in alternating rounds, with the CPU time each
  server process spent per request (utime + stime from /proc/PID/stat before and after);
- streaming time to first byte at concurrency 1 (first SSE body bytes, direct vs gateway);
- start-up to ready (``GET /ready`` answers 200; best of several fresh starts) and idle RSS after start-up
  and a few requests;
- when valgrind is installed, CPU instructions per request of the pass-through and the gateway, counted by
  callgrind: a cost figure that does not move with the machine's load.

The machine is shared, so before each measurement the runner waits (within a bound) for other processes to
go quiet, and reports their load. Prints progress on stderr, a Markdown table at the end, and with
``--write docs/benchmarks.md`` replaces the results section of that document. Talks only to 127.0.0.1 and
every step is bounded in time.

    python benchmarks/run.py                              # 3 to 5 minutes
    python benchmarks/run.py --write docs/benchmarks.md   # and record the results
    python benchmarks/run.py --sections latency --latency-requests 1000   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import http.client
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MODEL = "bench-model"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = ("direct", "passthrough", "gateway")
SECTIONS = ("startup", "latency", "stream", "throughput", "instructions")

CHAT_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
    separators=(",", ":"),
).encode()
STREAM_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "stream": True},
    separators=(",", ":"),
).encode()
JSON_HEADERS = {"content-type": "application/json"}

RESULTS_BEGIN = "<!-- results:begin (written by benchmarks/run.py --write; edit the text outside these markers) -->"
RESULTS_END = "<!-- results:end -->"

# --- goals (from the issue) --------------------------------------------------------------------------

ADDED_P50_MAX_MS = 0.5
ADDED_P99_MAX_MS = 3.0
THROUGHPUT_MIN_RATIO = 0.5
CPU_MAX_MS = 0.4
STREAM_TTFB_ADDED_MAX_MS = 3.0
IDLE_RSS_MAX_MB = 100.0
STARTUP_MAX_S = 1.5

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    """The environment without settings that would change the gateway's configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATAJO_", "OPENAI_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def busy_cpu_seconds() -> float:
    """Machine-wide user + nice + system time, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Quiet:
    """Waits, within a bound, until other processes on the machine leave the cores alone."""

    def __init__(self, servers: Sequence[Server], max_other_cores: float, max_wait_s: float, budget_s: float) -> None:
        self.servers = servers
        self.max_other_cores = max_other_cores
        self.max_wait_s = max_wait_s
        self.budget_s = budget_s
        self.waited_s = 0.0

    def other_cores(self, window_s: float = 0.3) -> float:
        """Cores used by processes other than ours over a short window (approximate)."""
        ours_before = sum(cpu_seconds(s.pid) for s in self.servers) + self_cpu_seconds()
        busy_before, started = busy_cpu_seconds(), time.monotonic()
        time.sleep(window_s)
        ours = sum(cpu_seconds(s.pid) for s in self.servers) + self_cpu_seconds() - ours_before
        return max(0.0, (busy_cpu_seconds() - busy_before - ours) / (time.monotonic() - started))

    def __call__(self) -> None:
        allowed = min(self.max_wait_s, self.budget_s - self.waited_s)
        if allowed <= 0:
            return
        deadline = time.monotonic() + allowed
        started = time.monotonic()
        other = self.other_cores()
        while other > self.max_other_cores and time.monotonic() < deadline:
            other = self.other_cores(1.0)
        waited = time.monotonic() - started
        self.waited_s += waited
        if waited > 1.5:
            say(f"waited {waited:.1f} s for other processes' load to drop (now {other:.2f} cores)")


@dataclass
class Server:
    name: str
    port: int
    ready_path: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class Fleet:
    """Starts the processes a run needs and stops every one of them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []
        self._logs: list[IO[bytes]] = []

    def spawn(
        self, name: str, argv: Sequence[str], port: int, ready_path: str, env: dict[str, str] | None = None
    ) -> Server:
        log_path = self.workdir / f"{name}-{port}.log"
        log = log_path.open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env or child_env(), cwd=ROOT
        )
        server = Server(name, port, ready_path, proc, log_path)
        self.servers.append(server)
        return server

    def upstream(self, chunk_delay_ms: float) -> Server:
        port = free_port()
        argv = [sys.executable, str(BENCH_DIR / "upstream.py"), "--port", str(port)]
        return self.spawn("upstream", [*argv, "--chunk-delay-ms", str(chunk_delay_ms)], port, "/health")

    def passthrough(self, upstream: Server, prefix: Sequence[str] = ()) -> Server:
        port = free_port()
        argv = [*prefix, sys.executable, str(BENCH_DIR / "passthrough.py"), "--port", str(port)]
        return self.spawn("passthrough", [*argv, "--upstream", f"http://{HOST}:{upstream.port}"], port, "/ready")

    def gateway(self, config: Path, prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> Server:
        """``atajo serve`` with ``config``; ``env`` replaces the child environment (another source tree, say)."""
        port = free_port()
        argv = [*prefix, sys.executable, "-m", "atajo", "serve", "--config", str(config), "--host", HOST]
        return self.spawn(
            "gateway", [*argv, "--port", str(port), "--workers", "1", "--log-level", "warning"], port, "/ready", env
        )

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        self.servers.clear()
        for log in self._logs:
            log.close()


def gateway_config(path: Path, upstream_port: int) -> Path:
    path.write_text(
        "# generated by benchmarks/run.py\n"
        "log_level: warning\n"
        "server:\n"
        "  access_log: false\n"
        "cache:\n"
        "  enabled: false  # these figures are the proxy path; benchmarks/cache.py measures the cache\n"
        "models:\n"
        f"  {MODEL}:\n"
        "    deployments:\n"
        "      - provider: openai\n"
        f"        base_url: http://{HOST}:{upstream_port}/v1\n"
        "        api_key: sk-bench-not-a-secret\n"
    )
    return path


def wait_ready(server: Server, timeout_s: float = 20.0, poll_s: float = 0.002) -> float:
    """Poll GET ready_path until it answers 200; the time from now until then, in seconds."""
    started = time.perf_counter()
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        conn = http.client.HTTPConnection(HOST, server.port, timeout=2)
        try:
            conn.request("GET", server.ready_path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return time.perf_counter() - started
        except (ConnectionError, OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(poll_s)
    raise RuntimeError(f"{server.name} was not ready within {timeout_s:g} s:\n{server.log_tail()}")


# --- the concurrency-1 client ----------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection, sequential requests, timed with perf_counter_ns."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=10)
        self.conn.connect()
        if self.conn.sock is not None:
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.conn.close()

    def post(self) -> float:
        """One chat completion; its round-trip time in ms."""
        started = time.perf_counter_ns()
        self.conn.request("POST", CHAT_PATH, CHAT_BODY, JSON_HEADERS)
        resp = self.conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter_ns() - started
        if resp.status != 200 or b'"choices"' not in body:
            raise RuntimeError(f"port {self.port}: HTTP {resp.status}: {body[:300]!r}")
        return elapsed / 1e6

    def stream(self) -> tuple[float, float]:
        """One streamed chat completion; (time to the first body bytes, time to the end), in ms."""
        started = time.perf_counter_ns()
        self.conn.request("POST", CHAT_PATH, STREAM_BODY, JSON_HEADERS)
        resp = self.conn.getresponse()
        first = resp.read1(65536)
        first_ns = time.perf_counter_ns()
        rest = resp.read()
        done_ns = time.perf_counter_ns()
        body = first + rest
        if resp.status != 200 or not first or not body.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"port {self.port}: HTTP {resp.status}: stream {body[:300]!r}")
        return (first_ns - started) / 1e6, (done_ns - started) / 1e6


# --- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values, q in [0, 1]."""
    if not values:
        return math.nan
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


@dataclass
class Dist:
    n: int
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        ordered = sorted(values)
        mean = sum(ordered) / len(ordered) if ordered else math.nan
        return cls(len(ordered), percentile(ordered, 0.5), percentile(ordered, 0.9), percentile(ordered, 0.99), mean)

    def minus(self, other: Dist) -> Dist:
        return Dist(
            min(self.n, other.n),
            self.p50 - other.p50,
            self.p90 - other.p90,
            self.p99 - other.p99,
            self.mean - other.mean,
        )


@dataclass
class WrkRun:
    target: str
    round: int
    rps: float
    requests: int
    seconds: float
    errors: int
    cpu_ms_per_request: dict[str, float]
    other_cores: float


@dataclass
class Results:
    started_utc: str
    command: str
    environment: dict[str, str]
    params: dict[str, Any]
    latency: dict[str, Dist] = field(default_factory=dict)
    latency_added: Dist | None = None
    latency_added_passthrough: Dist | None = None
    latency_over_passthrough: Dist | None = None
    ttfb: dict[str, Dist] = field(default_factory=dict)
    stream_total: dict[str, Dist] = field(default_factory=dict)
    ttfb_added: Dist | None = None
    wrk_runs: list[WrkRun] = field(default_factory=list)
    rps: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    throughput_ratio: float | None = None
    other_cores_max: float | None = None
    startup_s: list[float] = field(default_factory=list)
    idle_rss_mb: list[float] = field(default_factory=list)
    rss_after_load_mb: float | None = None
    instructions_k: dict[str, float] = field(default_factory=dict)
    quiet_waited_s: float = 0.0
    elapsed_s: float = 0.0


# --- measurements ----------------------------------------------------------------------------------


def _rounds(total: int, rounds: int) -> Iterator[int]:
    per = max(1, total // rounds)
    done = 0
    while done < total:
        n = min(per, total - done)
        done += n
        yield n


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No collector pause inside a timed batch (collect first, so none is due)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure_latency(
    ports: dict[str, int], requests: int, warmup: int, rounds: int, quiet: Quiet
) -> dict[str, list[float]]:
    clients = {name: Client(port) for name, port in ports.items()}
    samples: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for client in clients.values():
            for _ in range(warmup):
                client.post()
        for i, n in enumerate(_rounds(requests, rounds)):
            quiet()
            for name, client in clients.items():
                with gc_paused():
                    samples[name].extend(client.post() for _ in range(n))
            say(f"latency: round {i + 1}: {len(samples['direct'])}/{requests} requests per path")
    finally:
        for client in clients.values():
            client.close()
    return samples


def measure_stream(
    ports: dict[str, int], requests: int, warmup: int, rounds: int, quiet: Quiet
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    clients = {name: Client(port) for name, port in ports.items()}
    ttfb: dict[str, list[float]] = {name: [] for name in ports}
    total: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for client in clients.values():
            for _ in range(warmup):
                client.stream()
        for i, n in enumerate(_rounds(requests, rounds)):
            quiet()
            for name, client in clients.items():
                with gc_paused():
                    for _ in range(n):
                        first, end = client.stream()
                        ttfb[name].append(first)
                        total[name].append(end)
            say(f"streaming: round {i + 1}: {len(ttfb['direct'])}/{requests} streams per path")
    finally:
        for client in clients.values():
            client.close()
    return ttfb, total


_WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def write_lua(path: Path) -> Path:
    path.write_text(
        f'wrk.method = "POST"\nwrk.body = [[{CHAT_BODY.decode()}]]\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


def run_wrk(
    url: str, lua: Path, threads: int, connections: int, duration_s: int, servers: Sequence[Server]
) -> tuple[float, int, float, int, dict[str, float], float]:
    """One wrk run; (req/s, requests, seconds, errors, CPU s per server, other processes' cores)."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, duration_s)}s",
        "--timeout",
        "5s",
        "-s",
        str(lua),
        url,
    ]
    cpu_before = {s.name: cpu_seconds(s.pid) for s in servers}
    busy_before, kids_before, self_before = busy_cpu_seconds(), children_cpu_seconds(), self_cpu_seconds()
    wall_before = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    wall = time.monotonic() - wall_before
    cpu = {s.name: cpu_seconds(s.pid) - cpu_before[s.name] for s in servers}
    ours = sum(cpu.values()) + (children_cpu_seconds() - kids_before) + (self_cpu_seconds() - self_before)
    other_cores = max(0.0, (busy_cpu_seconds() - busy_before - ours) / wall)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    m_req, m_rps = _WRK_REQUESTS.search(out.stdout), _WRK_RPS.search(out.stdout)
    if m_req is None or m_rps is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out.stdout}")
    requests, seconds = int(m_req.group(1)), float(m_req.group(2)) * _UNIT_S[m_req.group(3)]
    errors = 0
    if m_sock := _WRK_SOCKET.search(out.stdout):
        errors += sum(int(g) for g in m_sock.groups())
    if m_bad := _WRK_NON2XX.search(out.stdout):
        errors += int(m_bad.group(1))
    return float(m_rps.group(1)), requests, seconds, errors, cpu, other_cores


def measure_throughput(
    servers: dict[str, Server], upstream: Server, lua: Path, args: argparse.Namespace, quiet: Quiet
) -> list[WrkRun]:
    runs: list[WrkRun] = []
    urls = {name: f"http://{HOST}:{server.port}{CHAT_PATH}" for name, server in servers.items()}
    for name, url in urls.items():
        say(f"throughput: warm-up {name} ({args.wrk_warmup:g} s)")
        run_wrk(url, lua, args.wrk_threads, args.wrk_connections, args.wrk_warmup, [])
    for r in range(args.wrk_rounds):
        for name, url in urls.items():
            watched = [upstream] if name == "direct" else [servers[name], upstream]
            quiet()
            rps, requests, seconds, errors, cpu, other = run_wrk(
                url, lua, args.wrk_threads, args.wrk_connections, args.wrk_duration, watched
            )
            per_request = {proc: 1000 * s / requests if requests else math.nan for proc, s in cpu.items()}
            runs.append(WrkRun(name, r + 1, rps, requests, seconds, errors, per_request, other))
            cpu_text = ", ".join(f"{proc} {ms:.3f} ms CPU/req" for proc, ms in per_request.items())
            say(
                f"throughput: round {r + 1}/{args.wrk_rounds} {name}: {rps:,.0f} req/s ({cpu_text}; "
                f"other load {other:.2f} cores{f'; {errors} ERRORS' if errors else ''})"
            )
    return runs


def measure_startup(fleet: Fleet, config: Path, starts: int, settle_s: float) -> tuple[list[float], list[float]]:
    """Fresh gateways: seconds from spawn to GET /ready = 200, and RSS after start-up and a few requests."""
    times: list[float] = []
    rss: list[float] = []
    for i in range(starts):
        spawned = time.perf_counter()
        gateway = fleet.gateway(config)
        try:
            wait_ready(gateway)
            times.append(time.perf_counter() - spawned)
            client = Client(gateway.port)
            try:
                for _ in range(10):
                    client.post()
                for _ in range(5):
                    client.stream()
            finally:
                client.close()
            time.sleep(settle_s)
            rss.append(rss_mb(gateway.pid))
        finally:
            fleet.stop(gateway)
        say(f"start-up: {i + 1}/{starts}: ready in {times[-1]:.3f} s, idle RSS {rss[-1]:.1f} MB")
    return times, rss


class Poster(Protocol):
    """A client that sends the benchmark's request once per ``post``."""

    def post(self) -> Any: ...

    def close(self) -> None: ...


def callgrind_kilo_instructions(
    fleet: Fleet, name: str, launch: Callable[[list[str]], Server], client_of: Callable[[Server], Poster], requests: int
) -> float:
    """Thousands of instructions per request of the server ``launch`` starts under callgrind (given the
    command prefix), over ``requests`` sequential requests after 100 of warm-up."""
    out = fleet.workdir / f"callgrind-{name}.out"
    server = launch(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"])
    try:
        wait_ready(server, timeout_s=300, poll_s=0.2)
        client = client_of(server)
        try:
            for _ in range(100):
                client.post()
            _callgrind_control("-i", "on", server.pid)
            for _ in range(requests):
                client.post()
            _callgrind_control("-d", server.pid)
        finally:
            client.close()
    finally:
        fleet.stop(server)
    totals = [
        int(line.split()[1])
        for dump in fleet.workdir.glob(f"{out.name}*")
        for line in dump.read_text(errors="replace").splitlines()
        if line.startswith(("summary:", "totals:"))
    ]
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals for {name}:\n{server.log_tail()}")
    return max(totals) / requests / 1000


def measure_instructions(fleet: Fleet, upstream: Server, config: Path, requests: int) -> dict[str, float]:
    """Thousands of CPU instructions per request (concurrency 1), counted by callgrind after start-up and a
    warm-up: the same on every run, whatever else the machine is doing."""
    counts: dict[str, float] = {}
    for name in ("passthrough", "gateway"):

        def launch(prefix: list[str], name: str = name) -> Server:
            return fleet.passthrough(upstream, prefix) if name == "passthrough" else fleet.gateway(config, prefix)

        counts[name] = callgrind_kilo_instructions(fleet, name, launch, lambda server: Client(server.port), requests)
        say(f"instructions: {name}: {counts[name]:,.0f} k instructions per request")
    return counts


def _callgrind_control(*args: str | int) -> None:
    subprocess.run(["callgrind_control", *map(str, args)], check=True, capture_output=True, timeout=60)


# --- environment and report ------------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


def environment() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        commit = head + (" (src/ has uncommitted changes)" if dirty else "")
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "atajo": f"{_version('atajo')} at {commit}",
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "wrk": _wrk_version(),
    }


def _wrk_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5, check=False)
        words = (out.stdout + out.stderr).split()
        return words[1] if len(words) > 1 else "?"
    return "?"


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**missed**")


def goals(res: Results) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) rows."""
    rows: list[tuple[str, str, str, bool | None]] = []
    added = res.latency_added
    rows.append(
        (
            "Added latency, concurrency 1, p50",
            f"<= {ADDED_P50_MAX_MS} ms",
            f"{_ms(added.p50, 3)} ms" if added else "-",
            added.p50 <= ADDED_P50_MAX_MS if added else None,
        )
    )
    rows.append(
        (
            "Added latency, concurrency 1, p99",
            f"<= {ADDED_P99_MAX_MS} ms",
            f"{_ms(added.p99, 3)} ms" if added else "-",
            added.p99 <= ADDED_P99_MAX_MS if added else None,
        )
    )
    ratio = res.throughput_ratio
    rows.append(
        (
            "Throughput, gateway / pass-through",
            f">= {THROUGHPUT_MIN_RATIO}",
            f"{ratio:.2f}" if ratio is not None else "-",
            ratio >= THROUGHPUT_MIN_RATIO if ratio is not None else None,
        )
    )
    cpu = res.cpu_ms.get("gateway")
    rows.append(
        (
            "Gateway CPU per proxied request",
            f"<= {CPU_MAX_MS} ms",
            f"{cpu:.3f} ms" if cpu is not None else "-",
            cpu <= CPU_MAX_MS if cpu is not None else None,
        )
    )
    ttfb = res.ttfb_added
    rows.append(
        (
            "Streaming: added time to first byte (p50)",
            f"<= {STREAM_TTFB_ADDED_MAX_MS} ms",
            f"{_ms(ttfb.p50, 3)} ms" if ttfb else "-",
            ttfb.p50 <= STREAM_TTFB_ADDED_MAX_MS if ttfb else None,
        )
    )
    rss = median(res.idle_rss_mb) if res.idle_rss_mb else None
    rows.append(
        (
            "Idle RSS after start-up and a few requests",
            f"<= {IDLE_RSS_MAX_MB:g} MB",
            f"{rss:.1f} MB" if rss is not None else "-",
            rss <= IDLE_RSS_MAX_MB if rss is not None else None,
        )
    )
    best = min(res.startup_s) if res.startup_s else None
    rows.append(
        (
            "Start-up to ready (best of starts)",
            f"< {STARTUP_MAX_S} s",
            f"{best:.3f} s" if best is not None else "-",
            best < STARTUP_MAX_S if best is not None else None,
        )
    )
    return rows


def render(res: Results) -> str:
    """The results as Markdown: parameters, the goals table, then the figures per path."""
    p = res.params
    out: list[str] = []
    out.append(f"Measured {res.started_utc} in {res.elapsed_s:.0f} s with:\n")
    out.append(f"```sh\n{res.command}\n```\n")
    out.append("| Machine | |\n| --- | --- |")
    out.extend(f"| {k} | {v} |" for k, v in res.environment.items())
    if res.other_cores_max is not None:
        out.append(f"| other processes' CPU during wrk runs (max) | {res.other_cores_max:.2f} cores |")
    if res.quiet_waited_s >= 1:
        out.append(f"| time spent waiting for other processes to go quiet | {res.quiet_waited_s:.0f} s |")
    out.append("")
    out.append("### Goals\n")
    out.append("| Goal | Target | Measured | Result |\n| --- | --- | --- | --- |")
    out.extend(f"| {g} | {t} | {m} | {_verdict(ok)} |" for g, t, m, ok in goals(res))
    out.append("")
    if res.latency:
        out.append(
            f"### Latency at concurrency 1\n\n{p['latency_requests']} sequential non-streaming requests per path "
            f"on one keep-alive connection, in {p['latency_rounds']} interleaved rounds, after "
            f"{p['latency_warmup']} warm-up requests. Milliseconds, client-side round trip.\n"
        )
        out.append("| Path | p50 | p90 | p99 | mean |\n| --- | ---: | ---: | ---: | ---: |")
        for name in TARGETS:
            d = res.latency.get(name)
            if d:
                out.append(f"| {name} | {_ms(d.p50, 3)} | {_ms(d.p90, 3)} | {_ms(d.p99, 3)} | {_ms(d.mean, 3)} |")
        for label, d_added in (
            ("**added by the gateway** (gateway - direct)", res.latency_added),
            ("added by the pass-through (pass-through - direct)", res.latency_added_passthrough),
            ("gateway - pass-through", res.latency_over_passthrough),
        ):
            if d_added:
                out.append(
                    f"| {label} | {_ms(d_added.p50, 3)} | {_ms(d_added.p90, 3)} | {_ms(d_added.p99, 3)} "
                    f"| {_ms(d_added.mean, 3)} |"
                )
        out.append("")
    if res.rps:
        out.append(
            f"### Throughput and CPU\n\n`wrk -t{p['wrk_threads']} -c{p['wrk_connections']} -d{p['wrk_duration']:g}s` "
            f"POSTing a chat completion, {p['wrk_rounds']} rounds alternating the paths; median of the rounds "
            "(the gateway / pass-through ratio in the goals is the median of the ratios within each round). "
            "CPU is the server process's utime + stime over the run divided by the requests wrk completed.\n"
        )
        out.append("| Path | req/s | vs pass-through | server CPU per request | upstream CPU per request |")
        out.append("| --- | ---: | ---: | ---: | ---: |")
        base = res.rps.get("passthrough")
        for name in TARGETS:
            if name not in res.rps:
                continue
            rps = res.rps[name]
            ratio = f"{rps / base:.2f}x" if base else "-"
            own = res.cpu_ms.get(name)
            own_text = f"{own:.3f} ms" if own is not None else "(none: no proxy)"
            up = res.cpu_ms.get(f"upstream/{name}")
            out.append(f"| {name} | {rps:,.0f} | {ratio} | {own_text} | {_ms(up, 3)} ms |")
        out.append("\nEvery round:\n")
        out.append("| Round | Path | req/s | requests | errors | server CPU/req (ms) | other load (cores) |")
        out.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for run in res.wrk_runs:
            own = run.cpu_ms_per_request.get(run.target)
            out.append(
                f"| {run.round} | {run.target} | {run.rps:,.0f} | {run.requests:,} | {run.errors} "
                f"| {_ms(own, 3)} | {run.other_cores:.2f} |"
            )
        out.append("")
    if res.ttfb:
        out.append(
            f"### Streaming at concurrency 1\n\n{p['stream_requests']} sequential streamed chat completions per path "
            "(the upstream sends its first SSE chunk at once, then 4 more and `[DONE]`). Time to first byte is "
            "from sending the request to the first body bytes; milliseconds.\n"
        )
        out.append("| Path | TTFB p50 | TTFB p90 | TTFB p99 | whole stream p50 |\n| --- | ---: | ---: | ---: | ---: |")
        for name in TARGETS:
            d = res.ttfb.get(name)
            t = res.stream_total.get(name)
            if d and t:
                out.append(f"| {name} | {_ms(d.p50, 3)} | {_ms(d.p90, 3)} | {_ms(d.p99, 3)} | {_ms(t.p50, 3)} |")
        if res.ttfb_added:
            a = res.ttfb_added
            out.append(f"| **added by the gateway** | {_ms(a.p50, 3)} | {_ms(a.p90, 3)} | {_ms(a.p99, 3)} | |")
        out.append("")
    if res.instructions_k:
        k = res.instructions_k
        out.append(
            f"### Instructions per request\n\nCPU instructions counted by valgrind's callgrind over "
            f"{p['instructions_requests']} sequential requests after start-up and a warm-up (thousands per request; "
            "deterministic, unlike the CPU times above).\n"
        )
        out.append("| Path | k instructions per request |\n| --- | ---: |")
        out.extend(f"| {name} | {value:,.0f} |" for name, value in k.items())
        if "gateway" in k and "passthrough" in k:
            out.append(f"| gateway / pass-through | {k['gateway'] / k['passthrough']:.2f}x |")
        out.append("")
    if res.startup_s:
        times = ", ".join(f"{s:.3f}" for s in res.startup_s)
        rss = ", ".join(f"{m:.1f}" for m in res.idle_rss_mb)
        out.append("### Start-up and memory\n")
        out.append("| Figure | Value |\n| --- | --- |")
        out.append(f"| start-up to `GET /ready` = 200, best (all starts, s) | {min(res.startup_s):.3f} s ({times}) |")
        out.append(
            f"| idle RSS after 15 requests, median (all starts, MB) | {median(res.idle_rss_mb):.1f} MB ({rss}) |"
        )
        if res.rss_after_load_mb is not None:
            out.append(f"| RSS of the benchmarked gateway after every load test | {res.rss_after_load_mb:.1f} MB |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


DOC_TITLE = "# Benchmarks\n\nMeasured by `benchmarks/run.py` (see its docstring).\n\n"
DOC_RESULTS_HEADER = "## Results\n\n"


def replace_marked(path: Path, begin: str, end: str, section: str, intro: str) -> None:
    """Put ``section`` between the ``begin`` / ``end`` markers of ``path``; where they are not there yet,
    append ``intro`` and the marked section (each benchmark script owns one such section)."""
    block = f"{begin}\n{section}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        path.write_text(text[:start] + block + text[stop + len(end) :])
    else:
        path.write_text(text.rstrip() + "\n\n" + intro + "\n" + block + "\n")


def write_doc(path: Path, section: str) -> None:
    block = f"{RESULTS_BEGIN}\n{section}{RESULTS_END}"
    if path.exists():
        text = path.read_text()
        start, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
        if start != -1 and end > start:
            path.write_text(text[:start] + block + text[end + len(RESULTS_END) :])
            return
        path.write_text(text.rstrip() + "\n\n" + DOC_RESULTS_HEADER + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOC_TITLE + DOC_RESULTS_HEADER + block + "\n")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {SECTIONS}",
    )
    parser.add_argument("--latency-requests", type=int, default=5000, help="sequential requests per path")
    parser.add_argument("--latency-warmup", type=int, default=300, help="warm-up requests per path")
    parser.add_argument("--latency-rounds", type=int, default=10, help="interleaved rounds the requests are split in")
    parser.add_argument("--stream-requests", type=int, default=1500, help="sequential streams per path")
    parser.add_argument("--stream-rounds", type=int, default=5)
    parser.add_argument("--wrk-duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--wrk-rounds", type=int, default=3, help="rounds alternating direct, pass-through, gateway")
    parser.add_argument("--wrk-warmup", type=int, default=2, help="seconds of wrk warm-up per path")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--wrk-connections", type=int, default=32)
    parser.add_argument(
        "--instructions-requests", type=int, default=500, help="sequential requests per path under callgrind"
    )
    parser.add_argument("--starts", type=int, default=5, help="fresh gateway starts for start-up time and idle RSS")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before reading RSS")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="before each measurement, wait while other processes use more cores than this",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="longest wait for a quiet machine per measurement (0: never)"
    )
    parser.add_argument("--quiet-budget", type=float, default=90.0, help="longest total wait for a quiet machine")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="upstream pause between stream chunks")
    parser.add_argument("--write", type=Path, metavar="DOC", help="replace the results section of this Markdown file")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := wanted - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    args.sections = wanted
    return args


def command_line(argv: Sequence[str]) -> str:
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join(["python", str(script), *argv])


def run(args: argparse.Namespace, argv: Sequence[str]) -> Results:
    res = Results(
        started_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command_line(argv),
        environment=environment(),
        params={k: v for k, v in vars(args).items() if k not in {"write", "json", "sections"}},
    )
    say(f"machine: {res.environment['cpu']}; atajo {res.environment['atajo']}")
    with tempfile.TemporaryDirectory(prefix="atajo-bench-") as tmp:
        workdir = Path(tmp)
        fleet = Fleet(workdir)
        try:
            upstream = fleet.upstream(args.chunk_delay_ms)
            wait_ready(upstream)
            config = gateway_config(workdir / "gateway.yaml", upstream.port)
            passthrough = fleet.passthrough(upstream)
            gateway = fleet.gateway(config)
            wait_ready(passthrough)
            wait_ready(gateway)
            say(f"upstream :{upstream.port}, pass-through :{passthrough.port}, gateway :{gateway.port} ready")
            servers = {"direct": upstream, "passthrough": passthrough, "gateway": gateway}
            ports = {name: s.port for name, s in servers.items()}
            quiet = Quiet(list(servers.values()), args.max_other_load, args.quiet_wait, args.quiet_budget)
            check = Client(gateway.port)  # fail early, with the gateway's log, if it cannot proxy
            try:
                check.post()
                check.stream()
            finally:
                check.close()

            if "startup" in args.sections:
                res.startup_s, res.idle_rss_mb = measure_startup(fleet, config, args.starts, args.settle)

            if "latency" in args.sections:
                samples = measure_latency(ports, args.latency_requests, args.latency_warmup, args.latency_rounds, quiet)
                res.latency = {name: Dist.of(values) for name, values in samples.items()}
                res.latency_added = res.latency["gateway"].minus(res.latency["direct"])
                res.latency_added_passthrough = res.latency["passthrough"].minus(res.latency["direct"])
                res.latency_over_passthrough = res.latency["gateway"].minus(res.latency["passthrough"])
                a = res.latency_added
                say(f"latency: gateway adds {a.p50:.3f} ms at p50, {a.p99:.3f} ms at p99")

            if "stream" in args.sections:
                warm = min(100, args.stream_requests)
                ttfb, total = measure_stream(ports, args.stream_requests, warm, args.stream_rounds, quiet)
                res.ttfb = {name: Dist.of(values) for name, values in ttfb.items()}
                res.stream_total = {name: Dist.of(values) for name, values in total.items()}
                res.ttfb_added = res.ttfb["gateway"].minus(res.ttfb["direct"])
                say(f"streaming: gateway adds {res.ttfb_added.p50:.3f} ms to TTFB at p50")

            if "throughput" in args.sections:
                lua = write_lua(workdir / "post.lua")
                res.wrk_runs = measure_throughput(servers, upstream, lua, args, quiet)
                for name in TARGETS:
                    runs = [r for r in res.wrk_runs if r.target == name]
                    res.rps[name] = median([r.rps for r in runs])
                    if name != "direct":
                        res.cpu_ms[name] = median([r.cpu_ms_per_request[name] for r in runs])
                    res.cpu_ms[f"upstream/{name}"] = median([r.cpu_ms_per_request["upstream"] for r in runs])
                res.throughput_ratio = median(
                    [
                        g.rps / b.rps
                        for g, b in zip(
                            [r for r in res.wrk_runs if r.target == "gateway"],
                            [r for r in res.wrk_runs if r.target == "passthrough"],
                            strict=True,
                        )
                    ]
                )
                res.other_cores_max = max(r.other_cores for r in res.wrk_runs)
                if any(r.errors for r in res.wrk_runs):
                    say("throughput: WARNING: some wrk runs had socket errors or non-2xx answers")

            if "instructions" in args.sections:
                res.instructions_k = measure_instructions(fleet, upstream, config, args.instructions_requests)

            res.rss_after_load_mb = rss_mb(gateway.pid)
            res.quiet_waited_s = quiet.waited_s
        finally:
            fleet.stop_all()
    res.elapsed_s = time.monotonic() - _T0
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "throughput" in args.sections and shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk), or leave out the throughput section", file=sys.stderr)
        return 2
    if "instructions" in args.sections and shutil.which("callgrind_control") is None:
        say("valgrind is not installed (apt-get install valgrind): skipping the instructions section")
        args.sections.discard("instructions")
    res = run(args, argv)
    publish(args, asdict(res), render(res), goals(res), write_doc, "results")
    return 0


Goal = tuple[str, str, str, bool | None]


def publish(
    args: argparse.Namespace,
    figures: dict[str, Any],
    section: str,
    goal_rows: Sequence[Goal],
    write: Callable[[Path, str], None],
    what: str,
) -> None:
    """Print the section; with --json and --write, save the figures and the doc's section; name missed goals."""
    print(section)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        say(f"wrote {args.json}")
    if args.write:
        write(args.write, section)
        say(f"wrote the {what} section of {args.write}")
    missed = [g for g, _, _, ok in goal_rows if ok is False]
    if missed:
        say(f"goals missed: {'; '.join(missed)}")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
