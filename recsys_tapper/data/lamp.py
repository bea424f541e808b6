"""Load and write LaMP-format JSON, validating every field on the way in.

A LaMP split is two files. ``*_questions.json`` is a list of questions, each with the user's
profile (their earlier documents); ``*_outputs.json`` holds the gold answers::

    questions: [{"id": "310", "input": "...", "date"?: ..., "user_id"?: ..., "item_id"?: ...,
                 "profile": [{"id": "3101", "text": "...", "score": "4", "date"?: ...}, ...]}, ...]
    outputs:   {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}, ...]}

``strict=True`` raises :class:`LampFormatError` at the first problem; ``strict=False`` drops the
bad question or profile record, counts it in the :class:`LoadReport` and keeps going. File-level
problems (missing file, not JSON, wrong top-level type, no ``golds``) always raise. Every message
names the file, the question id, the profile record id when relevant, and the field::

    test_questions.json: question '310' profile record '3101': field 'score' missing

Time: a profile record may not be dated after its question, nor, when the question has no date, after
"now" (the record is dropped in lenient mode). Stage 2 of a task whose records carry a label (all but
LaMP-1 and LaMP-7) trains on record i with records 0..i-1 as history, so such a question needs at least
:func:`stage2_min_profile` usable records: fewer is an error in strict mode, and is kept and counted
(``n_short_profiles``) in lenient mode.

Example::

    examples, report = load_lamp("dev_questions.json", "dev_outputs.json", task="LaMP-3")
    write_predictions({ex.id: "4" for ex in examples}, "preds.json", task="LaMP_3")
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from embeddings.atomic import atomic_write_text
from recsys_tapper.data.dates import DateParseError, format_date, parse_date
from recsys_tapper.errors import InputError

_TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "LaMP-1": ("title", "abstract"),
    "LaMP-2": ("description", "tag"),  # current LaMP-2 = movie tagging
    "LaMP-2M": ("description", "tag"),
    "LaMP-2N": ("text", "title", "category"),  # original LaMP-2 = news categorization
    "LaMP-3": ("text", "score"),
    "LaMP-4": ("text", "title"),
    "LaMP-5": ("title", "abstract"),
    "LaMP-6": ("text", "title"),
    "LaMP-7": ("text",),
    "movielens": ("text", "score"),
}
_MOVIE_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
               "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
               "violence", "true story")
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "LaMP-1": ("[1]", "[2]"),
    "LaMP-2": _MOVIE_TAGS,
    "LaMP-2M": _MOVIE_TAGS,
    "LaMP-2N": ("women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
                "science & technology", "travel", "business", "crime", "education", "healthy living", "parents",
                "food & drink"),
    "LaMP-3": ("1", "2", "3", "4", "5"),
    "movielens": ("1", "2", "3", "4", "5"),
}
_RATING_TASKS = ("LaMP-3", "movielens")
# Tasks whose profile records carry no label: Stage 2 trains on their questions (tasks.py: input_template None).
_QUESTION_LABELLED = ("LaMP-1", "LaMP-7")
_QUESTION_KEYS = ("id", "input", "profile", "user_id", "date")
_MAX_PROBLEMS = 1000


class LampFormatError(InputError):
    """A LaMP file that breaks the format; the message names file, question, record and field."""


@dataclass(frozen=True)
class ProfileRecord:
    """One document of a user's history.

    Args:
        id: record id, unique within its question.
        fields: every task field except ``id``/``date`` (e.g. ``{"text": ..., "score": "4"}``), as str.
        date: days since the Unix epoch (UTC), ``None`` when absent.
    """

    id: str
    fields: Mapping[str, str]
    date: float | None = None


@dataclass(frozen=True)
class LampExample:
    """One question with its user's profile (sorted by date) and, when known, the gold output.

    Args:
        id: question id.
        user_id: the ``user_id`` extra, else the question id (user-based LaMP: one user per question).
        input: the prompt text.
        profile: records sorted by (date, file position); file order if any record lacks a date.
        date: query date (days since epoch) from the ``date`` extra, ``None`` if absent.
        output: gold output from the outputs file.
        extras: other top-level keys (e.g. ``item_id``), as str.
    """

    id: str
    user_id: str
    input: str
    profile: tuple[ProfileRecord, ...]
    date: float | None = None
    output: str | None = None
    extras: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What :func:`load_lamp` kept, skipped and fixed.

    ``n_missing_dates`` counts kept profile records without a date; ``n_bad_dates`` counts
    unparseable dates (records and questions) set to ``None`` in lenient mode; ``n_short_profiles``
    counts questions kept in lenient mode with fewer usable records than Stage 2 needs; ``problems``
    holds one line per skipped, fixed or short item (at most 1000).
    """

    path: str
    n_examples: int = 0
    n_skipped_examples: int = 0
    n_skipped_records: int = 0
    n_missing_dates: int = 0
    n_bad_dates: int = 0
    n_truncated_texts: int = 0
    n_short_profiles: int = 0
    problems: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(line)


