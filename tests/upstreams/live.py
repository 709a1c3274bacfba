"""Run a server on 127.0.0.1 in a background thread with its own event loop: an aiohttp application (the fake
upstreams) or a :class:`~atajo.app.Gateway` on Atajo's own HTTP edge."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

from atajo.app import Gateway
from atajo.server.edge import EdgeServer

T = TypeVar("T")


def free_port() -> int:
    """A port nothing listens on right now (bound and released), for servers to start on or to find closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    def __init__(self, app: Gateway | web.Application | Callable[[], Awaitable[web.Application]]) -> None:
        self._app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._edge: EdgeServer | None = None
        self.port = 0

    @property
    def app(self) -> web.Application:
        assert isinstance(self._app, web.Application), "started from a factory"
        return self._app

    @property
    def gateway(self) -> Gateway:
        assert isinstance(self._app, Gateway), "not a gateway"
        return self._app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        if isinstance(self._app, Gateway):
            self._edge = await self._app.serve(sock=sock)
            return
        app = self._app if isinstance(self._app, web.Application) else await self._app()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return  # stopped already (a test that restarts a gateway stops it itself)
        if self._runner is not None:
            self.call(self._runner.cleanup())
        if self._edge is not None and isinstance(self._app, Gateway):
            self.call(self._app.shutdown(self._edge, timeout_s=1))
        self.call(self._cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _cancel_leftovers(self) -> None:
        """Handlers a test left hanging (a dropped connection's) end here, not in a "destroyed" warning."""
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
