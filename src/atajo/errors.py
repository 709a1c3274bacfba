"""The one exception tree. Every error a client can see is one of these.

    AtajoError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── MalformedJSON           400 (code invalid_json)
    │   ├── UnsupportedParameter    400 (code unsupported_parameter)
    ├── AuthenticationFailed        401 authentication_error
    ├── PermissionDenied            403 permission_error (a valid key that may not do this)
    ├── NotFound                    404 (unknown route)
    │   └── ModelNotFound           404 (code model_not_found)
    ├── MethodNotAllowed            405
    ├── Conflict                    409 (the resource's state does not allow it: cancelling a finished batch)
    ├── PayloadTooLarge             413
    ├── RateLimited                 429 rate_limit_exceeded (carries retry_after_s)
    │   └── BudgetExceeded          429 insufficient_quota (code budget_exceeded; names the budget)
    ├── UpstreamError               502 upstream_error: a provider failed us
    │   ├── UpstreamRejected        the provider's own status (4xx about the request), not retryable
    │   ├── UpstreamUnavailable     502, retryable (5xx, 429, credentials or protocol trouble)
    │   ├── UpstreamConnectError    502, retryable
    │   ├── UpstreamTimeout         504, retryable
    │   ├── UpstreamStreamBroken    502, the stream ended early (after the first chunk: not retryable)
    │   ├── DeploymentSaturated     429, the deployment's adaptive concurrency cap is full (next deployment)
    │   └── CircuitOpen             503, the deployment is known to be down; tried in microseconds
    ├── AllAttemptsFailed           every deployment failed; status of the most telling error, errors listed
    ├── ClientClosed                (499, counted only: the client left mid-stream)
    ├── ServiceUnavailable          503
    │   └── NoHealthyModel          503 (code no_healthy_model: every eligible model's circuit is open)
    └── ConfigError                 not an HTTP error: a bad config file, names the setting (exit code 2)

Foreign exceptions (aiohttp, orjson, pydantic) are translated where they are caught, at the edges.
"""

from __future__ import annotations

from collections.abc import Sequence


class AtajoError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False
    exit_code: int = 1

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, str | None]:
        """The error object of OpenAI's format (what goes under ``"error"``)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(AtajoError):
    status = 400
    type = "invalid_request_error"


class MalformedJSON(InvalidRequest):
    code = "invalid_json"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class AuthenticationFailed(AtajoError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(AtajoError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(AtajoError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(AtajoError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(AtajoError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(AtajoError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(AtajoError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class UpstreamError(AtajoError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamRejected(UpstreamError):
    """The provider refused the request itself (400, 413, 422...): the client's to fix, so it keeps the status."""

    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status


class UpstreamUnavailable(UpstreamError):
    retryable = True

    def __init__(self, message: str, *, upstream_status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.retry_after_s = retry_after_s
        if upstream_status == 429:
            self.status, self.type, self.code = 429, "rate_limit_exceeded", "upstream_rate_limited"


class DeploymentSaturated(UpstreamUnavailable):
    """Our own protection of a struggling provider: its deployment's concurrency cap is reached. Not retried on
    the same deployment (the next one, or a fallback, is tried); it says nothing about the deployment's health."""

    retryable = False

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, upstream_status=429, retry_after_s=retry_after_s)
        self.code = "upstream_saturated"


class UpstreamConnectError(UpstreamError):
    retryable = True
    code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    retryable = True
    code = "upstream_timeout"


class UpstreamStreamBroken(UpstreamError):
    code = "upstream_stream_broken"


class CircuitOpen(UpstreamError):
    status = 503
    retryable = True
    code = "circuit_open"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AllAttemptsFailed(AtajoError):
    """Every deployment we tried failed. The status is that of the most telling error."""

    def __init__(self, errors: Sequence[tuple[str, AtajoError]]) -> None:
        parts = "; ".join(f"{where}: {err.message}" for where, err in errors)
        super().__init__(f"all {len(errors)} attempts failed: {parts}")
        self.errors = list(errors)
        last = _most_telling(self.errors)
        self.status, self.type, self.code = last.status, last.type, last.code
        self.retry_after_s = getattr(last, "retry_after_s", None)


def _most_telling(errors: Sequence[tuple[str, AtajoError]]) -> AtajoError:
    # A real answer from a provider (rejection, rate limit, timeout) says more than "circuit open".
    for _, err in reversed(errors):
        if not isinstance(err, CircuitOpen):
            return err
    return errors[-1][1]


class ClientClosed(AtajoError):
    """The client went away before the answer was complete; only ever counted, never sent."""

    status = 499
    type = "client_closed"
    code = "client_closed"


class ServiceUnavailable(AtajoError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class ConfigError(AtajoError):
    """A bad configuration; the message names the setting path (e.g. ``models.gpt-4o.deployments.0.provider``)."""

    exit_code = 2


class NoModelMeetsConstraints(InvalidRequest):
    """No routed candidate meets the request's hard constraints; ``param`` names the header or setting that
    excluded the last ones."""

    code = "no_model_meets_constraints"


class NoHealthyModel(ServiceUnavailable):
    """Every candidate that meets the request's constraints has its circuits open."""

    code = "no_healthy_model"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceeded(RateLimited):
    """The request would take a budget past its limit (OpenAI answers an exhausted quota with 429 too)."""

    type = "insufficient_quota"
    code = "budget_exceeded"
