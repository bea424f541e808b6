"""SYNTHETIC LaMP-format tasks with planted personalization (for tests and examples only; not real data).

Three tasks, each in the layout of a real one, each with a per-user rule that a personalized model can learn
from the user's history and a non-personalized one cannot:

| task (``SYNTHETIC_TASKS`` key) | layout    | planted rule                                                        |
|--------------------------------|-----------|---------------------------------------------------------------------|
| ``SYNTHETIC-movielens``        | movielens | a taste per genre: rating = clip(round(3 + taste[genre] + noise))   |
| ``SYNTHETIC-LaMP-2M``          | LaMP-2M   | the user prefers 3 of the 15 tags; every description cues 3 tags,   |
|                                |           | exactly one of them preferred, and that one is the gold tag         |
| ``SYNTHETIC-LaMP-4``           | LaMP-4    | a headline habit: a signature word at the end, a "BREAKING:" or     |
|                                |           | "Watch:" opener, or a ", sources say" or ", explained" ending,      |
|                                |           | applied to a base headline (every habit is words ROUGE can see)     |

Drift (``drift=True``), the same known schedule in all three: from the drift point of each user's timeline on,
the rating taste flips sign, the 3 preferred tags are replaced by 3 others, the headline habit changes to another
one. Old records then mislead and the test queries follow the new rule. The drift point is position
``(n_records + n_test) // 2`` of the timeline (its midpoint, the default), or, with ``drift_frac`` = f, position
``n_records - round(f · n_records)``: the last f of the profile (and every test query) follows the new rule
(:func:`drift_point`). f = 0 drifts the test queries alone; smaller f is a more recent drift.

Layout: per user, the train split has one question (the last training record) whose profile holds the
records before it; the test split has ``n_test`` questions whose profile holds all ``n_records`` records.
Record ``i`` is dated day ``3·i`` (:data:`RECORD_DAYS`).

Example::

    train, test = synthetic_rating_task(n_users=8, n_records=30, seed=0)
    train, test = synthetic_tagging_task(n_users=8, drift=True)
    paths = write_synthetic("runs/synthetic")    # {"SYNTHETIC-LaMP-2M": {"dev": (q, o), "test": (q, o)}, ...}
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from recsys_tapper.data import LABEL_SETS, LampExample, ProfileRecord, write_lamp
from recsys_tapper.io import atomic_write_text
from recsys_tapper.tasks import get_task

RECORD_DAYS = 3.0  # record i of a timeline is dated day RECORD_DAYS * i
GENRES = ("action", "comedy", "drama", "horror", "romance", "sci-fi")
SOURCE = {"source": "SYNTHETIC"}


def _rating(taste: float, rng: random.Random) -> str:
    return str(min(5, max(1, round(3 + taste + rng.gauss(0, 0.3)))))


def drift_point(n_records: int, n_test: int, drift: bool, drift_frac: float | None = None) -> int | None:
    """The first timeline position that follows the new rule (None without drift).

    ``drift_frac`` None: the timeline's midpoint ``(n_records + n_test) // 2``; else the last
    ``round(drift_frac · n_records)`` profile records and the test queries are after it.

    Example::

        drift_point(30, 3, True)         # 16
        drift_point(20, 3, True, 0.25)   # 15: profile records 15..19 and the test queries drifted
    """
    if not drift:
        if drift_frac is not None:
            raise ValueError(f"drift_frac={drift_frac} needs drift=True")
        return None
    if drift_frac is None:
        return (n_records + n_test) // 2
    if not 0.0 <= drift_frac <= 1.0:
        raise ValueError(f"drift_frac must lie in [0, 1], got {drift_frac}")
    return n_records - round(drift_frac * n_records)


def _drifted(at: int | None, i: int) -> bool:
    return at is not None and i >= at


def _layout(user: str, recs: list[tuple[str, dict, float, str]], n_records: int, question: Callable[[dict], str],
            extras: dict) -> tuple[LampExample, list[LampExample]]:
    """recs: (record id, fields, day, gold) in time order -> (train question, test questions)."""
    profile = tuple(ProfileRecord(rid, fields, day) for rid, fields, day, _ in recs[:n_records])
    _, fields, day, gold = recs[n_records - 1]
    train = LampExample(f"{user}_train", user, question(fields), profile[:-1], day, gold, dict(extras))
    test = [LampExample(rid, user, question(fields), profile, day, gold, dict(extras))
            for rid, fields, day, gold in recs[n_records:]]
    return train, test


def synthetic_rating_task(
    n_users: int = 8, n_records: int = 30, n_test: int = 3, seed: int = 0, drift: bool = False,
    drift_frac: float | None = None,
) -> tuple[list[LampExample], list[LampExample]]:
    """SYNTHETIC movielens-layout ratings. Return (train questions, test questions): train profiles hold
    the records before the test ones. With ``drift`` every taste flips sign at :func:`drift_point`."""
    rng = random.Random(seed)
    at = drift_point(n_records, n_test, drift, drift_frac)
    template = get_task("movielens").input_template  # the questions read like the records' training examples
    train, test = [], []
    for u in range(n_users):
        user = f"syn{u}"
        taste = {g: rng.choice([-2.0, -1.0, 1.0, 2.0]) for g in GENRES}
        recs = []
        for i in range(n_records + n_test):
            g = rng.choice(GENRES)
            t = taste[g] * (-1.0 if _drifted(at, i) else 1.0)
            title = f"film {rng.randrange(10_000)} | {g}"
            recs.append((f"{user}_{i}", title, _rating(t, rng), i * RECORD_DAYS))
        profile = tuple(ProfileRecord(rid, {"text": txt, "score": sc}, day) for rid, txt, sc, day in recs[:n_records])
        last = recs[n_records - 1]
        train.append(LampExample(f"{user}_train", user, template.format(text=last[1]), profile[:-1], last[3],
                                 last[2], {}))
        for rid, txt, sc, day in recs[n_records:]:
            test.append(LampExample(rid, user, template.format(text=txt), profile, day, sc, {}))
    return train, test


# ------------------------------------------------------------------------------ tagging (LaMP-2M)

TAGS = LABEL_SETS["LaMP-2M"]
TAG_CUES: dict[str, str] = {
    "sci-fi": "a starship crew", "based on a book": "a beloved novel", "comedy": "running gags",
    "action": "car chases", "twist ending": "a shocking final reveal", "dystopia": "a ruined future state",
    "dark comedy": "gallows humour", "classic": "a golden-age studio", "psychology": "a troubled mind",
    "fantasy": "dragons and wizards", "romance": "two lovers", "thought-provoking": "big moral questions",
    "social commentary": "class inequality", "violence": "brutal gunfights", "true story": "real events",
}
_ADJECTIVES = ("quiet", "sprawling", "low-budget", "stylish", "gritty", "whimsical", "slow", "loud")


def preferred_tags(user_rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(preferred tags before the drift point, after it): two disjoint sets of 3."""
    order = list(TAGS)
    user_rng.shuffle(order)
    return tuple(order[:3]), tuple(order[3:6])


