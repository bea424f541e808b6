"""SYNTHETIC LaMP-format rating data with planted personalization (for tests and examples only).

Each user has a taste per genre; a rating is ``clip(round(3 + taste[genre] + noise), 1, 5)``. With
``drift=True`` every user's taste flips sign halfway through their history, so recent records predict the
next rating and old ones mislead: a model with time/order biases can learn to look at the recent past.

Example::

    train, test = synthetic_rating_task(n_users=8, n_records=30, seed=0)
"""

from __future__ import annotations

import random

from recsys_tapper.data import LampExample, ProfileRecord

GENRES = ("action", "comedy", "drama", "horror", "romance", "sci-fi")


def _rating(taste: float, rng: random.Random) -> str:
    return str(min(5, max(1, round(3 + taste + rng.gauss(0, 0.3)))))


def synthetic_rating_task(
    n_users: int = 8, n_records: int = 30, n_test: int = 3, seed: int = 0, drift: bool = False
) -> tuple[list[LampExample], list[LampExample]]:
    """Return (train questions, test questions): train profiles hold records before the test ones."""
    rng = random.Random(seed)
    train, test = [], []
    for u in range(n_users):
        user = f"syn{u}"
        taste = {g: rng.choice([-2.0, -1.0, 1.0, 2.0]) for g in GENRES}
        recs = []
        for i in range(n_records + n_test):
            g = rng.choice(GENRES)
            t = taste[g] * (-1.0 if drift and i >= (n_records + n_test) // 2 else 1.0)
            title = f"film {rng.randrange(10_000)} | {g}"
            recs.append((f"{user}_{i}", title, _rating(t, rng), float(i * 3)))
        profile = tuple(ProfileRecord(rid, {"text": txt, "score": sc}, day) for rid, txt, sc, day in recs[:n_records])
        last = recs[n_records - 1]
        train.append(LampExample(f"{user}_train", user, f"Rate the movie from 1 to 5. movie: {last[1]}",
                                 profile[:-1], last[3], last[2], {}))
        for rid, txt, sc, day in recs[n_records:]:
            test.append(LampExample(rid, user, f"Rate the movie from 1 to 5. movie: {txt}", profile, day, sc, {}))
    return train, test
