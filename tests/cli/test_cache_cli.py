"""``atajo cache stats | invalidate | flush`` against a running gateway."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from click.testing import CliRunner

from atajo.cli.main import cli
from tests.conftest import GatewayFactory

MASTER = "sk-cli-master"


def _gateway(gateway: GatewayFactory, tmp_path: Path) -> str:
    gw = gateway(
        {
            "auth": {"master_key": MASTER},
            "cache": {
                "tiers": [{"url": "memory://", "ttl_s": 60}, {"url": f"sqlite:///{tmp_path}/c.db", "ttl_s": 600}]
            },
        }
    )
    headers = {"authorization": f"Bearer {MASTER}"}
    for i in range(3):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}], "user": "42" if i else "7"}
        assert httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
    return gw.url


def test_stats_invalidate_and_flush(gateway: GatewayFactory, tmp_path: Path) -> None:
    url = _gateway(gateway, tmp_path)
    run = CliRunner().invoke
    env = {"ATAJO_URL": url, "ATAJO_MASTER_KEY": MASTER}
    # writes are behind the responses: stats may need a moment
    for _ in range(50):
        stats = run(cli, ["cache", "stats", "--json"], env=env)
        if stats.output.count('"entries": 3') == 2:
            break
        time.sleep(0.02)
    assert stats.exit_code == 0, stats.output
    assert stats.output.count('"entries": 3') == 2
    table = run(cli, ["cache", "stats"], env=env)
    assert "memory" in table.output and "sql" in table.output
    result = run(cli, ["cache", "invalidate", "--tag", "user:42"], env=env)
    assert result.exit_code == 0, result.output
    assert "dropped 4 entries (memory 2, sql 2)" in result.output
    result = run(cli, ["cache", "flush", "--yes"], env=env)
    assert result.exit_code == 0 and "dropped 2 entries" in result.output


def test_errors_are_one_line_and_exit_1(gateway: GatewayFactory, tmp_path: Path) -> None:
    url = _gateway(gateway, tmp_path)
    result = CliRunner().invoke(cli, ["cache", "stats", "--url", url, "--key", "sk-wrong"])
    assert result.exit_code == 1
    assert "error: 401" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["cache", "stats", "--url", "http://127.0.0.1:9", "--key", MASTER])
    assert result.exit_code == 1 and "cannot reach the gateway" in result.output
    result = CliRunner().invoke(cli, ["cache", "invalidate", "--url", url, "--key", MASTER])
    assert result.exit_code == 1 and "error: 400" in result.output
