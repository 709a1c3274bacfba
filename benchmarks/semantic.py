"""Semantic tier benchmark: what a lookup costs with 100,000 entries, and what the tier adds to a request.

- lookup (in process): a ``SemanticTier`` over the in-process store holding ``--entries`` vectors in one
  partition (the worst case: every entry is a candidate). The first ``--real`` entries are real embeddings
  of the stored texts of GPTCache's pairs and Quora questions (``--data``); the rest are those vectors with
  noise added (each a unit vector at cosine ~0.85 from its source, labelled with its source's text), so the
  index has the size and the neighbourhoods of a full cache without embedding 100,000 texts first. Then the
  paraphrases are asked one at a time, each timed through the tier's real ``find``: embed (the local int8
  MiniLM, one thread) + search + the match decision. The three parts are also timed on their own.
- gateway (``atajo serve``, memory tier, instant local upstream, concurrency 1): a miss with the semantic
  tier on (embedding at lookup, vector written behind the response) against the same miss with it off, a
  semantic hit, and an exact hit.

    python benchmarks/semantic.py                               # about 2 minutes
    python benchmarks/semantic.py --write docs/benchmarks.md    # and record the results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cache import MASTER_KEY, Caller, chat_body
from benchmarks.run import (
    HOST,
    Dist,
    Fleet,
    _interrupt,
    _verdict,
    command_line,
    environment,
    publish,
    replace_marked,
    say,
    wait_ready,
)

LOOKUP_P50_MAX_MS = 15.0
BEGIN = "<!-- semantic-results:begin -->"
END = "<!-- semantic-results:end -->"
DOC_COMMAND = "python benchmarks/semantic.py --write docs/benchmarks.md"
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "semantic"
MODEL = "bench-cache"  # chat_body (benchmarks/cache.py) asks for this model
KEY = "sk-bench-semantic-not-a-secret"


@dataclass
class Results:
    entries: int = 0
    real: int = 0
    lookup: Dist | None = None
    embed: Dist | None = None
    search: Dist | None = None
    decide: Dist | None = None
    lookup_hits: int = 0
    lookups: int = 0
    gateway: dict[str, Dist] = field(default_factory=dict)


# --- data ----------------------------------------------------------------------------------------------


def load_texts(data: Path, limit: int) -> tuple[list[str], list[str]]:
    """(stored texts, asked paraphrases): GPTCache's origins and similars, then Quora's text_a's."""
    stored: list[str] = []
    asked: list[str] = []
    gptcache = data / "gptcache_mock_pairs.jsonl"
    if gptcache.exists():
        for line in gptcache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            stored.append(row["origin"])
            asked.append(row["similar"])
    qqp = data / "qqp_dev.jsonl"
    if qqp.exists():
        with qqp.open(encoding="utf-8") as f:
            for line in f:
                if len(stored) >= limit:
                    break
                stored.append(json.loads(line)["text_a"])
    if not stored:
        raise SystemExit(f"no pairs under {data} (give --data)")
    return list(dict.fromkeys(stored))[:limit], asked


# --- 1. lookup in process ------------------------------------------------------------------------------


