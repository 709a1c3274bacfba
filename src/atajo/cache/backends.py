"""The one registry of tier backends, chosen by URL scheme.

    memory://                                   MemoryBackend (in-process LRU, ``max_bytes``)
    redis://host:port/db  rediss://…  unix://…  RedisBackend  (extra ``atajo[redis]``)
    sqlite:///relative.db  sqlite:////abs.db    SqlBackend    (aiosqlite, a core dependency)
    postgresql://user@host:port/db  postgres:// SqlBackend    (extra ``atajo[postgres]``)

Drivers are imported only when a backend of theirs is opened, so ``import atajo.cache.backends`` costs
nothing and a missing extra is reported as a ``ConfigError`` that says what to install. URLs in messages
always go through ``redact_url``: credentials never reach an exception or a log line.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from atajo.cache.entry import CacheBackend, Clock
from atajo.errors import ConfigError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_SECRET_PARAM = re.compile(r"(?i)([?&][^=&#]*(?:pass|secret|token|key)[^=&#]*=)[^&#]*")


def redact_url(url: str) -> str:
    """``url`` without its credentials: ``postgresql://user:pw@host/db`` → ``postgresql://***@host/db``;
    secret-looking query parameters (``?password=…``) are masked too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:  # the last @ ends the user info, even when the password holds a / or an @
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + _SECRET_PARAM.sub(r"\1***", rest)


def _open_memory(url: str, clock: Clock, max_bytes: int, options: dict[str, Any]) -> CacheBackend:
    from atajo.cache.memory import MemoryBackend

    options.pop("timeout_s", None)  # in-process: nothing to wait for
    _no_more(url, options)
    return MemoryBackend(max_bytes, clock)


def _open_redis(url: str, clock: Clock, max_bytes: int, options: dict[str, Any]) -> CacheBackend:
    module = _import(url, "atajo.cache.redis", "redis")
    allowed = {"prefix", "timeout_s", "max_connections"}
    _no_more(url, {k: v for k, v in options.items() if k not in allowed})
    backend: CacheBackend = module.RedisBackend(url, clock, **options)
    return backend


def _open_sql(url: str, clock: Clock, max_bytes: int, options: dict[str, Any]) -> CacheBackend:
    scheme = url.partition("://")[0].lower()
    module = _import(url, "atajo.cache.sql", "sqlite" if scheme == "sqlite" else "postgres")
    allowed = {"table_prefix", "timeout_s", "pool_size"}
    _no_more(url, {k: v for k, v in options.items() if k not in allowed})
    backend: CacheBackend = module.SqlBackend(url, clock, **options)
    return backend


_Opener = Callable[[str, Clock, int, dict[str, Any]], CacheBackend]

SCHEMES: dict[str, _Opener] = {
    "memory": _open_memory,
    "redis": _open_redis,
    "rediss": _open_redis,
    "unix": _open_redis,
    "sqlite": _open_sql,
    "postgresql": _open_sql,
    "postgres": _open_sql,
}

_DRIVERS = {
    "redis": ("redis", "atajo[redis]"),
    "postgres": ("asyncpg", "atajo[postgres]"),
    "sqlite": ("aiosqlite", "atajo"),
}


def open_backend(
    url: str,
    *,
    clock: Clock,
    max_bytes: int = DEFAULT_MAX_BYTES,
    setting: str = "cache.tiers.url",
    **options: Any,
) -> CacheBackend:
    """The backend ``url`` names, not started (no I/O here). ``max_bytes`` bounds the memory tier; ``options``
    go to the chosen backend (``timeout_s`` is accepted by all; ``prefix``: redis; ``table_prefix``: sql).
    ``setting`` is the configuration path named in errors (``cache.tiers.1.url``)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    opener = SCHEMES.get(scheme)
    if opener is None:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"{setting}: {redact_url(url)!r} has {shown}; use one of {known}", param=setting)
    try:
        return opener(url, clock, max_bytes, dict(options))
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc.message}", param=setting) from None
    except ValueError as exc:  # a malformed URL or option, reported by the backend's constructor
        raise ConfigError(f"{setting}: {redact_url(url)!r}: {exc}", param=setting) from None


def _import(url: str, module: str, driver: str) -> Any:
    """``module``, after its driver (imported here, so a missing one is reported before any I/O)."""
    package, extra = _DRIVERS[driver]
    try:
        importlib.import_module(package)
    except ImportError:
        scheme = url.partition("://")[0]
        raise ConfigError(f"{scheme}:// cache backends need the {package!r} package: pip install '{extra}'") from None
    return importlib.import_module(module)


def _no_more(url: str, options: dict[str, Any]) -> None:
    if options:
        scheme = url.partition("://")[0]
        raise ConfigError(f"{scheme}:// cache backends take no option {', '.join(sorted(options))}")
