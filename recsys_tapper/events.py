"""Validate a file of new events (one row per record) before ``tapper update`` uses them.

A row is (user_id, record_id, text, label, timestamp). ``validate_events`` checks every row: no nulls or empty
fields, a label from the task's label set, a timestamp that parses and is not in the future, no duplicate
(user_id, record_id) and no record the model already holds (records are immutable). Rows are numbered from 0
in error messages.

Timestamps: a timestamp column, epoch seconds (numbers above 1e11 are milliseconds) or a date string
(see ``recsys_tapper.data.parse_date``).

Example::

    good, report = validate_events("new.parquet", get_task("movielens"), existing=set(bank.index), strict=False)
    report["n_kept"], report["n_skipped"], report["problems"][:3]
"""

from __future__ import annotations

import math
import string
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_tapper.data import format_date, parse_date
from recsys_tapper.data.dates import DateParseError
from recsys_tapper.errors import InputError
from recsys_tapper.features import record_key
from recsys_tapper.tasks import Task

EVENT_FIELDS = ("user_id", "record_id", "text", "label", "timestamp")
_MAX_PROBLEMS = 1000


class UpdateError(InputError):
    """A bad events file or row; the message names the file, the row (from 0) and the field."""


@dataclass
class Event:
    """One validated row: its record ``fields`` (the task's text field and label field) and its ``date``."""

    user_id: str
    record_id: str
    fields: dict[str, str]
    date: float  # days since the epoch


def _placeholders(template: str | None) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template or "") if f}


def text_field(task: Task) -> str:
    """The record field the events' ``text`` fills (the one non-label field the task templates use)."""
    if task.output_field is None or task.input_template is None:
        raise UpdateError(f"task {task.name}: profile records carry no label, so there is nothing to fine-tune on")
    names = (_placeholders(task.record_template) | _placeholders(task.input_template)) - {task.output_field}
    if len(names) != 1:
        raise UpdateError(f"task {task.name}: records need fields {sorted(names)}; events carry one text field")
    return names.pop()


def _check_type(path: str, table: pa.Table, name: str) -> None:
    t = table.schema.field(name).type
    ok = {
        "user_id": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
        "record_id": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
        "text": pa.types.is_string(t) or pa.types.is_large_string(t),
        "label": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
        or pa.types.is_floating(t),
        "timestamp": pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
        or pa.types.is_string(t) or pa.types.is_large_string(t),
    }[name]
    if not ok:
        want = {"user_id": "string or integer", "record_id": "string or integer", "text": "string",
                "label": "string or number", "timestamp": "timestamp, epoch seconds or date string"}[name]
        col = table.column(name)
        first = next((i for i, v in enumerate(col.to_pylist()) if v is not None), 0)
        raise UpdateError(f"{path}: row {first}: field '{name}' must be {want}, got {t}")


def _read_events(events: str | Path | pd.DataFrame) -> tuple[str, pa.Table]:
    if isinstance(events, pd.DataFrame):
        try:
            return "events", pa.Table.from_pandas(events, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise UpdateError(f"events: cannot convert the DataFrame to columns ({e})") from None
    path = Path(events)
    if not path.is_file():
        raise UpdateError(f"{path}: events file not found")
    try:
        return str(path), pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UpdateError(f"{path}: not a readable parquet file ({e})") from None


def _timestamp_days(value: object) -> float:
    if isinstance(value, datetime):  # a parquet timestamp column (pandas Timestamps are datetimes too)
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)  # naive means UTC, as in parse_date
        return value.timestamp() / 86400.0
    days = parse_date(value)
    if days is None:
        raise DateParseError("empty date")
    return days


def validate_events(
    events: str | Path | pd.DataFrame,
    task: Task,
    existing: set[str] = frozenset(),
    strict: bool = True,
    now: float | None = None,
) -> tuple[list[Event], dict]:
    """Check every row; returns (good events in file order, report). ``existing``: record keys already held.

    Raises UpdateError at the first bad row when ``strict``; otherwise skips it and counts it in the report.
    """
    path, table = _read_events(events)
    missing = [f for f in EVENT_FIELDS if f not in table.column_names]
    if missing:
        raise UpdateError(f"{path}: field '{missing[0]}' missing (columns: {', '.join(table.column_names)})")
    for f in EVENT_FIELDS:
        _check_type(path, table, f)
    now = time.time() / 86400.0 if now is None else now
    tfield = text_field(task)
    labels = set(task.labels) if task.labels else None
    cols = {f: table.column(f).to_pylist() for f in EVENT_FIELDS}
    report = {"path": path, "n_rows": table.num_rows, "n_kept": 0, "n_skipped": 0, "problems": []}
    seen: dict[tuple[str, str], int] = {}
    out: list[Event] = []

    for i in range(table.num_rows):
        try:
            v = {f: cols[f][i] for f in EVENT_FIELDS}
            for f in EVENT_FIELDS:
                if v[f] is None:
                    raise UpdateError(f"field '{f}' is missing (null)")
            for f in ("user_id", "record_id", "label"):
                if isinstance(v[f], float):
                    if not math.isfinite(v[f]):
                        raise UpdateError(f"field '{f}' is not a finite number ({v[f]!r})")
                    v[f] = str(int(v[f])) if v[f].is_integer() else repr(v[f])
                v[f] = str(v[f]).strip()
                if not v[f]:
                    raise UpdateError(f"field '{f}' is empty")
            if not v["text"].strip():
                raise UpdateError("field 'text' is empty")
            if labels is not None and v["label"] not in labels:
                raise UpdateError(f"field 'label' {v['label']!r} is not one of {sorted(labels)}")
            try:
                day = _timestamp_days(v["timestamp"])
            except DateParseError as e:
                raise UpdateError(f"field 'timestamp': {e}") from None
            if day > now:
                raise UpdateError(f"field 'timestamp' is in the future ({format_date(day)} > now "
                                  f"{format_date(now)})")
            key = (v["user_id"], v["record_id"])
            if key in seen:
                raise UpdateError(f"(user_id, record_id) {key} duplicates row {seen[key]}")
            if record_key(*key) in existing:
                raise UpdateError(f"record {key} is already in the model (records are immutable)")
        except UpdateError as e:
            msg = f"{path}: row {i}: {e}"
            if strict:
                raise UpdateError(msg) from None
            report["n_skipped"] += 1
            if len(report["problems"]) < _MAX_PROBLEMS:
                report["problems"].append(msg)
            continue
        seen[key] = i
        out.append(Event(v["user_id"], v["record_id"], {tfield: v["text"], task.output_field: v["label"]}, day))
    report["n_kept"] = len(out)
    return out, report