async def measure_lookup(args: argparse.Namespace, res: Results) -> None:
    from atajo.cache.semantic.decision import Decider
    from atajo.cache.semantic.embedder import Embedder
    from atajo.cache.semantic.store import MemoryVectorStore, VectorEntry
    from atajo.cache.semantic.tier import SemanticTier

    stored, asked = load_texts(args.data, args.real)
    embedder = Embedder()
    embedder.load()
    say(f"lookup: embedding {len(stored)} stored texts")
    started = time.perf_counter()
    real = embedder.embed(stored)
    say(f"lookup: embedded in {time.perf_counter() - started:.1f} s")
    rng = np.random.default_rng(7)
    store = MemoryVectorStore(max_entries=args.entries)
    partition = "bench/default/m/p"
    keep = time.time() + 3600
    entries = [
        VectorEntry(f"bench/default/m/v1-r{i}", "bench", "default", partition, t, real[i], keep)
        for i, t in enumerate(stored)
    ]
    await store.add_many(entries)
    for start in range(len(stored), args.entries, 10_000):
        n = min(10_000, args.entries - start)
        source = rng.integers(0, len(stored), n)
        noise = rng.standard_normal((n, real.shape[1])).astype(np.float32) * 0.033
        vectors = real[source] + noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        await store.add_many(
            [
                VectorEntry(
                    f"bench/default/m/v1-s{start + j}",
                    "bench",
                    "default",
                    partition,
                    stored[source[j]],
                    vectors[j],
                    keep,
                )
                for j in range(n)
            ]
        )
        say(f"lookup: {start + n}/{args.entries} entries")
    res.entries, res.real = await store.count(), len(stored)
    tier = SemanticTier(store, embedder.embed, Decider.default(), neighbours=4, timeout_s=5.0)
    await tier.start()
    queries = asked[: args.lookups]
    for q in queries[:20]:  # warm-up
        await tier.find(tier.query(partition, q))
    totals, embeds, searches, decides = [], [], [], []
    for q in queries:
        t0 = time.perf_counter()
        found = await tier.find(tier.query(partition, q))
        totals.append((time.perf_counter() - t0) * 1000)
        res.lookup_hits += bool(found and found.match.hit)
        t1 = time.perf_counter()
        v = embedder.embed_one(q)
        t2 = time.perf_counter()
        neighbours = await store.search(partition, v, 4, time.time())
        t3 = time.perf_counter()
        tier.decider.decide(q, neighbours)
        t4 = time.perf_counter()
        embeds.append((t2 - t1) * 1000)
        searches.append((t3 - t2) * 1000)
        decides.append((t4 - t3) * 1000)
    await tier.close()
    res.lookups = len(queries)
    res.lookup, res.embed, res.search, res.decide = (Dist.of(x) for x in (totals, embeds, searches, decides))
    say(
        f"lookup: p50 {res.lookup.p50:.2f} ms (embed {res.embed.p50:.2f}, search {res.search.p50:.3f}, "
        f"decide {res.decide.p50:.3f})"
    )


# --- 2. through the gateway ----------------------------------------------------------------------------


def gateway_config(path: Path, upstream_port: int, semantic: bool) -> Path:
    config = {
        "log_level": "warning",
        "server": {"access_log": False},
        "auth": {"master_key": MASTER_KEY, "keys": [{"name": "bench", "key": KEY, "tenant": "bench"}]},
        "cache": {"tiers": [{"url": "memory://", "ttl_s": 3600}], "semantic": {"enabled": semantic}},
        "models": {MODEL: {"deployments": [{"provider": "openai", "base_url": f"http://{HOST}:{upstream_port}/v1"}]}},
    }
    path.write_text(json.dumps(config))
    return path


