"""Classical rating references: global/user/item means, a regularized bias model, biased MF.

No LM is involved; these put the LM numbers in context. Each model is fitted on *visible* ratings only and
returns real-valued predictions, clipped to the rating scale [1, 5]; :func:`rating_scores` reports MAE/RMSE
on the raw values and on the values rounded to the nearest integer (half up).

What is "visible" (the choice, documented): a model is fitted on the ratings in the profiles of the questions
it predicts. For the MovieLens test queries that is everything before each user's test ratings, i.e. the
training history *and* the 5 validation ratings, exactly the history TAP-PER and the LM baselines see at
test time. Fitting on the dev profiles instead would hide the 5 validation ratings. The item statistics pool
other users' profiles, and the split is per user by time, so another user's profile may be later in wall
time than this user's test query; that is the usual per-user leave-last-out protocol, not test leakage (no
test rating is ever in a profile).

Ratings come from profile records: ``fields["score"]``; the item of a record is its id with the
``f"{user}_"`` prefix removed (MovieLens ids are ``f"{user}_{item}"``), the item of a question is
``extras["item_id"]``. An unseen user or item falls back to the parts that are known (the global mean last).

Example::

    test, _ = load_lamp(*build_movielens_lamp()["test"], task="movielens")
    table = run_classical(test)                 # {"global_mean": {"mae", "rmse", "mae_rounded", ...}, ...}
    model = BiasedMF(k=32, seed=0).fit(*zip(*visible_ratings(test)))
    model.predict(["1"], ["50"])                # array([4.3...])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recsys_tapper.data import LampExample
from recsys_tapper.features import record_item

LO, HI = 1.0, 5.0


# ------------------------------------------------------------------------------------------- data


def visible_ratings(examples: Sequence[LampExample], field: str = "score") -> list[tuple[str, str, float]]:
    """Every distinct ``(user, item, rating)`` in the examples' profiles (a profile shared by several
    questions of one user is counted once per record id)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for ex in examples:
        for r in ex.profile:
            key = (ex.user_id, r.id)
            if key in seen:
                continue
            seen.add(key)
            out.append((ex.user_id, record_item(ex.user_id, r.id), float(r.fields[field])))
    return out


def query_pairs(examples: Sequence[LampExample]) -> tuple[list[str], list[str | None], list[float]]:
    """(users, items, gold ratings) of the questions; the item is ``extras["item_id"]`` or None."""
    users = [ex.user_id for ex in examples]
    items = [ex.extras.get("item_id") for ex in examples]
    golds = [float(ex.output) for ex in examples]
    return users, items, golds


class _Index:
    """String id -> dense int; unknown -> -1."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.index: dict[str, int] = {}
        for x in ids:
            self.index.setdefault(x, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def encode(self, ids: Sequence[str | None]) -> np.ndarray:
        return np.array([self.index.get(x, -1) if x is not None else -1 for x in ids], dtype=np.int64)


def _gather(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] with 0 for idx == -1 (unknown)."""
    out = np.zeros((len(idx),) + table.shape[1:], dtype=table.dtype)
    known = idx >= 0
    out[known] = table[idx[known]]
    return out


# ------------------------------------------------------------------------------------------ models


class _Base:
    """fit(users, items, values) -> self; predict(users, items) -> (n,) float64, clipped to [LO, HI]."""

    params_per_user = 0

    def fit(self, users: Sequence[str], items: Sequence[str], values: Sequence[float]):
        if len(users) == 0:
            raise ValueError("no ratings to fit")
        self.users, self.items = _Index(users), _Index(items)
        u, i = self.users.encode(users), self.items.encode(items)
        r = np.asarray(values, dtype=np.float64)
        self.mu = float(r.mean())
        self._fit(u, i, r)
        return self

    def _fit(self, u: np.ndarray, i: np.ndarray, r: np.ndarray) -> None:
        pass

    def predict(self, users: Sequence[str], items: Sequence[str | None]) -> np.ndarray:
        raw = self._predict(self.users.encode(users), self.items.encode(items))
        return np.clip(raw, LO, HI)

    def _predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return np.full(len(u), self.mu)

    def train_rmse(self, users, items, values) -> float:
        err = self._predict(self.users.encode(users), self.items.encode(items)) - np.asarray(values, float)
        return float(np.sqrt(np.mean(err**2)))