def canonical_task(task: str) -> str | None:
    """Map ``"LaMP_3"``, ``"lamp-3"`` ... to ``"LaMP-3"``; ``None`` for an unknown name."""
    key = task.strip().replace("_", "-").lower()
    return next((t for t in _TASK_FIELDS if t.lower() == key), None)


def _known_task(task: str) -> str:
    canon = canonical_task(task)
    if canon is None:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(_TASK_FIELDS)}")
    return canon


def required_fields(task: str) -> tuple[str, ...]:
    """Profile fields a task needs, e.g. ``required_fields("LaMP-3") == ("text", "score")``."""
    return _TASK_FIELDS[_known_task(task)]


def stage2_min_profile(task: str) -> int:
    """Fewest profile records a question needs for Stage 2 to train on it: 2 (one target after one record of
    history) when the task's records carry a label, 1 for LaMP-1/LaMP-7 (Stage 2 trains on their questions)."""
    return 1 if _known_task(task) in _QUESTION_LABELLED else 2


def label_set(task: str) -> tuple[str, ...] | None:
    """The closed output set of a classification/rating task, ``None`` for generation tasks."""
    return LABEL_SETS.get(_known_task(task))


# ---------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LampFormatError(f"{path}: file not found") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, over-long integer literals
        raise LampFormatError(f"{path}: not valid JSON: {err}") from None


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _id_str(v: object, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise LampFormatError(f"{where}: field 'id' must be a string, got {_type_name(v)}")


def _value_str(v: object, where: str, name: str) -> str:
    """A field value as str: strings as is, finite numbers as text (4.0 -> "4")."""
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise LampFormatError(f"{where}: field '{name}' is not a finite number ({v!r})")
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    raise LampFormatError(f"{where}: field '{name}' must be a string or number, got {_type_name(v)}")


class _Loader:
    """Validation state for one questions file."""

    def __init__(self, path: Path, task: str | None, strict: bool, max_text_chars: int, now: float):
        self.path, self.strict, self.max_chars, self.now, self.task = path, strict, max_text_chars, now, task
        self.required = _TASK_FIELDS[task] if task else ()
        self.min_profile = stage2_min_profile(task) if task else 1
        self.score_labels = LABEL_SETS[task] if task in _RATING_TASKS else None
        self.report = LoadReport(path=str(path))

    def soft(self, message: str, fix: str) -> None:
        """A fixable problem: raise when strict, else note it with what was done."""
        if self.strict:
            raise LampFormatError(message)
        self.report.note(f"{message} ({fix})")

    def text(self, s: str, where: str, name: str) -> str:
        if len(s) <= self.max_chars:
            return s
        self.report.n_truncated_texts += 1
        self.report.note(f"{where}: field '{name}' truncated from {len(s)} to {self.max_chars} chars")
        return s[: self.max_chars]

    def date(self, raw: object, where: str) -> float | None:
        try:
            return parse_date(raw)
        except DateParseError as err:
            self.soft(f"{where}: field 'date' {err}", "date set to None")
            self.report.n_bad_dates += 1
            return None

    def record(self, raw: object, j: int, qwhere: str, seen: set[str], qdate: float | None) -> ProfileRecord:
        if not isinstance(raw, dict):
            raise LampFormatError(f"{qwhere} profile record at index {j}: not a JSON object")
        if "id" not in raw:
            raise LampFormatError(f"{qwhere} profile record at index {j}: field 'id' missing")
        rid = _id_str(raw["id"], f"{qwhere} profile record at index {j}")
        where = f"{qwhere} profile record '{rid}'"
        if rid in seen:
            raise LampFormatError(f"{where}: field 'id' is a duplicate within the question")
        seen.add(rid)
        for name in self.required:
            if name not in raw:
                raise LampFormatError(f"{where}: field '{name}' missing")
        fields = {k: _value_str(v, where, k) for k, v in raw.items() if k not in ("id", "date")}
        score = fields.get("score")
        if self.score_labels is not None and score is not None and score.strip() not in self.score_labels:
            raise LampFormatError(f"{where}: field 'score' value {score!r} is not one of "
                                  f"{', '.join(self.score_labels)}")
        if raw.get("date") is None or raw.get("date") == "":
            date = None
            self.report.n_missing_dates += 1
        else:
            date = self.date(raw["date"], where)
        if qdate is not None and date is not None and date > qdate:
            raise LampFormatError(f"{where}: field 'date' {format_date(date)} is dated after the query "
                                  f"({format_date(qdate)})")
        if qdate is None and date is not None and date > self.now:
            raise LampFormatError(f"{where}: field 'date' {format_date(date)} is in the future (now "
                                  f"{format_date(self.now)}) and the question has no date")
        fields = {k: self.text(v, where, k) for k, v in fields.items()}
        return ProfileRecord(id=rid, fields=fields, date=date)

    def question(self, raw: object, i: int, seen_ids: dict[str, int]) -> LampExample:
        where = f"{self.path}: question at index {i}"
        if not isinstance(raw, dict):
            raise LampFormatError(f"{where}: not a JSON object")
        if "id" not in raw:
            raise LampFormatError(f"{where}: field 'id' missing")
        qid = _id_str(raw["id"], where)
        where = f"{self.path}: question '{qid}'"
        if qid in seen_ids:
            raise LampFormatError(f"{where}: field 'id' is a duplicate (first at index {seen_ids[qid]})")
        seen_ids[qid] = i
        for name in ("input", "profile"):
            if name not in raw:
                raise LampFormatError(f"{where}: field '{name}' missing")
        if not isinstance(raw["input"], str):
            raise LampFormatError(f"{where}: field 'input' must be a string, got {_type_name(raw['input'])}")
        if not isinstance(raw["profile"], list):
            raise LampFormatError(f"{where}: field 'profile' must be a list, got {_type_name(raw['profile'])}")
        user_id = _value_str(raw["user_id"], where, "user_id") if raw.get("user_id") is not None else qid
        extras = {k: _value_str(v, where, k) for k, v in raw.items() if k not in _QUESTION_KEYS}
        qdate = self.date(raw.get("date"), where)
        records, seen = [], set()
        for j, rec in enumerate(raw["profile"]):
            try:
                records.append(self.record(rec, j, where, seen, qdate))
            except LampFormatError as err:
                if self.strict:
                    raise
                self.report.n_skipped_records += 1
                self.report.note(f"{err} (record dropped)")
        if not records:
            dropped = len(raw["profile"])
            raise LampFormatError(f"{where}: field 'profile' is empty"
                                  + (f" after dropping {dropped} records" if dropped else ""))
        if len(records) < self.min_profile:
            msg = (f"{where}: field 'profile' has {len(records)} usable record(s); Stage 2 of {self.task} needs "
                   f"at least {self.min_profile} (a target record after a record of history)")
            if self.strict:
                raise LampFormatError(msg)
            self.report.n_short_profiles += 1
            self.report.note(f"{msg} (kept; its user gets no Stage-2 target from it)")
        if all(r.date is not None for r in records):
            records.sort(key=lambda r: r.date)  # stable: ties keep file order
        return LampExample(id=qid, user_id=user_id, input=self.text(raw["input"], where, "input"),
                           profile=tuple(records), date=qdate, extras=extras)


def _read_outputs(path: Path) -> dict:
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise LampFormatError(f"{path}: top level must be a JSON object, got {_type_name(obj)}")
    if not isinstance(obj.get("golds"), list):
        raise LampFormatError(f"{path}: field 'golds' missing or not a list")
    return obj


def _read_golds(obj: dict, path: Path, task: str | None, strict: bool, report: LoadReport,
                question_ids: Mapping[str, int], qpath: Path) -> dict[str, str]:
    labels = LABEL_SETS.get(task) if task else None
    golds: dict[str, str] = {}
    for i, g in enumerate(obj["golds"]):
        try:
            if not isinstance(g, dict) or "id" not in g:
                raise LampFormatError(f"{path}: gold at index {i}: field 'id' missing")
            gid = _id_str(g["id"], f"{path}: gold at index {i}")
            where = f"{path}: gold '{gid}'"
            if gid in golds:
                raise LampFormatError(f"{where}: field 'id' is a duplicate")
            if gid not in question_ids:
                raise LampFormatError(f"{where}: field 'id' names no question in {qpath}")
            if "output" not in g:
                raise LampFormatError(f"{where}: field 'output' missing")
            out = _value_str(g["output"], where, "output")
            if labels is not None and out.strip() not in labels:
                raise LampFormatError(f"{where}: field 'output' value {out!r} is not in the {task} label set")
            golds[gid] = out
        except LampFormatError as err:
            if strict:
                raise
            report.note(f"{err} (gold skipped)")
    return golds


def _resolve_task(task: str | None, obj: dict | None, outputs: Path | None) -> str | None:
    canon = _known_task(task) if task is not None else None
    if obj is None:
        return canon
    file_task = obj.get("task")
    file_canon = canonical_task(file_task) if isinstance(file_task, str) else None
    if canon is None:
        return file_canon
    family = {canon, file_canon} <= {"LaMP-2", "LaMP-2M", "LaMP-2N"}
    if file_canon is not None and file_canon != canon and not family:
        raise LampFormatError(f"{outputs}: field 'task' is {file_task!r} but task={task!r} was requested")
    return canon


def load_lamp(questions: str | Path, outputs: str | Path | None = None, *, task: str | None = None,
              strict: bool = True, max_text_chars: int = 4000,
              now: float | None = None) -> tuple[list[LampExample], LoadReport]:
    """Load a LaMP questions file (and optionally its outputs file), validating every field.

    Args:
        questions: path to ``*_questions.json``.
        outputs: path to ``*_outputs.json``; sets :attr:`LampExample.output`.
        task: ``"LaMP-1"`` .. ``"LaMP-7"``, ``"LaMP-2M"``, ``"LaMP-2N"`` or ``"movielens"`` (``LaMP_3`` also
            works); enables required-field and label-set checks. Defaults to the outputs file's task.
        strict: raise at the first problem (``True``) or skip and count (``False``).
        max_text_chars: longer inputs and profile field values are truncated (never an error).
        now: days since the epoch that count as "now" for records of undated questions (None = the clock).

    Returns:
        ``(examples, report)``; examples keep file order.

    Example::

        examples, report = load_lamp(q, o, task="movielens", strict=False)
        print(report.n_skipped_examples, report.problems[:3])
    """
    qpath = Path(questions)
    opath = Path(outputs) if outputs is not None else None
    out_obj = _read_outputs(opath) if opath is not None else None
    canon = _resolve_task(task, out_obj, opath)
    loader = _Loader(qpath, canon, strict, max_text_chars, time.time() / 86400.0 if now is None else now)
    report = loader.report
    raw = _read_json(qpath)
    if not isinstance(raw, list):
        raise LampFormatError(f"{qpath}: top level must be a JSON list of questions, got {_type_name(raw)}")
    examples: list[LampExample] = []
    seen_ids: dict[str, int] = {}
    for i, q in enumerate(raw):
        try:
            examples.append(loader.question(q, i, seen_ids))
        except LampFormatError as err:
            if strict:
                raise
            report.n_skipped_examples += 1
            report.note(f"{err} (question skipped)")
    if out_obj is not None:
        golds = _read_golds(out_obj, opath, canon, strict, report, seen_ids, qpath)
        with_gold = []
        for ex in examples:
            if ex.id in golds:
                with_gold.append(replace(ex, output=golds[ex.id]))
                continue
            msg = f"{qpath}: question '{ex.id}': field 'output' missing (no valid gold in {opath})"
            if strict:
                raise LampFormatError(msg)
            report.n_skipped_examples += 1
            report.note(f"{msg} (question skipped)")
        examples = with_gold
    report.n_examples = len(examples)
    return examples, report


# ---------------------------------------------------------------------------------------- writing


def _atomic_write_json(obj: object, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, allow_nan=False))