def measure_gateway(args: argparse.Namespace, res: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="atajo-bench-semantic-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            _measure_gateway(fleet, Path(tmp), args, res)
        finally:
            fleet.stop_all()


def _measure_gateway(fleet: Fleet, tmp: Path, args: argparse.Namespace, res: Results) -> None:
    upstream = fleet.upstream(0.0)
    on = fleet.gateway(gateway_config(tmp / "on.json", upstream.port, True))
    off = fleet.gateway(gateway_config(tmp / "off.json", upstream.port, False))
    for server in (upstream, on, off):
        wait_ready(server, timeout_s=60.0)
    headers = {"authorization": f"Bearer {KEY}"}
    clients = {"on": Caller(on.port, headers), "off": Caller(off.port, headers)}
    samples: dict[str, list[float]] = {"miss-on": [], "miss-off": [], "hit-semantic": [], "hit-exact": []}
    serial = 0
    for client in clients.values():  # warm-up; seeds the partition so misses embed at lookup
        for _ in range(20):
            serial += 1
            client.chat(chat_body(f"Warm-up question number {serial} about the weather in some city?"))
    pairs = [
        ("How do I reset my password?", "how do i reset my password"),
        ("What are your opening hours on Sunday?", "what are your opening hours on sunday"),
    ]
    for stored, _ in pairs:
        clients["on"].chat(chat_body(stored))
    time.sleep(0.5)
    for i in range(args.gateway_requests):
        for name in ("on", "off"):
            serial += 1
            reply = clients[name].chat(chat_body(f"Question {serial}: what is a good name for a pet {i}?"))
            samples[f"miss-{name}"].append(reply.ms)
        stored, paraphrase = pairs[i % 2]
        reply = clients["on"].chat(
            chat_body(paraphrase + " " * (1 + i))  # new bytes each time: no exact hit
        )
        if reply.cache == "hit-semantic":
            samples["hit-semantic"].append(reply.ms)
        samples["hit-exact"].append(clients["on"].chat(chat_body(stored)).ms)
        if (i + 1) % 100 == 0:
            say(f"gateway: {i + 1}/{args.gateway_requests}")
    for client in clients.values():
        client.close()
    res.gateway = {name: Dist.of(s) for name, s in samples.items() if s}


# --- report --------------------------------------------------------------------------------------------


def render(res: Results, args: argparse.Namespace) -> str:
    e = environment()
    env = f"{e['cpu']}, Python {e['python']}, atajo {e['atajo']}"
    rows = []
    if res.lookup is not None:
        ok = res.lookup.p50 < LOOKUP_P50_MAX_MS
        goal = "Semantic lookup (embed + search + decide), 100,000 entries, median"
        rows.append((goal, f"< {LOOKUP_P50_MAX_MS:g} ms", f"{res.lookup.p50:.2f} ms", ok))
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{DOC_COMMAND}`; {env}.",
        "",
        "| Goal | Target | Measured | |",
        "| --- | --- | --- | --- |",
        *(f"| {g} | {t} | {m} | {_verdict(ok)} |" for g, t, m, ok in rows),
        "",
    ]
    if res.lookup is not None:
        lines += [
            f"Lookup in process: {res.entries:,} entries in one partition ({res.real:,} real embeddings, the rest "
            f"noisy copies), {res.lookups} paraphrases asked one at a time; {res.lookup_hits} were hits.",
            "",
            "| Part | p50 ms | p99 ms |",
            "| --- | ---: | ---: |",
        ]
        for name, d in (
            ("whole lookup (`SemanticTier.find`)", res.lookup),
            ("embed", res.embed),
            ("search (HNSW candidates, exact rescoring)", res.search),
            ("decide", res.decide),
        ):
            assert d is not None
            lines.append(f"| {name} | {d.p50:.3f} | {d.p99:.3f} |")
        lines.append("")
    if res.gateway:
        g = res.gateway
        lines += [
            f"Through `atajo serve` (memory tier, instant local upstream, concurrency 1, {args.gateway_requests} "
            "requests each):",
            "",
            "| Request | p50 ms | p99 ms |",
            "| --- | ---: | ---: |",
        ]
        labels = {
            "miss-off": "miss, semantic tier off",
            "miss-on": "miss, semantic tier on",
            "hit-semantic": "semantic hit",
            "hit-exact": "exact hit (memory)",
        }
        for key, label in labels.items():
            if key in g:
                lines.append(f"| {label} | {g[key].p50:.3f} | {g[key].p99:.3f} |")
        if "miss-on" in g and "miss-off" in g:
            lines += [
                "",
                f"The tier adds {g['miss-on'].p50 - g['miss-off'].p50:.2f} ms to a miss at p50 (the embedding).",
            ]
        lines.append("")
    lines.append(f"Command line: `{command_line(sys.argv[1:])}`")
    return "\n".join(lines) + "\n"


def write_doc(path: Path, section: str) -> None:
    replace_marked(path, BEGIN, END, section, "## Semantic tier\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="lookup,gateway")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the pairs files")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--real", type=int, default=5_000, help="entries that are real embeddings")
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--gateway-requests", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    res = Results()
    if "lookup" in sections:
        asyncio.run(measure_lookup(args, res))
    if "gateway" in sections:
        measure_gateway(args, res)
    section = render(res, args)
    ok = None if res.lookup is None else res.lookup.p50 < LOOKUP_P50_MAX_MS
    goal = [("Semantic lookup median", f"< {LOOKUP_P50_MAX_MS:g} ms", "", ok)]
    figures: dict[str, Any] = {
        "lookup_p50_ms": res.lookup.p50 if res.lookup else None,
        "gateway": {k: v.p50 for k, v in res.gateway.items()},
    }
    publish(args, figures, section, goal, write_doc, "semantic")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
