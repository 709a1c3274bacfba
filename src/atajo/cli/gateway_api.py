"""Calling a running gateway's HTTP API from the command line (``atajo cache …``, ``atajo keys …``): the
``--url`` / ``--key`` options, and one request with errors printed in one line and exit status 1."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import click

URL_HELP = "Gateway base URL (env ATAJO_URL)."


def options(key_help: str) -> Callable[[Any], Any]:
    """``--url`` (env ATAJO_URL) and ``--key`` (env ATAJO_MASTER_KEY) on a command."""

    def add(f: Any) -> Any:
        f = click.option(
            "--url", envvar="ATAJO_URL", default="http://127.0.0.1:4000", show_default=True, help=URL_HELP
        )(f)
        return click.option("--key", envvar="ATAJO_MASTER_KEY", default="", help=key_help)(f)

    return add


def call(url: str, key: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON answer; on an HTTP error or an unreachable gateway, says why on stderr and exits 1."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        click.echo(f"error: {exc.code} {message}", err=True)
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"error: cannot reach the gateway at {url}: {getattr(exc, 'reason', exc)}", err=True)
    sys.exit(1)
