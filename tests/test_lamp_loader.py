"""LaMP loader/writer and date parsing: round trips, ordering, the time cut, reports."""

import json

import pytest

from recsys_tapper.data import (
    LABEL_SETS,
    DateParseError,
    LampExample,
    ProfileRecord,
    format_date,
    label_set,
    load_lamp,
    parse_date,
    required_fields,
    write_lamp,
    write_predictions,
)

# 1970..2013 = 44 years with 11 leap days; Jan..Apr 2014 = 120 days; + 12 -> 2014-05-13
MAY_13_2014 = 44 * 365 + 11 + 120 + 12


def _write(tmp_path, questions, golds=None, task="LaMP-3"):
    q = tmp_path / "q.json"
    q.write_text(json.dumps(questions))
    if golds is None:
        return q, None
    o = tmp_path / "o.json"
    o.write_text(json.dumps({"task": task, "golds": [{"id": k, "output": v} for k, v in golds.items()]}))
    return q, o


# ------------------------------------------------------------------------------------------ dates


def test_parse_date_formats():
    assert parse_date("2014-05-13") == MAY_13_2014
    assert parse_date("05/13/2014") == MAY_13_2014
    assert parse_date("2014-05-13T18:00:00") == MAY_13_2014 + 0.75
    assert parse_date("1970-01-02T00:00:00+12:00") == 0.5  # offset honoured: 12:00 UTC on Jan 1
    assert parse_date(86400 * 3 + 43200) == 3.5
    assert parse_date("302400") == 3.5
    assert parse_date(1_400_000_000_000) == parse_date(1_400_000_000) == 1_400_000_000 / 86400
    assert parse_date(None) is None and parse_date("") is None


@pytest.mark.parametrize("bad", ["yesterday", "13/05/2014", "2014-13-01", "nan", float("nan"), float("inf"), True,
                                 [2014]])
def test_parse_date_rejects(bad):
    with pytest.raises(DateParseError, match="cannot parse date") as info:
        parse_date(bad)
    assert repr(bad) in str(info.value)


def test_format_date_inverts_parse():
    assert format_date(881250949 / 86400) == "1997-12-04T15:55:49"  # first row of ml-100k.inter
    assert format_date(parse_date("2014-05-13T07:08:09")) == "2014-05-13T07:08:09"
    assert format_date(0.5 + 0.4 / 86400) == "1970-01-01T12:00:00"  # rounds to the second
    assert format_date(-1.0) == "1969-12-31T00:00:00"


# ---------------------------------------------------------------------------------------- tasks


def test_required_fields_and_labels():
    assert required_fields("movielens") == ("text", "score")
    assert required_fields("LaMP_3") == ("text", "score")
    assert required_fields("LaMP-2N") == ("text", "title", "category")
    assert required_fields("LaMP-2M") == ("description", "tag")
    assert label_set("LaMP-1") == ("[1]", "[2]")
    assert len(LABEL_SETS["LaMP-2M"]) == len(LABEL_SETS["LaMP-2N"]) == 15
    assert label_set("LaMP-4") is None
    with pytest.raises(ValueError, match="unknown task 'LaMP-9'"):
        required_fields("LaMP-9")


# ---------------------------------------------------------------------------------- round trips


def _examples():
    d = parse_date
    return [
        LampExample(id="1_5", user_id="1", input="Rate the movie: Heat", date=d("2014-05-13T00:00:00"), output="4",
                    extras={"item_id": "5"},
                    profile=(ProfileRecord("1_3", {"text": "Alien", "score": "5"}, d("2014-05-11T10:00:00")),
                             ProfileRecord("1_4", {"text": "Süß 🎬", "score": "1"}, d("2014-05-12T00:00:00")))),
        LampExample(id="q2", user_id="q2", input="second", output="2",
                    profile=(ProfileRecord("r", {"text": "no date", "score": "3"}, None),
                             ProfileRecord("r2", {"text": "none either", "score": "4"}, None))),
    ]


def test_write_then_load_round_trip(tmp_path):
    q, o = tmp_path / "sub" / "q.json", tmp_path / "sub" / "o.json"
    write_lamp(_examples(), q, o, task="movielens")
    loaded, report = load_lamp(q, o, task="movielens")
    assert loaded == _examples()
    assert (report.n_examples, report.n_missing_dates, report.problems) == (2, 2, [])
    raw = json.loads(q.read_text())
    assert raw[0]["date"] == "2014-05-13T00:00:00" and raw[0]["item_id"] == "5" and raw[0]["user_id"] == "1"
    assert "user_id" not in raw[1]  # user-based LaMP: the question id is the user
    assert json.loads(o.read_text()) == {"task": "movielens", "golds": [{"id": "1_5", "output": "4"},
                                                                        {"id": "q2", "output": "2"}]}
    assert sorted(p.name for p in q.parent.iterdir()) == ["o.json", "q.json"]  # no temp files left


