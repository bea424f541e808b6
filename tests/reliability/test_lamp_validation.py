"""Bad LaMP inputs: exact error messages (strict), counts (lenient), and property tests."""

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_tapper.data import (
    LampExample,
    LampFormatError,
    ProfileRecord,
    format_date,
    load_lamp,
    parse_date,
    stage2_min_profile,
    write_lamp,
)

REC = {"id": "r", "text": "t", "score": "4"}
TWO = [dict(REC), {**REC, "id": "r2"}]  # LaMP-3's Stage 2 needs two records (a target after a history record)


def _files(tmp_path, questions, golds=None, task="LaMP_3", raw_outputs=None):
    q = tmp_path / "test_questions.json"
    q.write_text(questions if isinstance(questions, str) else json.dumps(questions))
    o = None
    if golds is not None or raw_outputs is not None:
        o = tmp_path / "test_outputs.json"
        obj = raw_outputs if raw_outputs is not None else {
            "task": task, "golds": [{"id": k, "output": v} for k, v in golds.items()]}
        o.write_text(json.dumps(obj))
    return q, o


def _question(**overrides):
    q = {"id": "1", "input": "x", "profile": [dict(REC)]}
    q.update(overrides)
    return {k: v for k, v in q.items() if v is not ...}


def _exact(message):
    return f"^{re.escape(message)}$"


# One row per bad input: (questions, task, message after "<questions file>: ").
QUESTION_CASES = [
    ({"a": 1}, None, "top level must be a JSON list of questions, got dict"),
    (["nope"], None, "question at index 0: not a JSON object"),
    ([_question(id=...)], None, "question at index 0: field 'id' missing"),
    ([_question(id=1.5)], None, "question at index 0: field 'id' must be a string, got float"),
    ([_question(input=...)], None, "question '1': field 'input' missing"),
    ([_question(input=3)], None, "question '1': field 'input' must be a string, got int"),
    ([_question(profile=...)], None, "question '1': field 'profile' missing"),
    ([_question(profile={"r": 1})], None, "question '1': field 'profile' must be a list, got dict"),
    ([_question(), _question(id=1)], None, "question '1': field 'id' is a duplicate (first at index 0)"),
    ([_question(profile=[])], None, "question '1': field 'profile' is empty"),
    ([_question(date="soon")], None,
     "question '1': field 'date' cannot parse date 'soon': expected epoch seconds, ISO 8601 or MM/DD/YYYY"),
    ([_question(user_id=[1])], None, "question '1': field 'user_id' must be a string or number, got list"),
    ([_question(profile=[{"text": "t"}])], None, "question '1' profile record at index 0: field 'id' missing"),
    ([_question(profile=[REC, REC])], None,
     "question '1' profile record 'r': field 'id' is a duplicate within the question"),
    ([_question(id=310, profile=[{"id": 3101, "text": "t"}])], "LaMP-3",
     "question '310' profile record '3101': field 'score' missing"),
    ([_question(profile=[{**REC, "text": ["a"]}])], None,
     "question '1' profile record 'r': field 'text' must be a string or number, got list"),
    ([_question(profile=[{**REC, "text": None}])], None,
     "question '1' profile record 'r': field 'text' must be a string or number, got null"),
    ([_question(profile=[{**REC, "score": math.nan}])], None,
     "question '1' profile record 'r': field 'score' is not a finite number (nan)"),
    ([_question(profile=[{**REC, "score": 7}])], "movielens",
     "question '1' profile record 'r': field 'score' value '7' is not one of 1, 2, 3, 4, 5"),
    ([_question(profile=[{**REC, "date": "31/12/2014"}])], None,
     "question '1' profile record 'r': field 'date' cannot parse date '31/12/2014': month must be in 1..12"),
    ([_question(date="2014-05-13", profile=[{**REC, "date": "2014-05-13T00:00:01"}])], None,
     ("question '1' profile record 'r': field 'date' 2014-05-13T00:00:01 is dated after the query "
      "(2014-05-13T00:00:00)")),
    ([_question()], "LaMP-3",
     ("question '1': field 'profile' has 1 usable record(s); Stage 2 of LaMP-3 needs at least 2 "
     "(a target record after a record of history)")),
]


