"""The staged request pipeline: an onion of stages built once, in the order declared in ``app.py``.

A stage gets the request, its context and the next handler; it may answer by itself (short-circuit) or
call ``call_next`` and look at (or wrap) what comes back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from atajo.core.context import RequestContext
from atajo.core.requests import Request
from atajo.core.results import Result

Handler = Callable[[Request, RequestContext], Awaitable[Result]]


class Stage(Protocol):
    name: str

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result: ...


def build_pipeline(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Compose ``stages`` (outermost first) around ``terminal`` into one handler."""
    handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, call_next: Handler) -> Handler:
    async def handle(request: Request, ctx: RequestContext) -> Result:
        return await stage(request, ctx, call_next)

    handle.__qualname__ = f"stage[{stage.name}]"
    return handle