class GlobalMean(_Base):
    """The mean of every visible rating."""


def _group_mean(idx: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(idx, weights=r, minlength=n) / np.bincount(idx, minlength=n)


class UserMean(_Base):
    """The user's mean visible rating (the global mean for an unseen user)."""

    params_per_user = 1

    def _fit(self, u, i, r) -> None:
        self.user_mean = _group_mean(u, r, len(self.users))

    def _predict(self, u, i):
        return np.where(u >= 0, _gather(self.user_mean, u), self.mu)


class ItemMean(_Base):
    """The item's mean visible rating over all users (the global mean for an unseen or unknown item)."""

    def _fit(self, u, i, r) -> None:
        self.item_mean = _group_mean(i, r, len(self.items))

    def _predict(self, u, i):
        return np.where(i >= 0, _gather(self.item_mean, i), self.mu)


@dataclass
class UserItemBias(_Base):
    """Regularized baseline predictor ``mu + b_u + b_i`` (Koren 2010, eq. 2), fitted by alternating least
    squares: ``b_i = Σ(r − mu − b_u) / (reg_item + n_i)``, then ``b_u = Σ(r − mu − b_i) / (reg_user + n_u)``.

    Args:
        reg_user, reg_item: the lambdas (shrinkage towards 0 for users/items with few ratings).
        n_iter: ALS sweeps.

    The defaults (and :class:`BiasedMF`'s) were picked by RMSE on the MovieLens *dev* queries (fitted on the
    dev profiles), never on the test queries.
    """

    reg_user: float = 10.0
    reg_item: float = 2.0
    n_iter: int = 15
    params_per_user = 1

    def _fit(self, u, i, r) -> None:
        nu, ni = len(self.users), len(self.items)
        self.bu, self.bi = np.zeros(nu), np.zeros(ni)
        cnt_u, cnt_i = np.bincount(u, minlength=nu), np.bincount(i, minlength=ni)
        for _ in range(self.n_iter):
            self.bi = np.bincount(i, weights=r - self.mu - self.bu[u], minlength=ni) / (self.reg_item + cnt_i)
            self.bu = np.bincount(u, weights=r - self.mu - self.bi[i], minlength=nu) / (self.reg_user + cnt_u)

    def _predict(self, u, i):
        return self.mu + _gather(self.bu, u) + _gather(self.bi, i)


@dataclass
class BiasedMF(_Base):
    """Biased matrix factorization ``mu + b_u + b_i + p_u·q_i`` (Funk/Koren), fitted by seeded SGD.

    Each step takes ``batch_size`` shuffled ratings and applies the per-rating SGD update of each of them
    (``x += lr·(e·∂pred/∂x − reg·x)``), summed where a user or item repeats; ``batch_size=1`` is plain SGD.

    Args:
        k: latent factors.
        lr, reg: step size and L2 weight on the factors; ``reg_bias`` on the biases.
        epochs: passes over the ratings.
        init_std: factors start from N(0, init_std), biases at 0.
        seed: the init and the shuffles; the same seed gives the same model.
    """

    k: int = 32
    lr: float = 0.01
    reg: float = 0.1
    reg_bias: float = 0.02
    epochs: int = 40
    init_std: float = 0.1
    batch_size: int = 64
    seed: int = 0

    @property
    def params_per_user(self) -> int:  # type: ignore[override]
        return self.k + 1

    def _fit(self, u, i, r) -> None:
        rng = np.random.default_rng(self.seed)
        nu, ni = len(self.users), len(self.items)
        self.bu, self.bi = np.zeros(nu), np.zeros(ni)
        self.P = rng.normal(0.0, self.init_std, (nu, self.k))  # (n_users, k)
        self.Q = rng.normal(0.0, self.init_std, (ni, self.k))  # (n_items, k)
        for _ in range(self.epochs):
            order = rng.permutation(len(r))
            for s in range(0, len(r), self.batch_size):
                b = order[s : s + self.batch_size]
                ub, ib = u[b], i[b]
                pu, qi = self.P[ub], self.Q[ib]  # (b, k)
                e = r[b] - (self.mu + self.bu[ub] + self.bi[ib] + (pu * qi).sum(1))  # (b,)
                np.add.at(self.bu, ub, self.lr * (e - self.reg_bias * self.bu[ub]))
                np.add.at(self.bi, ib, self.lr * (e - self.reg_bias * self.bi[ib]))
                np.add.at(self.P, ub, self.lr * (e[:, None] * qi - self.reg * pu))
                np.add.at(self.Q, ib, self.lr * (e[:, None] * pu - self.reg * qi))

    def _predict(self, u, i):
        dot = (_gather(self.P, u) * _gather(self.Q, i)).sum(1)
        return self.mu + _gather(self.bu, u) + _gather(self.bi, i) + dot


CLASSICAL: dict[str, Callable[[int], _Base]] = {
    "global_mean": lambda seed: GlobalMean(),
    "user_mean": lambda seed: UserMean(),
    "item_mean": lambda seed: ItemMean(),
    "user_item_bias": lambda seed: UserItemBias(),
    "biased_mf": lambda seed: BiasedMF(k=32, seed=seed),
}


# --------------------------------------------------------------------------------------- scoring


def round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def rating_scores(preds: Sequence[float], golds: Sequence[float]) -> dict:
    """MAE/RMSE of raw predictions and of predictions rounded to integers (half up).

    Example::

        >>> rating_scores([3.4, 4.6], [3, 5])
        {'mae': 0.4, 'rmse': 0.4, 'mae_rounded': 0.0, 'rmse_rounded': 0.0}
    """
    p, g = np.asarray(preds, dtype=np.float64), np.asarray(golds, dtype=np.float64)
    if p.shape != g.shape or p.size == 0:
        raise ValueError(f"need equally many predictions and golds, got {p.shape} and {g.shape}")
    e, er = p - g, round_half_up(p) - g
    return {"mae": round(float(np.abs(e).mean()), 12), "rmse": round(math.sqrt(float((e**2).mean())), 12),
            "mae_rounded": round(float(np.abs(er).mean()), 12),
            "rmse_rounded": round(math.sqrt(float((er**2).mean())), 12)}


def classical_rows(model: _Base, examples: Sequence[LampExample]) -> list[dict]:
    """Per-question rows shaped like ``evaluation.predict_labels``: ``pred`` is the rounded rating as text,
    ``expected`` the raw value, so ``evaluation.rating_report(rows)`` gives the rounded MAE/RMSE as
    ``mae``/``rmse`` and the raw ones as ``mae_expected``/``rmse_expected``."""
    users, items, _ = query_pairs(examples)
    raw = model.predict(users, items)
    return [{"id": ex.id, "user": ex.user_id, "gold": ex.output, "pred": str(int(v)), "expected": float(x),
             "cold": ex.user_id not in model.users.index}
            for ex, x, v in zip(examples, raw, round_half_up(raw))]


def run_classical(
    examples: Sequence[LampExample],
    fit_examples: Sequence[LampExample] | None = None,
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Fit each classical method on the visible ratings and score it on ``examples``' golds.

    Args:
        examples: questions with golds and ``extras["item_id"]`` (the MovieLens test split).
        fit_examples: whose profiles to fit on; default ``examples`` themselves (see the module docstring).
        methods: names from :data:`CLASSICAL` (default all).
        seed: for ``biased_mf``.

    Returns:
        ``{method: {"mae", "rmse", "mae_rounded", "rmse_rounded", "unparsable_frac", "params_per_user", "fit_s",
        "predict_s", "n"}}``; a numeric prediction is never unparsable (``unparsable_frac`` 0 by construction).
    """
    train = visible_ratings(fit_examples if fit_examples is not None else examples)
    users, items, golds = query_pairs(examples)
    out = {}
    for name in methods or list(CLASSICAL):
        t0 = time.perf_counter()
        model = CLASSICAL[name](seed).fit(*zip(*train))
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        preds = model.predict(users, items)
        predict_s = time.perf_counter() - t1
        out[name] = {**rating_scores(preds, golds), "unparsable_frac": 0.0, "params_per_user": model.params_per_user,
                     "fit_s": fit_s, "predict_s": predict_s, "n": len(golds)}
    return out


def main() -> None:  # pragma: no cover - a report on the real split
    import json

    from recsys_tapper.data import build_movielens_lamp, load_lamp

    paths = build_movielens_lamp()
    test, _ = load_lamp(*paths["test"], task="movielens")
    print(json.dumps(run_classical(test), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
