"""The command line: --version, serve --help, config check, and a real `python -m atajo serve` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from atajo import __version__
from atajo.cli.main import cli
from tests.upstreams.live import free_port


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_serve_help_documents_every_option() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--host", "--port", "--workers", "--log-level", "--access-log"):
        assert option in result.output


def test_config_check_ok(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("models:\n  m:\n    deployments:\n      - provider: simulated\n      - provider: simulated\n")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 0
    assert "OK (1 models, 2 deployments)" in result.output


def test_config_check_names_the_bad_setting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pool:\n  max_connections_per_host: 0\nmodels:\n  m:\n    deployments: [{provider: x}]\n")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "pool.max_connections_per_host" in result.output
    assert "models.m.deployments.0.provider" in result.output
    assert "Traceback" not in result.output


def test_config_check_loads_the_semantic_decision(tmp_path: Path) -> None:
    path = tmp_path / "semantic.yaml"
    path.write_text("cache:\n  semantic:\n    enabled: true\n    decision: {model: gone.npz, threshold: 0.5}\n")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "cache.semantic.decision" in result.output and "gone.npz" in result.output
    path.write_text("cache:\n  semantic:\n    enabled: true\n    decision: {threshold: 0.5}\n")
    assert CliRunner().invoke(cli, ["config", "check", str(path)]).exit_code == 0


def _serve(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ATAJO_CONFIG", "ATAJO_MASTER_KEY")}
    env["HOME"] = tempfile.mkdtemp(prefix="atajo-home-")  # the default SQLite cache tier lives under ~/.cache
    proc = subprocess.Popen(
        [sys.executable, "-m", "atajo", "serve", "--port", str(port), *args],
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


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_serve_starts_on_the_simulated_provider_and_says_so() -> None:
    proc, port = _serve()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    assert "SIMULATED" in stderr
    assert f"http://127.0.0.1:{port}/v1" in stderr
    assert proc.returncode == 0


def test_workers_share_the_port_and_stop_with_the_parent() -> None:
    proc, port = _serve("--workers", "2")
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
        for _ in range(4):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
                assert resp.headers["x-atajo-simulated"] == "true"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert stderr.count("serving the OpenAI API") == 2
    assert all(_gone(pid) for pid in workers)  # no orphans left serving the port


def test_a_dying_worker_stops_the_rest() -> None:
    proc, _ = _serve("--workers", "2")
    workers = _children(proc.pid)
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert f"worker {workers[0]} exited" in stderr
    assert _gone(workers[1])


def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ATAJO_MASTER_KEY")}
    env["HOME"] = str(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            proc = subprocess.run(
                [sys.executable, "-m", "atajo", "serve", "--port", str(port), "--workers", workers],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
            assert proc.returncode == 1, proc.stderr
            assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
            assert "Traceback" not in proc.stderr