def _question_json(ex: LampExample) -> dict:
    clash = set(ex.extras) & set(_QUESTION_KEYS)
    if clash:
        raise ValueError(f"question {ex.id!r}: extras {sorted(clash)} clash with LaMP keys")
    q: dict = {"id": ex.id, "input": ex.input}
    if ex.user_id != ex.id:
        q["user_id"] = ex.user_id
    if ex.date is not None:
        q["date"] = format_date(ex.date)
    q.update(ex.extras)
    profile = []
    for r in ex.profile:
        if {"id", "date"} & set(r.fields):
            raise ValueError(f"question {ex.id!r} record {r.id!r}: fields may not be named 'id' or 'date'")
        rec = {"id": r.id, **r.fields}
        if r.date is not None:
            rec["date"] = format_date(r.date)
        profile.append(rec)
    q["profile"] = profile
    return q


def write_lamp(examples: Sequence[LampExample], questions_path: str | Path, outputs_path: str | Path | None,
               task: str) -> None:
    """Write examples as a LaMP questions file and (unless ``outputs_path`` is None) an outputs file.

    Dates are written as ISO datetimes (UTC, to the second); both writes are atomic.

    Args:
        examples: what to write; every example needs an ``output`` when ``outputs_path`` is given.
        questions_path: destination of ``*_questions.json``.
        outputs_path: destination of ``*_outputs.json`` or ``None``.
        task: task name stored in the outputs file (must be a known task).

    Example::

        write_lamp(examples, out / "dev_questions.json", out / "dev_outputs.json", task="movielens")
    """
    _known_task(task)
    questions = [_question_json(ex) for ex in examples]
    if outputs_path is not None:
        missing = [ex.id for ex in examples if ex.output is None]
        if missing:
            raise ValueError(f"{outputs_path}: examples without an output: {missing[:5]}")
        _atomic_write_json({"task": task, "golds": [{"id": ex.id, "output": ex.output} for ex in examples]},
                           outputs_path)
    _atomic_write_json(questions, questions_path)


def write_predictions(preds: Mapping[str, str], path: str | Path, task: str) -> None:
    """Write predictions in the LaMP outputs layout ``{"task", "golds": [{"id", "output"}]}``, atomically.

    Example::

        write_predictions({"310": "4"}, "preds.json", task="LaMP_3")
    """
    _atomic_write_json({"task": task, "golds": [{"id": str(k), "output": v} for k, v in preds.items()]}, path)
