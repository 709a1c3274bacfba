"""Turning a provider's HTTP status into the gateway's error tree, once, for every adapter."""

from __future__ import annotations

import datetime
import email.utils
import math
import time

from atajo.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable

# Statuses that describe the request itself: the client has to change it, so they pass through as they are.
CLIENT_STATUSES = frozenset({400, 409, 413, 415, 422})


def error_for_status(
    status: int, message: str, *, where: str, retry_after: str | None = None, param: str | None = None
) -> UpstreamError:
    if status in (401, 403):
        # Never echo the provider's words here: they may quote the gateway's key.
        return UpstreamError(f"{where} rejected the gateway's credentials ({status}); check its api_key")
    if status == 404:
        return UpstreamError(f"{where} answered 404: {message}")
    if status == 408:
        return UpstreamTimeout(f"{where} timed out (408): {message}")
    if status == 429 or status >= 500:
        return UpstreamUnavailable(
            f"{where} answered {status}: {message}",
            upstream_status=status,
            retry_after_s=parse_retry_after(retry_after),
        )
    if status in CLIENT_STATUSES:
        return UpstreamRejected(message, status=400 if status == 409 else status, param=param)
    return UpstreamError(f"{where} answered {status}: {message}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds or as an HTTP date; None when absent or unreadable.

    An HTTP date is always GMT (RFC 9110 section 5.6.7), also in the obsolete asctime form that writes no
    zone; "inf" or "nan" are not a number of seconds.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