@pytest.mark.parametrize(("questions", "task", "message"), QUESTION_CASES)
def test_strict_names_file_question_record_and_field(tmp_path, questions, task, message):
    q, _ = _files(tmp_path, questions)
    with pytest.raises(LampFormatError, match=_exact(f"{q}: {message}")):
        load_lamp(q, task=task)


def test_future_record_of_an_undated_question_is_named(tmp_path):
    now = parse_date("2026-01-01")
    q, _ = _files(tmp_path, [_question(profile=[{**REC, "date": "2999-01-01"}, {**REC, "id": "ok"}])])
    with pytest.raises(LampFormatError, match=_exact(
            f"{q}: question '1' profile record 'r': field 'date' 2999-01-01T00:00:00 is in the future "
            "(now 2026-01-01T00:00:00) and the question has no date")):
        load_lamp(q, now=now)
    (ex,), report = load_lamp(q, now=now, strict=False)  # lenient: the record is dropped, the question kept
    assert [r.id for r in ex.profile] == ["ok"] and report.n_skipped_records == 1
    assert [r.id for r in load_lamp(q, now=parse_date("3000-01-01"))[0][0].profile] == ["r", "ok"]
    q, _ = _files(tmp_path, [_question(date="2999-06-01", profile=[{**REC, "date": "2999-01-01"}])])
    assert load_lamp(q, now=now)[0][0].profile[0].date == parse_date("2999-01-01")  # dated question: its date


def test_short_profiles_only_for_tasks_that_train_on_records():
    from recsys_tapper.tasks import TASKS

    # LaMP-1/-7 records carry no label: Stage 2 trains on their questions, one record of history is enough
    assert {name: stage2_min_profile(name) for name in TASKS} == {
        name: 2 if t.input_template is not None else 1 for name, t in TASKS.items()}
    assert (stage2_min_profile("LaMP-1"), stage2_min_profile("LaMP-7"), stage2_min_profile("LaMP_3")) == (1, 1, 2)


@pytest.mark.parametrize("task", ["LaMP-1", "LaMP-7"])
def test_one_record_profiles_load_for_question_trained_tasks(tmp_path, task):
    rec = {"id": "r", "text": "t", "title": "x", "abstract": "y"}
    q, _ = _files(tmp_path, [_question(profile=[rec])])
    (ex,), report = load_lamp(q, task=task)
    assert len(ex.profile) == 1 and report.n_short_profiles == 0


def test_required_fields_only_checked_with_a_task(tmp_path):
    q, _ = _files(tmp_path, [_question(profile=[{"id": "r", "text": "t"}])])
    (ex,), _ = load_lamp(q)
    assert ex.profile[0].fields == {"text": "t"}


@pytest.mark.parametrize("strict", [True, False])
def test_file_level_errors_always_raise(tmp_path, strict):
    missing = tmp_path / "nope.json"
    with pytest.raises(LampFormatError, match=_exact(f"{missing}: file not found")):
        load_lamp(missing, strict=strict)
    q, _ = _files(tmp_path, "[{")
    with pytest.raises(LampFormatError, match=f"^{re.escape(str(q))}: not valid JSON: Expecting"):
        load_lamp(q, strict=strict)
    q, o = _files(tmp_path, [_question()], raw_outputs={"task": "LaMP_3"})
    with pytest.raises(LampFormatError, match=_exact(f"{o}: field 'golds' missing or not a list")):
        load_lamp(q, o, strict=strict)


