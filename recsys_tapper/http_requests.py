"""Request bodies of the HTTP service and their checks: every bad field becomes an :class:`ApiError` naming it.

The pydantic models reject unknown fields and wrong JSON types (strict: ``"3"`` is not a number, ``true`` is
not an integer); the checks here do the rest (empty or over-long text, dates, labels, duplicates)::

    POST /v1/answer   {"user_id": "405", "question": "Rate the movie ...", "date": "1998-04-01",
                       "history": [{"record_id": "a", "text": "Heat (1995) | Action", "label": "5",
                                    "timestamp": 881250949}], "item_id": null}
    POST /v1/events   {"events": [{"user_id": "405", "record_id": "r9", "text": "...", "label": "4",
                                   "timestamp": "1998-04-02T10:00:00"}]}

Timestamps and dates are epoch seconds (numbers above 1e11 are milliseconds) or date strings
(``recsys_tapper.data.parse_date``: ISO 8601, MM/DD/YYYY), as in ``tapper update``. Field names in errors are
paths into the body: ``events[2].timestamp``, ``history[0].label``.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from recsys_tapper.data import ProfileRecord, format_date, parse_date
from recsys_tapper.data.dates import DateParseError
from recsys_tapper.serve import Query
from recsys_tapper.tasks import Task

MAX_ID_CHARS = 256


class ApiError(Exception):
    """A bad request: HTTP ``status`` and the body's ``field`` that is wrong."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class HistoryIn(_Strict):
    record_id: str | int
    text: str
    label: str | int
    timestamp: str | int | float | None = None


class EventIn(_Strict):
    user_id: str | int
    record_id: str | int
    text: str
    label: str | int
    timestamp: str | int | float


class AnswerIn(_Strict):
    user_id: str | int
    question: str
    history: list[HistoryIn] | None = None
    date: str | int | float | None = None
    item_id: str | int | None = None


class EventsIn(_Strict):
    events: list[EventIn]


@dataclass
class Limits:
    """Args: max_text_chars: a question's or record's text. max_events: events in one request.
    max_history: records in an answer's inline history. max_clock_skew_s: how far past the server's clock an
    event's timestamp may be."""

    max_text_chars: int = 4000
    max_events: int = 1000
    max_history: int = 5000
    max_clock_skew_s: float = 60.0


def text_field(task: Task) -> str:
    """The record field an event's ``text`` fills: the one non-label field of the task's templates."""
    names = {f for t in (task.record_template, task.input_template or "")
             for _, f, _, _ in string.Formatter().parse(t) if f} - {task.output_field}
    if task.output_field is None or len(names) != 1:
        raise ValueError(f"task {task.name}: records are not (text, label) pairs; the service takes events for "
                         "tasks whose records carry one text field and a label")
    return names.pop()


def _id(value: str | int, field: str) -> str:
    s = str(value).strip()
    if not s:
        raise ApiError(422, field, "must not be empty")
    if len(s) > MAX_ID_CHARS:
        raise ApiError(422, field, f"is {len(s)} characters long; at most {MAX_ID_CHARS}")
    if "/" in s:
        raise ApiError(422, field, "must not contain '/'")
    return s


def _text(value: str, field: str, limits: Limits) -> str:
    if not value.strip():
        raise ApiError(422, field, "must not be empty")
    if len(value) > limits.max_text_chars:
        raise ApiError(422, field, f"is {len(value)} characters long; at most {limits.max_text_chars}")
    return value


def _label(value: str | int, field: str, task: Task) -> str:
    s = str(value).strip()
    if task.labels and s not in task.labels:
        raise ApiError(422, field, f"{s!r} is not one of {', '.join(task.labels)}")
    if not s:
        raise ApiError(422, field, "must not be empty")
    return s


def day_of(value: str | float | None, field: str, now_day: float | None = None,
           skew_days: float = 0.0) -> float | None:
    """Days since the epoch of a timestamp (epoch seconds or a date string); ``now_day``: refuse later ones."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(422, field, f"{value!r} is not a finite number")
    try:
        day = parse_date(value)
    except DateParseError as e:
        raise ApiError(422, field, str(e)) from None
    if now_day is not None and day is not None and day > now_day + skew_days:
        raise ApiError(422, field, f"is in the future ({format_date(day)} > now {format_date(now_day)})")
    return day


def answer_query(body: AnswerIn, task: Task, limits: Limits) -> Query:
    """The checked Query of an answer request (dates as days since the epoch)."""
    user = _id(body.user_id, "user_id")
    question = _text(body.question, "question", limits)
    history = None
    if body.history is not None:
        if len(body.history) > limits.max_history:
            raise ApiError(422, "history", f"has {len(body.history)} records; at most {limits.max_history}")
        tfield, seen, history = text_field(task), set(), []
        for i, r in enumerate(body.history):
            where = f"history[{i}]"
            rid = _id(r.record_id, f"{where}.record_id")
            if rid in seen:
                raise ApiError(422, f"{where}.record_id", f"{rid!r} appears twice in the history")
            seen.add(rid)
            history.append(ProfileRecord(rid, {tfield: _text(r.text, f"{where}.text", limits),
                                               task.output_field: _label(r.label, f"{where}.label", task)},
                                         day_of(r.timestamp, f"{where}.timestamp")))
    item = None if body.item_id is None else _id(body.item_id, "item_id")
    return Query(user, question, history, day_of(body.date, "date"), item)


def events_records(body: EventsIn, task: Task, limits: Limits, now_day: float) -> list[tuple[str, ProfileRecord]]:
    """The checked (user, record) pairs of an events request; duplicates within the request are refused."""
    if not body.events:
        raise ApiError(422, "events", "must not be empty")
    if len(body.events) > limits.max_events:
        raise ApiError(422, "events", f"has {len(body.events)} events; at most {limits.max_events}")
    tfield, seen, out = text_field(task), {}, []
    for i, e in enumerate(body.events):
        where = f"events[{i}]"
        user, rid = _id(e.user_id, f"{where}.user_id"), _id(e.record_id, f"{where}.record_id")
        if (user, rid) in seen:
            raise ApiError(422, f"{where}.record_id", f"(user_id, record_id) ({user!r}, {rid!r}) duplicates "
                                                      f"events[{seen[user, rid]}]")
        seen[user, rid] = i
        fields = {tfield: _text(e.text, f"{where}.text", limits),
                  task.output_field: _label(e.label, f"{where}.label", task)}
        day = day_of(e.timestamp, f"{where}.timestamp", now_day, limits.max_clock_skew_s / 86400.0)
        if day is None:
            raise ApiError(422, f"{where}.timestamp", "must not be empty")
        out.append((user, ProfileRecord(rid, fields, day)))
    return out


def validation_field(loc: tuple) -> str:
    """A pydantic error location as a body path: ``("body", "events", 2, "timestamp")`` -> ``events[2].timestamp``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "int", "float", "list[HistoryIn]", "none", "bool") or "[" in str(p) or "-" in str(p):
            continue  # union-member tags pydantic adds to the location
        else:
            out += ("." if out else "") + str(p)
    return out or "body"