def synthetic_tagging_task(
    n_users: int = 8, n_records: int = 30, n_test: int = 3, seed: int = 0, drift: bool = False,
    drift_frac: float | None = None,
) -> tuple[list[LampExample], list[LampExample]]:
    """SYNTHETIC LaMP-2M-layout movie tagging (fields ``description``, ``tag``).

    Each description cues three tags (:data:`TAG_CUES`): one from the user's 3 preferred tags (the gold) and
    two from outside them, in random order. Without the user's history the gold is a 1-in-3 guess.
    """
    rng = random.Random(seed)
    template = get_task("LaMP-2M").input_template  # LaMP's question form, as Task.record_example builds it
    train, test = [], []
    n_total = n_records + n_test
    at = drift_point(n_records, n_test, drift, drift_frac)
    for u in range(n_users):
        user = f"syn{u}"
        before, after = preferred_tags(rng)
        recs = []
        for i in range(n_total):
            liked = after if _drifted(at, i) else before
            gold = rng.choice(liked)
            cues = [gold, *rng.sample([t for t in TAGS if t not in liked], 2)]
            rng.shuffle(cues)
            desc = (f"A {rng.choice(_ADJECTIVES)} film about {TAG_CUES[cues[0]]}, {TAG_CUES[cues[1]]} "
                    f"and {TAG_CUES[cues[2]]}.")
            recs.append((f"{user}_{i}", {"description": desc, "tag": gold}, i * RECORD_DAYS, gold))
        tr, te = _layout(user, recs, n_records, lambda f: template.format(**f), SOURCE)
        train.append(tr)
        test.extend(te)
    return train, test


# ----------------------------------------------------------------------------- headlines (LaMP-4)

# Every habit adds words: rouge-score lower-cases and drops punctuation, so a habit of case or punctuation (the
# first version's ALL CAPS, lower case and "!!!") scored like no habit at all.
STYLES = ("signature", "breaking", "watch", "sources", "explained")
SIGNATURES = ("indeed", "folks", "sigh", "naturally", "allegedly", "again")
_SUBJECTS = ("City council", "Local school", "Regional bank", "Hospital board", "Football club", "Tech startup",
             "Museum", "Farmers union", "Police department", "University")
_VERBS = (("approved", "approves"), ("rejected", "rejects"), ("announced", "announces"),
          ("delayed", "delays"), ("cancelled", "cancels"), ("celebrated", "celebrates"))
_OBJECTS = ("new park budget", "summer festival", "water price rise", "library expansion", "bike lane plan",
            "night bus service", "recycling scheme", "stadium renovation")