def test_output_errors(tmp_path):
    q, o = _files(tmp_path, [_question(profile=TWO)], {"1": "4", "zz": "3"})
    with pytest.raises(LampFormatError, match=_exact(f"{o}: gold 'zz': field 'id' names no question in {q}")):
        load_lamp(q, o)
    q, o = _files(tmp_path, [_question(profile=TWO), _question(id="2", profile=TWO)], {"1": "4"})
    with pytest.raises(LampFormatError,
                       match=_exact(f"{q}: question '2': field 'output' missing (no valid gold in {o})")):
        load_lamp(q, o)
    q, o = _files(tmp_path, [_question(profile=TWO)], {"1": "6"})
    with pytest.raises(LampFormatError,
                       match=_exact(f"{o}: gold '1': field 'output' value '6' is not in the LaMP-3 label set")):
        load_lamp(q, o)
    q, o = _files(tmp_path, [_question()], {"1": "[1]"}, task="LaMP_1")
    with pytest.raises(LampFormatError, match=_exact(f"{o}: field 'task' is 'LaMP_1' but task='LaMP-3' was requested")):
        load_lamp(q, o, task="LaMP-3")


def test_lenient_skips_and_counts(tmp_path):
    questions = [
        _question(id="ok", date="2014-05-13", profile=[
            {**REC, "id": "a", "date": "2014-05-01"}, {**REC, "id": "bad", "date": "someday"},
            {**REC, "id": "late", "date": "2014-06-01"}, {"id": "noscore", "text": "t"},
            {**REC, "id": "nodate"}, {**REC, "id": "a"}]),
        _question(id="empty", profile=[]),
        _question(id="futureonly", date="2014-01-01", profile=[{**REC, "date": "2014-02-01"}]),
        _question(id="ok"),
        _question(id="nogold"),
        _question(id="badgold"),
        {"input": "no id", "profile": [REC]},
    ]
    q, o = _files(tmp_path, questions, {"ok": "5", "empty": "1", "badgold": "9", "stranger": "3"})
    examples, report = load_lamp(q, o, task="LaMP-3", strict=False)
    assert [ex.id for ex in examples] == ["ok"]
    assert [r.id for r in examples[0].profile] == ["a", "bad", "nodate"]  # file order: two dates are None
    assert examples[0].output == "5"
    # skipped questions: empty, futureonly, duplicate ok, no id, nogold, badgold
    assert (report.n_examples, report.n_skipped_examples) == (1, 6)
    assert report.n_skipped_records == 4  # late, noscore, the second "a", futureonly's only record
    # missing dates: "nodate", and the undated records of "nogold"/"badgold" (read before the golds)
    assert (report.n_bad_dates, report.n_missing_dates) == (1, 3)
    assert report.n_short_profiles == 2  # "nogold" and "badgold" have one record each (kept, then no gold)
    assert len(report.problems) == 1 + 4 + 2 + 6 + 2  # bad date, 4 records, 2 short, 6 questions, 2 golds
    assert (f"{q}: question 'nogold': field 'profile' has 1 usable record(s); Stage 2 of LaMP-3 needs at least "
            "2 (a target record after a record of history) (kept; its user gets no Stage-2 target from it)"
            in report.problems)
    assert f"{q}: question 'empty': field 'profile' is empty (question skipped)" in report.problems
    assert (f"{q}: question 'futureonly': field 'profile' is empty after dropping 1 records (question skipped)"
            in report.problems)
    assert f"{o}: gold 'stranger': field 'id' names no question in {q} (gold skipped)" in report.problems


def test_problem_lines_are_capped(tmp_path):
    q, _ = _files(tmp_path, [_question(id=f"e{i}", profile=[]) for i in range(1005)] + [_question()])
    examples, report = load_lamp(q, strict=False)
    assert [ex.id for ex in examples] == ["1"]
    assert report.n_skipped_examples == 1005 and len(report.problems) == 1000
    assert report.problems[-1] == f"{q}: question 'e999': field 'profile' is empty (question skipped)"


# ------------------------------------------------------------------------------ property tests

_texts = st.text(max_size=20)
_seconds = st.integers(min_value=-2_000_000_000, max_value=4_000_000_000)
_past_seconds = st.integers(min_value=-2_000_000_000, max_value=1_700_000_000)  # records of undated questions
_field_names = st.text(min_size=1, max_size=6).filter(lambda k: k not in ("id", "date"))