def test_write_predictions_layout(tmp_path):
    path = tmp_path / "preds.json"
    write_predictions({"310": "4", "311": "[2]"}, path, task="LaMP_3")
    assert json.loads(path.read_text()) == {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"},
                                                                        {"id": "311", "output": "[2]"}]}


def test_write_lamp_needs_outputs(tmp_path):
    ex = _examples()[1]
    no_gold = LampExample(id=ex.id, user_id=ex.user_id, input=ex.input, profile=ex.profile)
    with pytest.raises(ValueError, match=r"examples without an output: \['q2'\]"):
        write_lamp([no_gold], tmp_path / "q.json", tmp_path / "o.json", task="LaMP-3")
    write_lamp([no_gold], tmp_path / "q.json", None, task="LaMP-3")
    assert load_lamp(tmp_path / "q.json")[0] == [no_gold]


# ---------------------------------------------------------------------------- ordering and cuts


def test_profile_sorted_by_date_ties_keep_file_order(tmp_path):
    profile = [{"id": "c", "text": "c", "date": "2014-05-03"}, {"id": "a", "text": "a", "date": "05/01/2014"},
               {"id": "b2", "text": "b2", "date": "2014-05-02"}, {"id": "b1", "text": "b1", "date": "2014-05-02"}]
    q, _ = _write(tmp_path, [{"id": 7, "input": "x", "profile": profile}])
    (ex,), _ = load_lamp(q)
    assert ex.id == "7" and ex.user_id == "7"
    assert [r.id for r in ex.profile] == ["a", "b2", "b1", "c"]
    assert [r.date - MAY_13_2014 for r in ex.profile] == [-12, -11, -11, -10]


def test_any_missing_date_keeps_file_order(tmp_path):
    profile = [{"id": "c", "text": "c", "date": "2014-05-03"}, {"id": "u", "text": "u"},
               {"id": "a", "text": "a", "date": "2014-05-01"}]
    q, _ = _write(tmp_path, [{"id": "1", "input": "x", "profile": profile}])
    (ex,), report = load_lamp(q)
    assert [r.id for r in ex.profile] == ["c", "u", "a"]
    assert [r.date for r in ex.profile] == [MAY_13_2014 - 10, None, MAY_13_2014 - 12]
    assert report.n_missing_dates == 1


def test_time_cut_drops_future_records_in_lenient_mode(tmp_path):
    profile = [{"id": "past", "text": "p", "score": 4, "date": "2014-05-12"},
               {"id": "same", "text": "s", "score": "5", "date": "2014-05-13"},
               {"id": "future", "text": "f", "score": "1", "date": "2014-05-14"}]
    q, _ = _write(tmp_path, [{"id": "1", "input": "x", "date": "2014-05-13", "profile": profile}])
    (ex,), report = load_lamp(q, task="LaMP-3", strict=False)
    assert [r.id for r in ex.profile] == ["past", "same"]  # same instant is not "after"
    assert ex.profile[0].fields == {"text": "p", "score": "4"}  # numbers become text
    assert ex.date == MAY_13_2014
    assert (report.n_skipped_records, report.n_examples) == (1, 1)
    assert report.problems == [(f"{q}: question '1' profile record 'future': field 'date' 2014-05-14T00:00:00 "
                                "is dated after the query (2014-05-13T00:00:00) (record dropped)")]


def test_long_texts_are_truncated_and_counted(tmp_path):
    q, _ = _write(tmp_path, [{"id": "1", "input": "abcdefgh", "profile": [{"id": "r", "text": "0123456789"},
                                                                          {"id": "s", "text": "ok"}]}])
    (ex,), report = load_lamp(q, max_text_chars=5)
    assert ex.input == "abcde" and [r.fields["text"] for r in ex.profile] == ["01234", "ok"]
    assert report.n_truncated_texts == 2
    assert report.problems[0] == f"{q}: question '1' profile record 'r': field 'text' truncated from 10 to 5 chars"


def test_extras_and_outputs_attach(tmp_path):
    record = {"id": 1, "title": "T", "abstract": "A"}
    q, o = _write(tmp_path, [{"id": "a", "input": "x", "user_id": 42, "item_id": 9, "profile": [record]}],
                  {"a": "[2]"}, task="LaMP_1")
    (ex,), _ = load_lamp(q, o)  # task taken from the outputs file
    assert (ex.user_id, ex.extras, ex.output, ex.profile[0].id) == ("42", {"item_id": "9"}, "[2]", "1")
