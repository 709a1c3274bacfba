"""What routing and budgets cost per request: a plain request against ``model: auto`` with budgets and the ledger.

Starts the instant upstream of ``run.py`` and one gateway per configuration (``python -m atajo serve``, one
worker, log level warning, cache off, the cost ledger on, written to a SQLite file of the run):

- **plain**: one model pointed at the upstream, no routing, no budgets (``run.py``'s configuration);
- **auto**: ``model: auto`` over four candidates (two tokenizer encodings, one candidate with a fallback)
  and two budgets (a global monthly cost, a per-key daily token count) in the in-process store;
- **auto-redis**: the same with the budgets in Redis (``--redis``; left out when Redis does not answer).

Every candidate and the plain model point at the same upstream, so the differences are the gateway's own work.
Each request is the same chat completion (a system and a user message, ``max_tokens`` 64) but for its model.
Measured, interleaving the paths so that machine noise hits them alike:

- added latency at concurrency 1 (path - direct at each percentile), one keep-alive connection per path;
- CPU per request under ``wrk`` (utime + stime of the gateway over each run, divided by its requests);
- when valgrind is installed, CPU instructions per request counted by callgrind (deterministic).

``--before-src DIR`` also runs every configuration from another source tree (an export of an earlier
commit's ``src``), so that before and after are measured in the same run. ``--write docs/benchmarks.md``
replaces the routing section of that document. Talks only to 127.0.0.1 (and Redis).

    python benchmarks/routing.py                                  # about 3 minutes
    python benchmarks/routing.py --sections instructions          # the deterministic figure alone
    python benchmarks/routing.py --write docs/benchmarks.md       # and record the results
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/routing.py` finds `benchmarks`

from benchmarks.run import (
    CHAT_PATH,
    HOST,
    JSON_HEADERS,
    Dist,
    Fleet,
    Quiet,
    Server,
    _interrupt,
    _rounds,
    callgrind_kilo_instructions,
    child_env,
    command_line,
    environment,
    gc_paused,
    median,
    publish,
    replace_marked,
    run_wrk,
    say,
    wait_ready,
)

BEGIN = "<!-- routing-results:begin -->"
END = "<!-- routing-results:end -->"
DOC_INTRO = """## Routing and budgets