@st.composite
def _example(draw, qid):
    dates = draw(st.lists(st.one_of(st.none(), _past_seconds.map(lambda s: s / 86400)), min_size=1, max_size=4))
    if all(d is not None for d in dates):
        dates.sort()
    rids = draw(st.lists(_texts, min_size=len(dates), max_size=len(dates), unique=True))
    fields = st.builds(lambda text, more: {"text": text, **more}, _texts, st.dictionaries(_field_names, _texts,
                                                                                         max_size=2))
    profile = tuple(ProfileRecord(id=rid, fields=draw(fields), date=d) for rid, d in zip(rids, dates))
    latest = max((d for d in dates if d is not None), default=0.0)
    qdate = draw(st.one_of(st.none(), st.integers(0, 10**8).map(lambda s: latest + s / 86400)))
    qdate = None if qdate is None else parse_date(format_date(qdate))  # whole seconds, as written
    extras = draw(st.dictionaries(_field_names.filter(lambda k: k not in ("input", "profile", "user_id")), _texts,
                                  max_size=2))
    return LampExample(id=qid, user_id=draw(st.one_of(st.just(qid), _texts)), input=draw(_texts),
                       profile=profile, date=qdate, output=draw(_texts), extras=extras)


@st.composite
def _examples(draw):
    ids = draw(st.lists(_texts, min_size=1, max_size=4, unique=True))
    return [draw(_example(qid)) for qid in ids]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_examples())
def test_round_trip_property(examples):
    with tempfile.TemporaryDirectory() as d:
        q, o = Path(d) / "q.json", Path(d) / "o.json"
        write_lamp(examples, q, o, task="LaMP-7")  # LaMP-7 requires only "text"
        loaded, report = load_lamp(q, o)
    assert loaded == examples
    assert report.n_skipped_examples == report.n_skipped_records == report.n_bad_dates == 0


@given(_seconds)
def test_date_format_parse_property(seconds):
    days = seconds / 86400
    assert parse_date(format_date(days)) == days
    assert format_date(parse_date(format_date(days))) == format_date(days)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                     max_leaves=4)
def _mostly(valid):
    """Usually a valid value, sometimes arbitrary JSON."""
    return st.one_of(valid, valid, valid, _json)


def _maybe_drop(required, optional):
    """A dict with required keys (one of them sometimes dropped) and optional keys."""
    d = st.fixed_dictionaries(required, optional=optional)
    return st.builds(lambda x, k: {kk: v for kk, v in x.items() if kk != k}, d,
                     st.sampled_from([None, None, None, *required]))


_record = _maybe_drop(
    {"id": _mostly(st.sampled_from(["a", "b", "c", "d", 7])), "text": _mostly(_texts),
     "score": _mostly(st.sampled_from(["1", "5", 4, "6"]))},
    {"date": _mostly(st.sampled_from(["2014-05-01", "05/20/2014", 1399000000, "bad"]))})
_messy_question = _maybe_drop(
    {"id": _mostly(st.sampled_from(["q1", "q2", 3])), "input": _mostly(_texts),
     "profile": _mostly(st.lists(_record, min_size=1, max_size=3))},
    {"date": _mostly(st.sampled_from(["2014-05-10", "later"])), "item_id": _mostly(_texts)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messy_question, max_size=4), st.sampled_from([None, "LaMP-3"]))
def test_lenient_never_crashes_and_agrees_with_strict(questions, task):
    with tempfile.TemporaryDirectory() as d:
        q = Path(d) / "q.json"
        q.write_text(json.dumps(questions))
        examples, report = load_lamp(q, task=task, strict=False)
        assert report.n_examples + report.n_skipped_examples == len(questions)
        clean = (report.n_skipped_examples == report.n_skipped_records == report.n_bad_dates
                 == report.n_short_profiles == 0)
        if clean:
            assert load_lamp(q, task=task)[0] == examples
        else:
            with pytest.raises(LampFormatError, match=re.escape(str(q))):
                load_lamp(q, task=task)
