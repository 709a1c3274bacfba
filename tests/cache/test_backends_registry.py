"""The registry: URL scheme → backend, lazy driver imports, errors that name the setting and hide secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atajo.cache.backends import SCHEMES, open_backend, redact_url
from atajo.cache.memory import MemoryBackend
from atajo.cache.redis import RedisBackend
from atajo.cache.sql import SqlBackend
from atajo.errors import ConfigError
from tests.doubles import FakeClock

SETTING = "cache.tiers.1.url"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryBackend),
        ("redis://127.0.0.1:6379/0", RedisBackend),
        ("rediss://:secret@cache.example:6380/1", RedisBackend),
        ("unix:///run/redis/redis.sock?db=2", RedisBackend),
        ("sqlite:///relative/cache.db", SqlBackend),
        ("sqlite:////var/lib/atajo/cache.db", SqlBackend),
        ("sqlite://:memory:", SqlBackend),
        ("postgresql://postgres@127.0.0.1:5432/test", SqlBackend),
        ("postgres://user:pw@db.example/atajo", SqlBackend),
        ("REDIS://127.0.0.1:6379/0", RedisBackend),
    ],
)
def test_every_scheme_opens_its_backend_without_io(url: str, kind: type) -> None:
    backend = open_backend(url, clock=FakeClock(), max_bytes=4096, timeout_s=0.5)

    assert isinstance(backend, kind)
    assert backend.name == {MemoryBackend: "memory", RedisBackend: "redis", SqlBackend: "sql"}[kind]


def test_every_documented_scheme_is_registered() -> None:
    assert set(SCHEMES) == {"memory", "redis", "rediss", "unix", "sqlite", "postgresql", "postgres"}


def test_options_reach_the_backend() -> None:
    clock = FakeClock()
    memory = open_backend("memory://", clock=clock, max_bytes=12345)
    redis = open_backend("redis://h:1/0", clock=clock, prefix="p:", timeout_s=0.1)
    sql = open_backend("sqlite:///c.db", clock=clock, table_prefix="mine_")

    assert isinstance(memory, MemoryBackend) and memory.max_bytes == 12345
    assert isinstance(redis, RedisBackend) and (redis.prefix, redis.timeout_s) == ("p:", 0.1)
    assert isinstance(sql, SqlBackend) and sql.table_prefix == "mine_"


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("sqlite:///relative/cache.db", "relative/cache.db"),
        ("sqlite:////abs/cache.db", "/abs/cache.db"),
        ("sqlite:///~/.cache/atajo/cache.db", os.path.expanduser("~/.cache/atajo/cache.db")),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_paths(url: str, database: str) -> None:
    backend = open_backend(url, clock=FakeClock())

    assert isinstance(backend, SqlBackend)
    assert (backend.dialect.name, backend.database) == ("sqlite", database)


async def test_a_sqlite_file_is_created_with_its_directory(tmp_path: Path) -> None:
    backend = open_backend(f"sqlite:///{tmp_path}/deep/er/cache.db", clock=FakeClock())
    await backend.start()
    try:
        await backend.ping()
    finally:
        await backend.close()
    assert (tmp_path / "deep" / "er" / "cache.db").is_file()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://admin:hunter2@db.example/cache", "scheme 'mysql'"),
        ("cache.db", "no scheme"),
        ("file:///tmp/x", "scheme 'file'"),
    ],
)
def test_an_unknown_scheme_is_a_config_error_naming_it(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        open_backend(url, clock=FakeClock(), setting=SETTING)

    message = str(raised.value)
    assert message.startswith(f"{SETTING}: ")
    assert says in message and "memory://" in message and "postgresql://" in message
    assert "hunter2" not in message and "admin" not in message
    assert raised.value.param == SETTING and raised.value.exit_code == 2


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("sqlite://relative.db", {}),
        ("sqlite:///c.db", {"table_prefix": "bad-prefix; DROP TABLE x"}),
        ("memory://", {"prefix": "p:"}),
        ("postgresql://u:hunter2@h/db", {"max_bytes_typo": 1}),
    ],
)
def test_a_malformed_url_or_option_is_a_config_error(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as raised:
        open_backend(url, clock=FakeClock(), setting=SETTING, **options)

    assert str(raised.value).startswith(f"{SETTING}: ")
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "driver", "extra"),
    [
        ("redis://:hunter2@cache.example:6379/0", "redis", "atajo[redis]"),
        ("postgresql://atajo:hunter2@db.example/cache", "asyncpg", "atajo[postgres]"),
        ("postgres://atajo:hunter2@db.example/cache", "asyncpg", "atajo[postgres]"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, url: str, driver: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, driver, None)  # what an absent package looks like to `import`
    for name in [n for n in sys.modules if n.startswith(driver + ".") or n in ("atajo.cache.redis", "atajo.cache.sql")]:
        monkeypatch.delitem(sys.modules, name)

    with pytest.raises(ConfigError) as raised:
        open_backend(url, clock=FakeClock(), setting=SETTING)

    message = str(raised.value)
    assert message.startswith(f"{SETTING}: ") and f"pip install '{extra}'" in message
    assert "hunter2" not in message


def test_importing_the_registry_imports_no_driver() -> None:
    code = (
        "import sys, atajo.cache.backends\n"
        "print(sorted(m for m in ('redis', 'asyncpg', 'aiosqlite', 'atajo.cache.redis', 'atajo.cache.sql')"
        " if m in sys.modules))"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)

    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:pw@host:5432/db", "postgresql://***@host:5432/db"),
        ("redis://:pw@host:6379/0", "redis://***@host:6379/0"),
        ("redis://user@host", "redis://***@host"),
        ("postgresql://u:p@ss/w@rd@host/db", "postgresql://***@host/db"),
        (
            "postgresql://host/db?user=u&password=pw&sslmode=require",
            "postgresql://host/db?user=u&password=***&sslmode=require",
        ),
        ("sqlite:////var/cache.db", "sqlite:////var/cache.db"),
        ("memory://", "memory://"),
        ("user:pw@host", "***@host"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_backends_do_not_show_credentials() -> None:
    clock = FakeClock()
    for url in ["redis://:hunter2@h:6379/0", "postgresql://u:hunter2@h/db"]:
        assert "hunter2" not in repr(open_backend(url, clock=clock))