_PLACES = ("Riverton", "Oakfield", "Marlow", "Eastbrook", "Kingsport", "Westvale")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def apply_style(base: str, style: str, signature: str) -> str:
    """A base headline in one of the :data:`STYLES`."""
    if style == "signature":
        return f"{base} {signature}"
    if style == "breaking":
        return f"BREAKING: {base}"
    if style == "watch":
        return f"Watch: {base}"
    if style == "sources":
        return f"{base}, sources say"
    if style == "explained":
        return f"{base}, explained"
    raise ValueError(f"unknown style {style!r}; known: {STYLES}")


def synthetic_headline_task(
    n_users: int = 8, n_records: int = 30, n_test: int = 3, seed: int = 0, drift: bool = False,
    drift_frac: float | None = None,
) -> tuple[list[LampExample], list[LampExample]]:
    """SYNTHETIC LaMP-4-layout headline generation (fields ``text``, ``title``).

    The base headline ``"{Subject} {verb} {object}"`` follows from the article; the user's habit
    (:func:`apply_style`, with a per-user signature word) is the personal part. With ``drift`` the habit
    switches to a different style at :func:`drift_point`.
    """
    rng = random.Random(seed)
    template = get_task("LaMP-4").input_template
    train, test = [], []
    n_total = n_records + n_test
    at = drift_point(n_records, n_test, drift, drift_frac)
    for u in range(n_users):
        user = f"syn{u}"
        first = rng.choice(STYLES)
        second = rng.choice([s for s in STYLES if s != first])
        signature = rng.choice(SIGNATURES)
        recs = []
        for i in range(n_total):
            subj, (past, present), obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            text = (f"On {rng.choice(_DAYS)}, the {subj.lower()} in {rng.choice(_PLACES)} {past} the {obj}, "
                    f"officials said.")
            style = second if _drifted(at, i) else first
            title = apply_style(f"{subj} {present} {obj}", style, signature)
            recs.append((f"{user}_{i}", {"text": text, "title": title}, i * RECORD_DAYS, title))
        tr, te = _layout(user, recs, n_records, lambda f: template.format(**f), SOURCE)
        train.append(tr)
        test.extend(te)
    return train, test


# ------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class SyntheticSpec:
    """A SYNTHETIC task: its builder, the real task whose layout and templates it uses, and its rule."""

    build: Callable[..., tuple[list[LampExample], list[LampExample]]]
    layout: str
    planted: str


SYNTHETIC_TASKS: dict[str, SyntheticSpec] = {
    "SYNTHETIC-movielens": SyntheticSpec(synthetic_rating_task, "movielens",
                                         "rating = clip(round(3 + taste[genre] + N(0, 0.3)), 1, 5)"),
    "SYNTHETIC-LaMP-2M": SyntheticSpec(synthetic_tagging_task, "LaMP-2M",
                                       "gold = the one cued tag among the user's 3 preferred tags"),
    "SYNTHETIC-LaMP-4": SyntheticSpec(synthetic_headline_task, "LaMP-4",
                                      "title = the user's style applied to '{Subject} {verb} {object}'"),
}


def write_synthetic(out_dir: str | Path, n_users: int = 20, n_records: int = 30, n_test: int = 3, seed: int = 0,
                    drift: bool = True, drift_frac: float | None = None) -> dict[str, dict[str, tuple[Path, Path]]]:
    """Write every SYNTHETIC task in LaMP JSON layout (via ``write_lamp``) under ``out_dir/<task name>/``.

    Each folder holds ``dev_*`` (train questions) and ``test_*`` questions/outputs files and a
    ``SYNTHETIC.json`` manifest (rule, drift, seed). Questions carry ``"source": "SYNTHETIC"`` and the outputs
    files' ``task`` field is the SYNTHETIC name; load them with the layout's task, e.g.
    ``load_lamp(q, o, task="LaMP-2M")``.
    """
    out: dict[str, dict[str, tuple[Path, Path]]] = {}
    for name, spec in SYNTHETIC_TASKS.items():
        d = Path(out_dir) / name
        train, test = spec.build(n_users=n_users, n_records=n_records, n_test=n_test, seed=seed, drift=drift,
                                 drift_frac=drift_frac)
        out[name] = {}
        for split, examples in (("dev", train), ("test", test)):
            q, o = d / f"{split}_questions.json", d / f"{split}_outputs.json"
            write_lamp([replace(ex, extras={**ex.extras, **SOURCE}) for ex in examples], q, o, task=spec.layout)
            golds = json.loads(o.read_text(encoding="utf-8"))
            golds["task"] = name  # label the file SYNTHETIC; write_lamp only takes real task names
            atomic_write_text(o, json.dumps(golds, ensure_ascii=False))
            out[name][split] = (q, o)
        manifest = {"synthetic": True, "task": name, "layout": spec.layout, "planted": spec.planted,
                    "drift": drift, "drift_at": drift_point(n_records, n_test, drift, drift_frac),
                    "drift_frac": drift_frac, "seed": seed,
                    "n_users": n_users, "n_records": n_records, "n_test": n_test}
        atomic_write_text(d / "SYNTHETIC.json", json.dumps(manifest, indent=2))
    return out
