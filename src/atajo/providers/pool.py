"""The pooled, keep-alive HTTP client every HTTP provider shares.

One aiohttp connector holds at most ``max_connections_per_host`` connections per upstream host and keeps
idle ones for ``keepalive_s``. It counts connections opened and requests sent per host, so metrics show
how well the pool is reused (opened ≪ sent).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
import orjson
from yarl import URL

from atajo.core.deployments import Deployment
from atajo.settings import PoolSettings


class _CountingConnector(aiohttp.TCPConnector):
    def __init__(self, opened: Counter[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._opened = opened

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        self._opened[f"{req.host}:{req.port}"] += 1
        return proto


class HttpPool:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.opened: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._host_keys: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[str, bool], aiohttp.ClientTimeout] = {}

    def count_sent(self, base_url: str) -> None:
        """Count a request under the same ``host:port`` key that connections opened are counted under."""
        key = self._host_keys.get(base_url)
        if key is None:
            url = URL(base_url)
            key = self._host_keys[base_url] = f"{url.host}:{url.port}"
        self.sent[key] += 1

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = _CountingConnector(
            self.opened,
            limit=self.settings.max_connections,
            limit_per_host=self.settings.max_connections_per_host,
            keepalive_timeout=self.settings.keepalive_s,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            skip_auto_headers=("User-Agent",),
            headers={"user-agent": "atajo"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpPool.start() was not awaited")
        return self._session

    def timeout(self, deployment: Deployment, streaming: bool) -> aiohttp.ClientTimeout:
        """Whole-request timeout for plain calls; for streams, the longest wait for the next bytes.

        ``connect_timeout_s`` bounds opening a TCP (and TLS) connection only (aiohttp's ``sock_connect``):
        aiohttp's ``connect`` also counts the wait for a free slot in the pool, and a request queued behind
        slow completions at ``max_connections_per_host`` is not failing to connect. That wait is bounded by
        ``timeout_s``, like the rest of the call.
        """
        key = (deployment.id, streaming)
        timeout = self._timeouts.get(key)
        if timeout is None:
            if streaming:
                timeout = aiohttp.ClientTimeout(
                    total=None,
                    connect=deployment.timeout_s,
                    sock_connect=deployment.connect_timeout_s,
                    sock_read=deployment.timeout_s,
                )
            else:
                timeout = aiohttp.ClientTimeout(total=deployment.timeout_s, sock_connect=deployment.connect_timeout_s)
            self._timeouts[key] = timeout
        return timeout

    def connections(self) -> tuple[int, int]:
        """(idle, in use) connections right now."""
        connector = self._session.connector if self._session else None
        if connector is None:
            return 0, 0
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        return idle, len(getattr(connector, "_acquired", ()))
