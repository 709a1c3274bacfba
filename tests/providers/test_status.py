"""A provider's HTTP status → the gateway's error tree, and Retry-After in both of its forms."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from email.utils import formatdate

import pytest

from atajo.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from atajo.providers.status import error_for_status, parse_retry_after

WHERE = "deployment m/0:openai"
SECRET_MESSAGE = "Incorrect API key provided: sk-proj-abc***xyz. You can find your API key at platform."


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_request_rejections_keep_their_status_and_message(status: int) -> None:
    err = error_for_status(status, "'temperature' is too high", where=WHERE, param="temperature")
    assert isinstance(err, UpstreamRejected)
    assert (err.status, err.message, err.param, err.retryable) == (
        status,
        "'temperature' is too high",
        "temperature",
        False,
    )
    assert err.type == "invalid_request_error"


def test_conflict_becomes_400() -> None:
    err = error_for_status(409, "conflict", where=WHERE)
    assert isinstance(err, UpstreamRejected) and err.status == 400


@pytest.mark.parametrize("status", [401, 403])
def test_credential_failures_are_502_and_never_echo_the_provider(status: int) -> None:
    err = error_for_status(status, SECRET_MESSAGE, where=WHERE)
    assert type(err) is UpstreamError
    assert err.status == 502 and not err.retryable
    assert "sk-proj" not in err.message and "Incorrect" not in err.message
    assert WHERE in err.message and str(status) in err.message


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_are_retryable_502(status: int) -> None:
    err = error_for_status(status, "overloaded", where=WHERE, retry_after="2")
    assert isinstance(err, UpstreamUnavailable)
    assert (err.status, err.retryable, err.upstream_status, err.retry_after_s) == (502, True, status, 2.0)
    assert f"answered {status}: overloaded" in err.message


def test_rate_limit_is_429_with_retry_after() -> None:
    err = error_for_status(429, "slow down", where=WHERE, retry_after="7")
    assert isinstance(err, UpstreamUnavailable)
    assert (err.status, err.code, err.type, err.retryable, err.retry_after_s) == (
        429,
        "upstream_rate_limited",
        "rate_limit_exceeded",
        True,
        7.0,
    )


def test_408_is_a_retryable_timeout() -> None:
    err = error_for_status(408, "request timeout", where=WHERE)
    assert isinstance(err, UpstreamTimeout) and err.status == 504 and err.retryable


@pytest.mark.parametrize("status", [301, 307, 402, 404, 405, 410])
def test_other_statuses_are_non_retryable_502(status: int) -> None:
    err = error_for_status(status, "nope", where=WHERE)
    assert type(err) is UpstreamError and err.status == 502 and not err.retryable


# --- Retry-After --------------------------------------------------------------------------------------

NOW = calendar.timegm((2015, 10, 21, 7, 27, 30, 0, 0, 0))  # 30 s before 07:28:00 GMT


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with a local time zone nine hours from UTC: an HTTP date is always GMT, whatever the host's zone."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("3", 3.0), ("120", 120.0), ("1.5", 1.5), (" 4 ", 4.0), ("-3", 0.0)],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",  # IMF-fixdate, the preferred form
        "Wednesday, 21-Oct-15 07:28:00 GMT",  # obsolete RFC 850 form
        "Wed Oct 21 07:28:00 2015",  # obsolete asctime form: no zone written, GMT by definition
        "Wed, 21 Oct 2015 07:28:00 -0000",
        "Wed, 21 Oct 2015 16:28:00 +0900",
    ],
)
@pytest.mark.usefixtures("far_from_utc")
def test_retry_after_http_date_in_every_form_is_gmt(value: str) -> None:
    assert parse_retry_after(value, now=NOW) == pytest.approx(30.0)


def test_retry_after_date_against_the_real_clock() -> None:
    value = formatdate(time.time() + 20, usegmt=True)
    delay = parse_retry_after(value)
    assert delay is not None and 15 < delay <= 20


def test_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=NOW) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "soon", "Wed, 99 Oct 2015 07:28:00 GMT", "inf", "-inf", "nan", "Infinity", "1e400"]
)
def test_unreadable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value) is None
