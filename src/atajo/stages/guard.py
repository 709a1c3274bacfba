"""Guard stage: looks at what users send before anything else is spent on it.

Today it looks for prompt-injection attempts (``observe/injection.py``). A finding is counted
(``atajo_guard_flags_total{kind}``), told to the adaptive limits as a flag on the client (flagged clients get
lower limits), marked on the answer (``x-atajo-guard: prompt_injection``) and, with
``guard.block_prompt_injection``, refused with a 400.
"""

from __future__ import annotations

from collections.abc import Callable

from atajo.core.context import Principal, RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import Result
from atajo.errors import InvalidRequest
from atajo.observe.injection import detect, user_texts

Flag = Callable[[Principal], None]


class PromptInjection(InvalidRequest):
    code = "prompt_injection_detected"


class GuardStage:
    name = "guard"

    def __init__(self, *, block: bool, count: Callable[[str], None], flag: Flag | None = None) -> None:
        self.block = block
        self.count = count
        self.flag = flag

    async def __call__(self, request: Request, ctx: RequestContext, call_next: Handler) -> Result:
        if request.operation == "chat":
            kind = detect(user_texts(request.body))
            if kind is not None:
                self.count(kind)
                if self.flag is not None and ctx.principal is not None:
                    self.flag(ctx.principal)
                ctx.extra_headers = {**(ctx.extra_headers or {}), "x-atajo-guard": f"prompt_injection; {kind}"}
                if self.block:
                    raise PromptInjection(
                        "The request looks like a prompt-injection attempt and this gateway refuses those.",
                        param="messages",
                    )
        return await call_next(request, ctx)
