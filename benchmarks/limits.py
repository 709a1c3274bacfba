"""Rate limits under load: fairness between tenants, and overload shedding.

    python benchmarks/limits.py [--duration 10] [--write]

Starts an upstream with a fixed capacity (``--upstream-slots`` calls at once, ``--service-ms`` each: 10 x 50 ms
= 200 requests/s; beyond that its queue grows, as a real provider's does) and ``atajo serve`` in front of it,
then drives them open-loop (requests sent on a schedule, whatever the answers) with aiohttp:

- **fairness**: a quiet tenant sends half its share (its limit is 600 requests/min with bursts of 10, it sends
  5/s), alone, then
  while a noisy tenant sends 20 times its own share (200/s against 600/min). The quiet tenant's p99 latency
  and error rate should not move by more than 10 %.
- **overload**: offered load at 1x and 2x the upstream's capacity, with the gateway's limit pinned at 90 % of
  that capacity, then with limits off. With limits, the excess should get fast 429s and the admitted
  requests a bounded p99; without, everyone waits in the upstream's queue.

``--write`` puts the figures between the ``limits-results`` markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- limits-results:begin -->"
END = "<!-- limits-results:end -->"
COMPLETION = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the upstream: a provider with a fixed capacity ----------------------------------------------------


def serve_upstream(port: int, slots: int, service_ms: float) -> None:
    async def main() -> None:
        gate = asyncio.Semaphore(slots)

        async def chat(request: web.Request) -> web.Response:
            await request.read()
            async with gate:
                await asyncio.sleep(service_ms / 1000)
            return web.Response(body=COMPLETION, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    asyncio.run(main())


# --- processes ------------------------------------------------------------------------------------------


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never became ready")


def start_gateway(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    path = workdir / f"atajo-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HOME": str(workdir)}
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "atajo", "serve", "--config", str(path), "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/ready", proc)
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- load ---------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """One client's open-loop requests and what came back."""

    key: str
    rate: float
    latencies: dict[int, list[float]] = field(default_factory=dict)
    errors: int = 0

    def add(self, status: int, seconds: float) -> None:
        self.latencies.setdefault(status, []).append(seconds)

    @property
    def sent(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + self.errors

    def share(self, status: int) -> float:
        return len(self.latencies.get(status, [])) / self.sent if self.sent else 0.0

    def p(self, q: float, status: int = 200) -> float:
        values = sorted(self.latencies.get(status, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    def error_rate(self) -> float:
        """Anything but a 200 (a 429 to a client within its share is an error too)."""
        return 1 - self.share(200)


async def drive(url: str, streams: Sequence[Stream], duration_s: float) -> None:
    body = b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
    timeout = ClientTimeout(total=60)
    async with ClientSession(connector=TCPConnector(limit=2000), timeout=timeout) as session:
        tasks: set[asyncio.Task[None]] = set()

        async def one(stream: Stream) -> None:
            headers = {"authorization": f"Bearer {stream.key}", "content-type": "application/json"}
            started = time.perf_counter()
            try:
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
                    await resp.read()
                    stream.add(resp.status, time.perf_counter() - started)
            except Exception:
                stream.errors += 1

        async def schedule(stream: Stream) -> None:
            start = time.perf_counter()
            n = int(stream.rate * duration_s)
            for i in range(n):
                delay = start + i / stream.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        await asyncio.gather(*(schedule(s) for s in streams))
        while tasks:
            await asyncio.gather(*list(tasks))


# --- scenarios ------------------------------------------------------------------------------------------


def base_config(upstream: str) -> dict[str, Any]:
    return {
        "log_level": "warning",
        "models": {"bench": {"deployments": [{"provider": "openai", "base_url": upstream + "/v1", "api_key": "x"}]}},
        "cache": {"enabled": False},
        "retry": {"max_retries": 0},
        "pool": {"max_connections_per_host": 1000},
    }


def fairness(upstream: str, workdir: Path, duration_s: float) -> dict[str, Any]:
    config = base_config(upstream)
    config["auth"] = {
        "master_key": "sk-bench-master",
        "store": "off",
        "keys": [
            {"name": "quiet", "key": "sk-quiet", "tenant": "quiet"},
            {"name": "noisy", "key": "sk-noisy", "tenant": "noisy"},
        ],
    }
    share = {"rpm": 600, "request_burst": 10}  # 10 requests/s, at most a second's worth at once
    config["limits"] = {"tenants": {"quiet": share, "noisy": share}}
    proc, url = start_gateway(config, workdir)
    try:
        alone = Stream("sk-quiet", 5)
        asyncio.run(drive(url, [alone], duration_s))
        quiet, noisy = Stream("sk-quiet", 5), Stream("sk-noisy", 200)
        asyncio.run(drive(url, [quiet, noisy], duration_s))
    finally:
        stop(proc)
    return {"alone": alone, "quiet": quiet, "noisy": noisy}


def overload(upstream: str, workdir: Path, duration_s: float, capacity: float) -> dict[str, dict[str, Stream]]:
    results: dict[str, dict[str, Stream]] = {}
    for mode in ("limits", "off"):
        config = base_config(upstream)
        if mode == "limits":
            rate = capacity * 0.9  # per second; bursts of at most 100 ms' worth
            config["limits"] = {"gateway": {"rpm": int(rate * 60), "request_burst": int(rate / 10), "adaptive": False}}
        else:
            config["limits"] = {"enabled": False}
        proc, url = start_gateway(config, workdir)
        try:
            results[mode] = {}
            for factor in (1, 2):
                stream = Stream("unused", capacity * factor)
                asyncio.run(drive(url, [stream], duration_s))
                results[mode][f"{factor}x"] = stream
        finally:
            stop(proc)
    return results


# --- report -------------------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def render(fair: dict[str, Any], over: dict[str, dict[str, Stream]], args: argparse.Namespace) -> str:
    alone, quiet, noisy = fair["alone"], fair["quiet"], fair["noisy"]
    p99_change = (quiet.p(0.99) / alone.p(0.99) - 1) * 100
    lines = [
        BEGIN,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({os.cpu_count()} cores, shared), "
        f"`python benchmarks/limits.py --duration {args.duration:g}`: an upstream of {args.upstream_slots} slots x "
        f"{args.service_ms:g} ms (capacity {args.upstream_slots * 1000 / args.service_ms:.0f} requests/s), one "
        f"gateway process, open-loop aiohttp clients, {args.duration:g} s per phase.",
        "",
        "### Fairness: a quiet tenant beside one sending 20 times its share",
        "",
        "| client | offered | answered 200 | 429 | p50 ms | p99 ms | error rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("quiet, alone", alone), ("quiet, beside noisy", quiet), ("noisy", noisy)):
        lines.append(
            f"| {name} | {s.rate:g}/s | {len(s.latencies.get(200, []))} | {len(s.latencies.get(429, []))} | "
            f"{_f(s.p(0.5))} | {_f(s.p(0.99))} | {s.error_rate():.1%} |"
        )
    lines += [
        "",
        f"The quiet tenant's p99 moved by {p99_change:+.1f} % (goal: within ±10 %) and its error rate from "
        f"{alone.error_rate():.1%} to {quiet.error_rate():.1%}; the noisy tenant's 429s took "
        f"{_f(noisy.p(0.5, 429), 2)} ms at the median (p99 {_f(noisy.p(0.99, 429), 2)} ms).",
        "",
        "### Overload: offered load past the upstream's capacity",
        "",
        "| gateway | offered | admitted | 429 | admitted p50 ms | admitted p99 ms | 429 p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, label in (("limits", "limit at 90 % of capacity"), ("off", "limits off")):
        for factor, s in over[mode].items():
            lines.append(
                f"| {label} | {factor} ({s.rate:g}/s) | {s.share(200):.0%} | {s.share(429):.0%} | {_f(s.p(0.5))} | "
                f"{_f(s.p(0.99))} | {_f(s.p(0.99, 429), 2)} |"
            )
    lines += ["", END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text += "\n## Rate limits\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--upstream-slots", type=int, default=10)
    parser.add_argument("--service-ms", type=float, default=50.0)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.upstream_slots, args.service_ms)
        return 0
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream", str(port), "--upstream-slots", str(args.upstream_slots),
         "--service-ms", str(args.service_ms)],
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the upstream never started") from None
                time.sleep(0.1)
        capacity = args.upstream_slots * 1000 / args.service_ms
        with tempfile.TemporaryDirectory() as tmp:
            fair = fairness(url, Path(tmp), args.duration)
            over = overload(url, Path(tmp), args.duration, capacity)
    finally:
        stop(upstream)
    section = render(fair, over, args)
    print(section)
    if args.write:
        write_doc(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
