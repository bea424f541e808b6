"""Dates as days since the Unix epoch (UTC, float).

Every date in the data layer is one float: days since 1970-01-01T00:00:00 UTC, fractional days
kept. Time-aware pooling only needs differences, and a float sorts and subtracts without
timezone surprises.

Example::

    >>> parse_date("1970-01-02")
    1.0
    >>> parse_date("05/13/2014") == parse_date("2014-05-13")
    True
    >>> format_date(parse_date(881250949))
    '1997-12-04T15:55:49'
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

from recsys_tapper.errors import InputError

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SECONDS_PER_DAY = 86400.0
_MS_THRESHOLD = 1e11  # epoch seconds reach 1e11 in the year 5138; larger numbers are milliseconds
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}([T ].*)?")
_MDY = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")


class DateParseError(InputError):
    """A value that is not a date we understand; the message quotes the value."""


_MIN_DAYS = (datetime(1, 1, 2, tzinfo=timezone.utc) - _EPOCH).days  # keep clear of datetime's range ends
_MAX_DAYS = (datetime(9999, 12, 30, tzinfo=timezone.utc) - _EPOCH).days


def _in_range(days: float, original: object) -> float:
    if not _MIN_DAYS <= days <= _MAX_DAYS:
        raise DateParseError(f"cannot parse date {original!r}: outside years 1..9999")
    return days


def _from_epoch_number(x: float, original: object) -> float:
    try:
        x = float(x)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise DateParseError(f"cannot parse date {original!r}: not a finite number")
    seconds = x / 1000.0 if abs(x) > _MS_THRESHOLD else x
    return _in_range(seconds / _SECONDS_PER_DAY, original)


def _from_datetime(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH).total_seconds() / _SECONDS_PER_DAY


def parse_date(value: object) -> float | None:
    """Parse one date into days since the Unix epoch (UTC).

    Args:
        value: ``None`` or ``""`` (-> ``None``); an int/float of epoch seconds (values above 1e11
            are milliseconds); a numeric string, read the same way; an ISO date ``"2014-05-13"``;
            an ISO datetime ``"1997-12-04T15:55:49"`` (naive means UTC, an offset is honoured);
            or a LaMP-style ``"05/13/2014"`` (month/day/year).

    Returns:
        Days since 1970-01-01 UTC as a float, or ``None`` for an empty value.

    Raises:
        DateParseError: anything else, including NaN/inf, booleans and dates outside years
            1..9999; the message quotes the value.

    Example::

        >>> parse_date(86400 * 3 + 43200)
        3.5
        >>> parse_date("1970-01-01T12:00:00+02:00")
        0.4166666666666667
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise DateParseError(f"cannot parse date {value!r}: booleans are not dates")
    if isinstance(value, (int, float)):
        return _from_epoch_number(value, value)
    if not isinstance(value, str):
        raise DateParseError(f"cannot parse date {value!r}: expected a string or a number")
    s = value.strip()
    if not s:
        return None
    if _NUMBER.fullmatch(s):
        return _from_epoch_number(float(s), value)
    try:
        if _ISO.fullmatch(s):
            return _from_datetime(datetime.fromisoformat(s))
        m = _MDY.fullmatch(s)
        if m:
            month, day, year = (int(g) for g in m.groups())
            return _from_datetime(datetime(year, month, day))
    except ValueError as err:  # out-of-range month/day, bad time part
        raise DateParseError(f"cannot parse date {value!r}: {err}") from None
    raise DateParseError(f"cannot parse date {value!r}: expected epoch seconds, ISO 8601 or MM/DD/YYYY")


def format_date(days: float) -> str:
    """Format days since the epoch as an ISO datetime ``YYYY-MM-DDTHH:MM:SS`` (UTC).

    Rounds to the nearest second, so ``parse_date(format_date(d))`` equals ``d`` to the second and
    ``format_date(parse_date(s)) == s`` for any second-precision ISO datetime ``s``.

    Args:
        days: days since 1970-01-01 UTC; must be finite.

    Example::

        >>> format_date(0.5)
        '1970-01-01T12:00:00'
    """
    if not math.isfinite(days):
        raise DateParseError(f"cannot format date {days!r}: not a finite number")
    try:  # the range check in parse_date keeps parsed dates well inside
        dt = _EPOCH + timedelta(seconds=round(days * _SECONDS_PER_DAY))
    except OverflowError:
        raise DateParseError(f"cannot format date {days!r}: outside years 1..9999") from None
    return dt.replace(tzinfo=None).isoformat(timespec="seconds")
