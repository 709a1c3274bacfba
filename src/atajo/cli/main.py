"""``atajo serve``, ``atajo config check``, ``atajo cache ...``, ``atajo eval ...``, ``atajo report costs``,
``atajo keys ...``, ``atajo tenants ...``, ``atajo --version``."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from atajo import __version__
from atajo.cli.cache import cache
from atajo.cli.keys import keys, tenants
from atajo.cli.report import report
from atajo.cli.routing import eval_routing
from atajo.cli.semantic import calibrate, eval_semantic
from atajo.errors import ConfigError
from atajo.settings import Settings, load_settings

log = logging.getLogger("atajo")

SHUTDOWN_TIMEOUT_S = 10


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="atajo")
def cli() -> None:
    """Atajo: an OpenAI-compatible LLM gateway that cuts cost and latency."""


@cli.command()
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ATAJO_CONFIG",
    help="YAML config file (env: ATAJO_CONFIG). Without one, Atajo proxies "
    "to OPENAI_BASE_URL when OPENAI_API_KEY is set, else runs on the simulated provider.",
)
@click.option("--host", help="Address to listen on (server.host; default 127.0.0.1).")
@click.option("--port", "-p", type=int, help="Port to listen on (server.port; default 4000).")
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(1, 64),
    help="Worker processes sharing the port (server.workers; default 1).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity (log_level; default info).",
)
@click.option("--access-log/--no-access-log", default=None, help="Log every request (server.access_log).")
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    log_level: str | None,
    access_log: bool | None,
) -> None:
    """Run the gateway: OpenAI-compatible API at http://HOST:PORT/v1, /health, /ready, /metrics."""
    settings = _load(config_path)
    server = settings.server.model_copy(
        update={
            k: v
            for k, v in {"host": host, "port": port, "workers": workers, "access_log": access_log}.items()
            if v is not None
        }
    )
    settings = settings.model_copy(update={"server": server, "log_level": log_level or settings.log_level})
    _setup_logging(settings.log_level)
    if settings.server.workers == 1:
        _run_worker(settings, sock=None)
        return
    # Several workers share one listening socket, bound here so the port is held before any starts.
    try:
        sock = socket.create_server((settings.server.host, settings.server.port), reuse_port=True, backlog=1024)
    except OSError as exc:
        _cannot_listen(settings, exc)
    procs = [
        multiprocessing.get_context("fork").Process(target=_run_worker, args=(settings, sock), daemon=True)
        for _ in range(settings.server.workers)
    ]
    for proc in procs:
        proc.start()
    sys.exit(_supervise(procs))


def _supervise(procs: Sequence[multiprocessing.process.BaseProcess]) -> int:
    """Wait on the workers. SIGTERM / SIGINT are passed on to them (each drains its requests); a worker that
    dies on its own stops the rest, so the process manager above (systemd, Kubernetes) restarts the whole."""
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sentinels = {proc.sentinel: proc for proc in procs}
    while sentinels:
        for ready in multiprocessing.connection.wait(list(sentinels)):
            proc = sentinels.pop(ready)  # type: ignore[arg-type]  # wait() returns the sentinels it was given
            proc.join()
            if not stopping:
                log.error("worker %s exited with code %s; stopping the others", proc.pid, proc.exitcode)
                stop(signal.SIGTERM, None)
                return 1
    return 0


def _run_worker(settings: Settings, sock: socket.socket | None) -> None:
    from atajo.app import build_app, describe_startup
    from atajo.auth.keys import KeyRing

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        pass
    gateway = build_app(settings)
    for line in describe_startup(settings, KeyRing(settings.auth).open):
        log.warning(line) if "SIMULATED" in line or "auth:" in line else log.info(line)
    # Everything built so far lives as long as the process: keep the collector from rescanning it, and
    # collect less often (the request path allocates many short-lived objects; measured in benchmarks).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        try:
            edge = await gateway.serve(
                sock=sock,
                host=None if sock else settings.server.host,
                port=None if sock else settings.server.port,
                access_log=logging.getLogger("atajo.access") if settings.server.access_log else None,
            )
        except OSError as exc:
            await gateway.close()
            _cannot_listen(settings, exc)
        where = f"http://{settings.server.host}:{settings.server.port}"
        log.info("atajo %s (pid %d) serving the OpenAI API at %s/v1", __version__, os.getpid(), where)
        await stopping.wait()
        log.info("stopping: finishing in-flight requests (up to %d s)", SHUTDOWN_TIMEOUT_S)
        await gateway.shutdown(edge, SHUTDOWN_TIMEOUT_S)

    asyncio.run(serve())


def _cannot_listen(settings: Settings, exc: OSError) -> NoReturn:
    """A port in use or an address not ours: one line that says which, exit 1 (no trace)."""
    reason = exc.strerror or str(exc)
    log.error("cannot listen on %s:%d: %s (server.host / server.port, --host / --port)",
              settings.server.host, settings.server.port, reason)  # fmt: skip
    sys.exit(1)


@cli.group()
def config() -> None:
    """Check configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE (with env overrides applied); print every error with its setting path."""
    settings = _load(file)
    if settings.cache.enabled and settings.cache.semantic.enabled:
        from atajo.cache.semantic_build import load_decider

        try:
            load_decider(settings.cache.semantic)
        except ConfigError as err:
            click.echo(f"config error: {err.message}", err=True)
            sys.exit(err.exit_code)
    n = sum(len(m.deployments) for m in settings.models.values())
    click.echo(f"{file}: OK ({len(settings.models)} models, {n} deployments)")


def _load(path: Path | None) -> Settings:
    from atajo.core.catalog import load_catalog

    try:
        settings = load_settings(path)
        load_catalog(settings.catalog)  # its errors name the field too (catalog.models.x.input_per_1k: ...)
        return settings
    except ConfigError as err:
        click.echo(f"config error: {err.message}", err=True)
        sys.exit(err.exit_code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


cli.add_command(cache)
cli.add_command(report)
cli.add_command(keys)
cli.add_command(tenants)
cache.add_command(calibrate)


@cli.group("eval")
def evaluate() -> None:
    """Measure the gateway's decisions on labelled data."""


evaluate.add_command(eval_semantic)
evaluate.add_command(eval_routing)


def main() -> None:
    cli(prog_name="atajo")
