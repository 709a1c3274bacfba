"""The cost ledger end to end: a row for every request (misses, cache hits, failures, coalesced followers,
routed requests), all written on a clean stop, at most one flush interval lost to a kill -9 of `atajo serve`;
and `atajo report costs` over what was written."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from atajo.app import build_app
from atajo.cli.main import cli
from atajo.observe.report import cost_report
from atajo.settings import Settings
from tests.cache.conftest import POSTGRES_URL, need_server
from tests.conftest import openai_model
from tests.upstreams.live import LiveServer, free_port
from tests.upstreams.openai_server import Fault, OpenAIUpstream

Upstream = tuple[OpenAIUpstream, LiveServer]
PRICED = {"provider": "open", "kind": "chat", "input_per_1k": 0.001, "output_per_1k": 0.002, "context": 8192,
          "ttft_ms": 100, "tokens_per_s": 100, "quality": {"general": 0.7}}  # fmt: skip
DEAR = {**PRICED, "input_per_1k": 0.01, "output_per_1k": 0.02, "quality": {"general": 0.9}}
HI: list[Any] = [{"role": "user", "content": "hi"}]


async def _no_sleep(_: float) -> None:
    return None


def rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM atajo_ledger ORDER BY at")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def ledger_config(url: str, ledger_url: str, closed_port: int) -> dict[str, Any]:
    return {
        "catalog": {"models": {"cheap": PRICED, "dear": DEAR}},
        "models": {
            "cheap": openai_model(url, model="cheap"),
            "dear": openai_model(url, model="dear"),
            "down": openai_model(f"http://127.0.0.1:{closed_port}", model="cheap"),
        },
        "routing": {"models": {"auto": {"candidates": ["cheap", "dear"]}}},
        "cache": {"tiers": [{"url": "memory://", "ttl_s": 300}]},
        "retry": {"max_retries": 0},
        "ledger": {"url": ledger_url, "flush_interval_s": 3600},  # only the clean stop writes
    }


def test_every_request_is_recorded_and_a_clean_stop_writes_them_all(
    openai_upstream: Upstream, tmp_path: Path, closed_port: int
) -> None:
    upstream, up = openai_upstream
    db = tmp_path / "ledger.db"
    settings = Settings.model_validate(ledger_config(up.url, f"sqlite:///{db}", closed_port))
    with LiveServer(build_app(settings, sleep=_no_sleep)) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="dear", messages=HI)  # miss
        client.chat.completions.create(model="dear", messages=HI)  # hit
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="down", messages=HI)  # failure
        client.chat.completions.create(model="auto", messages=HI)  # routed to cheap
        upstream.fail_next(Fault(delay_s=0.5))  # the leader waits; its twin joins it

        async def twins() -> None:
            async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as c:
                messages: list[Any] = [{"role": "user", "content": "twins"}]
                await asyncio.gather(*(c.chat.completions.create(model="cheap", messages=messages) for _ in range(2)))

        asyncio.run(twins())
        list(client.chat.completions.create(model="cheap", messages=HI, stream=True))  # a stream, a miss
        assert rows(db) == []  # nothing written before the stop: the interval is an hour
    written = rows(db)
    assert len(written) == 7
    miss, hit, failure, routed, *rest = written
    coalesced = [r for r in rest if r["cause"] == "coalescing"]
    streamed = [r for r in rest if r["stream"]]
    # (11 * 10,000 + 7 * 20,000) // 1000 = 250 on dear; on cheap 25
    assert (miss["cause"], miss["cost_micros"], miss["baseline_micros"], miss["outcome"]) == ("none", 250, 250, "ok")
    assert (miss["prompt_tokens"], miss["completion_tokens"], miss["cache_status"]) == (11, 7, "miss")
    assert miss["response_model"] == "dear" and miss["requested_model"] == "dear" and miss["routed_model"] == "dear"
    assert (hit["cause"], hit["cost_micros"], hit["baseline_micros"], hit["cache_status"]) == (
        "cache", 0, 250, "hit-memory",
    )  # fmt: skip
    assert failure["outcome"] == "upstream_connect_error" and failure["cost_micros"] == 0
    assert (routed["requested_model"], routed["routed_model"], routed["cause"]) == ("auto", "cheap", "routing")
    assert (routed["cost_micros"], routed["baseline_micros"]) == (25, 250)  # baseline: the dearest candidate
    assert len(coalesced) == 1 and coalesced[0]["cost_micros"] == 0 and coalesced[0]["baseline_micros"] == 25
    assert len(streamed) == 1 and streamed[0]["cost_micros"] == 25 and streamed[0]["outcome"] == "ok"
    assert all(r["tenant"] == "default" and r["key_name"] == "anonymous" and r["latency_ms"] > 0 for r in written)
    (leader,) = [r for r in rest if r["cause"] != "coalescing" and not r["stream"]]
    assert leader["latency_ms"] >= 500, "the upstream's half-second wait is part of the request's latency"

    report = cost_report(f"sqlite:///{db}")
    causes = {r.name: r for r in report.by_cause}
    assert causes["cache"].saved_micros == 250 and causes["routing"].saved_micros == 225
    assert causes["coalescing"].saved_micros == 25 and causes["none"].saved_micros == 0
    assert report.total.requests == 7 and report.total.cost_micros == 250 + 25 + 25 + 25
    result = CliRunner().invoke(cli, ["report", "costs", "--url", f"sqlite:///{db}", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total"]["saved_micros"] == 500 and data["by_tenant"][0]["name"] == "default"
    table = CliRunner().invoke(cli, ["report", "costs", "--url", f"sqlite:///{db}"])
    assert table.exit_code == 0 and "routing" in table.output and "0.000225" in table.output
    none_yet = CliRunner().invoke(cli, ["report", "costs", "--url", f"sqlite:///{db}", "--since", "2999-01-01"])
    assert none_yet.exit_code == 0 and ": 0 requests" in none_yet.output


def test_report_on_a_missing_ledger_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", "costs", "--url", f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 1 and "cannot read the ledger" in result.output and "Traceback" not in result.output


@pytest.fixture
def postgres_ledger() -> Iterator[str]:
    need_server("PostgreSQL", "127.0.0.1", 5432)
    schema = f"ledger_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    asyncio.run(run(f"DROP SCHEMA {schema} CASCADE"))


def test_the_ledger_on_postgresql(openai_upstream: Upstream, postgres_ledger: str, closed_port: int) -> None:
    _, up = openai_upstream
    settings = Settings.model_validate(ledger_config(up.url, postgres_ledger, closed_port))
    with LiveServer(build_app(settings, sleep=_no_sleep)) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="auto", messages=HI)
        client.chat.completions.create(model="auto", messages=HI)
    report = cost_report(postgres_ledger)
    causes = {r.name: r for r in report.by_cause}
    assert causes["routing"].requests == 1 and causes["routing"].saved_micros == 225
    assert causes["cache"].requests == 1 and causes["cache"].saved_micros == 250


# --- a real `atajo serve` process ----------------------------------------------------------------------


def _serve(config: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ATAJO_CONFIG", "ATAJO_MASTER_KEY")}
    env["HOME"] = tempfile.mkdtemp(prefix="atajo-home-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "atajo", "serve", "--config", str(config), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:
                assert resp.status == 200
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"atajo serve never became ready: {proc.communicate()[1]}") from None
            time.sleep(0.05)


def _config(tmp_path: Path, flush_interval_s: float) -> tuple[Path, Path]:
    db = tmp_path / "ledger.db"
    path = tmp_path / "atajo.yaml"
    path.write_text(
        "models:\n  sim:\n    deployments:\n      - {provider: simulated, model: gpt-4o-mini,"
        " simulated: {ttft_ms: 0, tokens_per_s: 100000, jitter: 0}}\n"
        f"cache: {{enabled: false}}\nledger: {{url: 'sqlite:///{db}', flush_interval_s: {flush_interval_s}}}\n"
    )
    return path, db


def _ask(port: int, n: int, tag: str) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    for i in range(n):
        client.chat.completions.create(model="sim", messages=[{"role": "user", "content": f"{tag} {i}"}])
    client.close()


def test_kill_9_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    config, db = _config(tmp_path, 0.2)
    proc, port = _serve(config)
    try:
        _ask(port, 20, "early")
        # Within a few intervals the writer has flushed them (polled, not slept: the machine may be loaded).
        deadline = time.monotonic() + 15
        while len(rows(db)) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rows(db)) == 20
        _ask(port, 5, "late")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=15)
    kept = rows(db)
    assert 20 <= len(kept) <= 25  # the late ones were answered within the last interval: they may be lost
    assert {r["outcome"] for r in kept} == {"ok"}


def test_kill_9_with_a_long_interval_loses_what_was_pending_and_a_clean_stop_loses_nothing(tmp_path: Path) -> None:
    config, db = _config(tmp_path, 3600)
    proc, port = _serve(config)
    try:
        _ask(port, 5, "pending")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=15)
    assert rows(db) == []  # nothing was due to be written yet: the bound is the interval, and it is honest
    proc, port = _serve(config)
    _ask(port, 5, "clean")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert len(rows(db)) == 5