`benchmarks/routing.py` measures what a request costs with routing and budgets configured: a plain request
(one model, `run.py`'s configuration) against `model: auto` choosing among four candidates, with two budgets
in the in-process store and in Redis, the cost ledger on in every configuration.
"""

PLAIN_MODEL = "bench-model"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a travel site. Answer in two sentences at most."},
    {
        "role": "user",
        "content": "I land in Lisbon at 23:40 on a Friday. Is there still a metro into the centre, or should I "
        "book a taxi, and roughly what would it cost?",
    },
]
# Public name → the catalog model its deployment asks for: two encodings (o200k, cl100k) and one stand-in.
CANDIDATES = {"small": "gpt-4o-mini", "large": "gpt-4o", "classic": "gpt-4-turbo", "open": "llama-3.1-70b-instruct"}


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 64}, separators=(",", ":")).encode()


def write_config(path: Path, upstream_port: int, workdir: Path, budgets: str | None) -> Path:
    """``budgets``: None (plain), or the budget store's URL (routing and budgets on)."""

    def deployment(model: str | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"provider": "openai", "base_url": f"http://{HOST}:{upstream_port}/v1", "api_key": "sk-b"}
        return d if model is None else {**d, "model": model}

    config: dict[str, Any] = {
        "log_level": "warning",
        "server": {"access_log": False},
        "cache": {"enabled": False},
        "ledger": {"url": f"sqlite:///{workdir / (path.stem + '-ledger.db')}"},
        "models": {PLAIN_MODEL: {"deployments": [deployment()]}},
    }
    if budgets is not None:
        for name, model in CANDIDATES.items():
            config["models"][name] = {"deployments": [deployment(model)], "kind": "chat"}
        config["models"]["small"]["fallbacks"] = ["large"]
        config["routing"] = {"models": {"auto": {"candidates": list(CANDIDATES)}}}
        config["budgets"] = {
            "store": budgets,
            "redis_prefix": f"atajo:bench-routing:{uuid.uuid4().hex[:8]}:",
            "limits": [
                {"scope": "global", "period": "month", "max_cost": 1_000_000},
                {"scope": "key", "period": "day", "max_tokens": 10**12},
            ],
        }
    path.write_text("# generated by benchmarks/routing.py\n" + json.dumps(config, indent=2) + "\n")
    return path


@dataclass
class Target:
    """One measured path: a server and the body sent to it."""

    name: str
    server: Server
    body: bytes


class Client:
    """One keep-alive connection, sequential requests of one body, timed with perf_counter_ns."""

    def __init__(self, port: int, body: bytes, timeout_s: float = 10) -> None:
        self.port, self.body = port, body
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
        self.conn.connect()
        if self.conn.sock is not None:
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.conn.close()

    def post(self) -> tuple[float, http.client.HTTPResponse]:
        started = time.perf_counter_ns()
        self.conn.request("POST", CHAT_PATH, self.body, JSON_HEADERS)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter_ns() - started
        if resp.status != 200 or b'"choices"' not in data:
            raise RuntimeError(f"port {self.port}: HTTP {resp.status}: {data[:300]!r}")
        return elapsed / 1e6, resp


def check(path: Target) -> str:
    """One request; for a routed path, that it was routed and priced. The route reason, or ''."""
    client = Client(path.server.port, path.body)
    try:
        _, resp = client.post()
    finally:
        client.close()
    if path.name.startswith("auto"):
        reason, cost = resp.getheader("x-atajo-route-reason"), resp.getheader("x-atajo-cost-micros")
        if not reason or not cost:
            raise RuntimeError(f"{path.name}: not routed or not priced: {resp.getheaders()}\n{path.server.log_tail()}")
        return reason
    return ""


@dataclass
class Results:
    started_utc: str
    command: str
    environment: dict[str, str]
    params: dict[str, Any]
    paths: list[str] = field(default_factory=list)
    route_reason: str = ""
    latency: dict[str, Dist] = field(default_factory=dict)
    added: dict[str, Dist] = field(default_factory=dict)
    rps: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    cpu_rounds: list[tuple[int, str, float, float, int, float]] = field(default_factory=list)
    """(round, path, req/s, CPU ms per request, errors, other load)."""
    instructions_k: dict[str, float] = field(default_factory=dict)
    quiet_waited_s: float = 0.0
    elapsed_s: float = 0.0


# --- measurements ----------------------------------------------------------------------------------


def measure_latency(paths: Sequence[Target], requests: int, warmup: int, rounds: int, quiet: Quiet) -> dict[str, Dist]:
    clients = {p.name: Client(p.server.port, p.body) for p in paths}
    samples: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for client in clients.values():
            for _ in range(warmup):
                client.post()
        for i, n in enumerate(_rounds(requests, rounds)):
            quiet()
            for name, client in clients.items():
                with gc_paused():
                    samples[name].extend(client.post()[0] for _ in range(n))
            say(f"latency: round {i + 1}: {len(samples[paths[0].name])}/{requests} requests per path")
    finally:
        for client in clients.values():
            client.close()
    return {name: Dist.of(values) for name, values in samples.items()}


def measure_cpu(
    paths: Sequence[Target], upstream: Server, workdir: Path, args: argparse.Namespace, quiet: Quiet, res: Results
) -> None:
    luas = {}
    for p in paths:
        luas[p.name] = workdir / f"{p.name}.lua"
        luas[p.name].write_text(
            f'wrk.method = "POST"\nwrk.body = [[{p.body.decode()}]]\nwrk.headers["Content-Type"] = "application/json"\n'
        )
    urls = {p.name: f"http://{HOST}:{p.server.port}{CHAT_PATH}" for p in paths}
    for p in paths:
        run_wrk(urls[p.name], luas[p.name], 1, args.wrk_connections, args.wrk_warmup, [])
    per_path: dict[str, list[tuple[float, float]]] = {p.name: [] for p in paths}
    for r in range(args.wrk_rounds):
        for p in paths:
            quiet()
            watched = [upstream] if p.name == "direct" else [p.server, upstream]
            rps, requests, _, errors, cpu, other = run_wrk(
                urls[p.name], luas[p.name], 1, args.wrk_connections, args.wrk_duration, watched
            )
            own = 1000 * cpu[p.server.name] / requests if p.name != "direct" and requests else float("nan")
            per_path[p.name].append((rps, own))
            res.cpu_rounds.append((r + 1, p.name, rps, own, errors, other))
            say(f"cpu: round {r + 1}/{args.wrk_rounds} {p.name}: {rps:,.0f} req/s, {own:.3f} ms CPU/req")
    for name, runs in per_path.items():
        res.rps[name] = median([rps for rps, _ in runs])
        if name != "direct":
            res.cpu_ms[name] = median([own for _, own in runs])


def measure_instructions(
    fleet: Fleet, configs: dict[str, tuple[Path, dict[str, str] | None, bytes]], requests: int
) -> dict[str, float]:
    """Thousands of CPU instructions per request per configuration, counted by callgrind after a warm-up."""
    counts: dict[str, float] = {}
    for name, (config, env, body) in configs.items():

        def launch(prefix: list[str], config: Path = config, env: dict[str, str] | None = env) -> Server:
            return fleet.gateway(config, prefix, env)

        def client_of(server: Server, body: bytes = body) -> Client:
            return Client(server.port, body, timeout_s=300)  # the first routed request loads the vocabularies

        counts[name] = callgrind_kilo_instructions(fleet, name, launch, client_of, requests)
        say(f"instructions: {name}: {counts[name]:,.0f} k instructions per request")
    return counts


def redis_answers(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def forget_redis_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: Sequence[str]) -> Results:
    res = Results(
        started_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command_line(argv),
        environment=environment(),
        params={k: v for k, v in vars(args).items() if k not in {"write", "json", "sections"}},
    )
    if args.before_src is not None:
        res.environment["before"] = f"every configuration also run from {args.before_src}"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="atajo-bench-routing-") as tmp:
        workdir = Path(tmp)
        fleet = Fleet(workdir)
        configs: dict[str, tuple[Path, dict[str, str] | None, bytes]] = {}
        prefixes: list[str] = []
        try:
            upstream = fleet.upstream(0.0)
            wait_ready(upstream)
            stores = {"auto": "memory://"}
            if args.redis and redis_answers(args.redis):
                stores["auto-redis"] = args.redis
            elif args.redis:
                say(f"Redis at {args.redis} does not answer: leaving out auto-redis")
            before = {**child_env(), "PYTHONPATH": str(args.before_src)} if args.before_src is not None else None
            for name, store in {"plain": None, **stores}.items():
                path = write_config(workdir / f"{name}.yaml", upstream.port, workdir, store)
                body = chat_body(PLAIN_MODEL if store is None else "auto")
                if store is not None:
                    prefixes.append(json.loads(path.read_text().split("\n", 1)[1])["budgets"]["redis_prefix"])
                if before is not None:
                    configs[f"{name} (before)"] = (path, before, body)
                configs[name] = (path, None, body)
            paths = [Target("direct", upstream, chat_body(PLAIN_MODEL))]
            for name, (path, env, body) in configs.items():
                paths.append(Target(name, fleet.gateway(path, env=env), body))
            for p in paths:
                wait_ready(p.server)
                reason = check(p)
                res.route_reason = res.route_reason or reason
            res.paths = [p.name for p in paths]
            say(f"ready: {', '.join(res.paths)}; auto chose {res.route_reason!r}")
            quiet = Quiet([p.server for p in paths], args.max_other_load, args.quiet_wait, args.quiet_budget)
            if "latency" in args.sections:
                res.latency = measure_latency(paths, args.latency_requests, args.latency_warmup, args.rounds, quiet)
                direct = res.latency["direct"]
                res.added = {name: d.minus(direct) for name, d in res.latency.items() if name != "direct"}
            if "cpu" in args.sections:
                measure_cpu(paths, upstream, workdir, args, quiet, res)
            res.quiet_waited_s = quiet.waited_s
            for p in paths[1:]:
                fleet.stop(p.server)  # callgrind's runs below are best alone
            if "instructions" in args.sections:
                res.instructions_k = measure_instructions(fleet, configs, args.instructions_requests)
        finally:
            fleet.stop_all()
            if args.redis and "auto-redis" in configs:
                for prefix in prefixes:
                    forget_redis_keys(args.redis, prefix)
    res.elapsed_s = time.monotonic() - t0
    return res


def render(res: Results) -> str:
    p = res.params
    out = [f"Measured {res.started_utc} in {res.elapsed_s:.0f} s with:\n", f"```sh\n{res.command}\n```\n"]
    out.append("| Machine | |\n| --- | --- |")
    out.extend(f"| {k} | {v} |" for k, v in res.environment.items())
    if res.quiet_waited_s >= 1:
        out.append(f"| time spent waiting for other processes to go quiet | {res.quiet_waited_s:.0f} s |")
    out.append("")
    out.append(f"`auto` chose: `{res.route_reason}`\n")
    gateways = [name for name in res.paths if name != "direct"]
    out.append(
        "Added latency: concurrency 1, one keep-alive connection per path, "
        f"{p['latency_requests']} requests per path in {p['rounds']} interleaved rounds after {p['latency_warmup']} "
        "warm-up requests; path - direct at each percentile, ms. CPU: the gateway's utime + stime per request "
        f"under `wrk -t1 -c{p['wrk_connections']} -d{p['wrk_duration']}s`, {p['wrk_rounds']} rounds alternating "
        f"the paths, median of the rounds. Instructions: callgrind over {p['instructions_requests']} sequential "
        "requests after a warm-up, thousands per request. Ratios are against `plain` in this run (a configuration "
        "run from the `--before-src` tree: against `plain (before)`).\n"
    )
    out.append(
        "| Configuration | added p50 | added p90 | added p99 | CPU / request | CPU vs plain | req/s "
        "| k instructions / request | instructions vs plain |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def ratio(table: dict[str, float], name: str) -> str:
        base, value = table.get("plain (before)" if name.endswith("(before)") else "plain"), table.get(name)
        return f"{value / base:.2f}x" if base and value is not None else "-"

    for name in gateways:
        a = res.added.get(name)
        cpu, k, rps = res.cpu_ms.get(name), res.instructions_k.get(name), res.rps.get(name)
        out.append(
            f"| {name} | {_f(a.p50 if a else None)} | {_f(a.p90 if a else None)} | {_f(a.p99 if a else None)} "
            f"| {_f(cpu)} ms | {ratio(res.cpu_ms, name)} | {_f(rps, 0, ',')} | {_f(k, 0, ',')} "
            f"| {ratio(res.instructions_k, name)} |"
        )
    if res.cpu_rounds:
        out.append("\nEvery wrk round:\n")
        out.append("| Round | Path | req/s | gateway CPU/req (ms) | errors | other load (cores) |")
        out.append("| ---: | --- | ---: | ---: | ---: | ---: |")
        for r, name, rps, own, errors, other in res.cpu_rounds:
            out.append(f"| {r} | {name} | {rps:,.0f} | {_f(own)} | {errors} | {other:.2f} |")
    return "\n".join(out).rstrip() + "\n"


def _f(value: float | None, digits: int = 3, sep: str = "") -> str:
    if value is None or value != value:
        return "-"
    return f"{value:{sep}.{digits}f}"


def write_doc(path: Path, section: str) -> None:
    replace_marked(path, BEGIN, END, section, DOC_INTRO)


SECTIONS = ("latency", "cpu", "instructions")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--latency-requests", type=int, default=3000, help="sequential requests per path")
    parser.add_argument("--latency-warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved latency rounds")
    parser.add_argument("--wrk-duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--wrk-rounds", type=int, default=3)
    parser.add_argument("--wrk-warmup", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=32)
    parser.add_argument("--instructions-requests", type=int, default=300, help="requests per path under callgrind")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="budget store of auto-redis ('' : none)")
    parser.add_argument("--before-src", type=Path, help="also run every configuration from this src tree")
    parser.add_argument("--max-other-load", type=float, default=0.3)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument("--quiet-budget", type=float, default=60.0)
    parser.add_argument("--write", type=Path, metavar="DOC", help="replace the routing section of this file")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := wanted - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    args.sections = wanted
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "cpu" in args.sections and shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk), or leave out the cpu section", file=sys.stderr)
        return 2
    if "instructions" in args.sections and shutil.which("callgrind_control") is None:
        say("valgrind is not installed (apt-get install valgrind): skipping the instructions section")
        args.sections.discard("instructions")
    res = run(args, argv)
    publish(args, asdict(res), render(res), [], write_doc, "routing")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
