import numpy as np
import pytest

from recsys_tapper.baselines.classical import (
    BiasedMF,
    GlobalMean,
    ItemMean,
    UserItemBias,
    UserMean,
    classical_rows,
    query_pairs,
    rating_scores,
    run_classical,
    visible_ratings,
)
from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.evaluation import rating_report


def _q(user, item, gold, ratings):
    profile = tuple(ProfileRecord(f"{user}_{it}", {"text": f"movie {it}", "score": str(s)}, float(d))
                    for d, (it, s) in enumerate(ratings))
    return LampExample(f"{user}_{item}", user, f"Rate the movie from 1 to 5. movie: movie {item}", profile,
                       100.0, str(gold), {"item_id": item})


# user a rated x:4, y:2; user b rated x:5, z:3 -> global 3.5, a 3, b 4, x 4.5, y 2, z 3
A = [("x", 4), ("y", 2)]
B = [("x", 5), ("z", 3)]
TINY = [_q("a", "z", 3, A), _q("a", "w", 5, A), _q("b", "y", 1, B), _q("c", "x", 4, [("q", 1)])]


def _fit(model, examples=TINY):
    return model.fit(*zip(*visible_ratings(examples)))


def test_visible_ratings_counts_a_shared_profile_once_and_strips_the_user_prefix():
    got = visible_ratings(TINY)
    assert sorted(got) == sorted([("a", "x", 4.0), ("a", "y", 2.0), ("b", "x", 5.0), ("b", "z", 3.0),
                                  ("c", "q", 1.0)])
    assert query_pairs(TINY) == (["a", "a", "b", "c"], ["z", "w", "y", "x"], [3.0, 5.0, 1.0, 4.0])


def test_means_exactly():
    ex = TINY[:3]  # a, b only
    users, items = ["a", "a", "b", "zz"], ["z", "w", "y", "x"]
    np.testing.assert_allclose(_fit(GlobalMean(), ex).predict(users, items), [3.5] * 4)
    np.testing.assert_allclose(_fit(UserMean(), ex).predict(users, items), [3.0, 3.0, 4.0, 3.5])  # zz unseen
    np.testing.assert_allclose(_fit(ItemMean(), ex).predict(users, items), [3.0, 3.5, 2.0, 4.5])  # w unseen
    np.testing.assert_allclose(_fit(ItemMean(), ex).predict(["a"], [None]), [3.5])  # no item id


def test_rating_scores_raw_and_rounded_half_up():
    s = rating_scores([3.4, 4.5, 1.2], [3, 4, 2])
    assert s["mae"] == pytest.approx((0.4 + 0.5 + 0.8) / 3)
    assert s["rmse"] == pytest.approx(np.sqrt((0.16 + 0.25 + 0.64) / 3))
    assert s["mae_rounded"] == pytest.approx((0 + 1 + 1) / 3)  # 4.5 -> 5, 1.2 -> 1
    assert s["rmse_rounded"] == pytest.approx(np.sqrt(2 / 3))


def _planted(seed=0, n_users=40, n_items=30, k=0, noise=0.1):
    """mu + b_u + b_i (+ p_u.q_i with k factors) + noise on every (user, item) pair."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.6, n_users), rng.normal(0, 0.6, n_items)
    P, Q = rng.normal(0, 0.8, (n_users, k)), rng.normal(0, 0.8, (n_items, k))
    users, items, vals = [], [], []
    for u in range(n_users):
        for i in range(n_items):
            users.append(f"u{u}")
            items.append(f"i{i}")
            vals.append(3.0 + bu[u] + bi[i] + P[u] @ Q[i] + rng.normal(0, noise))
    return users, items, np.array(vals), bu, bi


def test_bias_model_recovers_planted_biases_and_beats_the_means():
    users, items, vals, bu, bi = _planted()
    model = UserItemBias(reg_user=1.0, reg_item=1.0).fit(users, items, vals)
    assert np.corrcoef(model.bu, bu)[0, 1] > 0.98
    assert np.corrcoef(model.bi, bi)[0, 1] > 0.98
    base = GlobalMean().fit(users, items, vals).train_rmse(users, items, vals)
    assert model.train_rmse(users, items, vals) < 0.3 * base
    assert model.train_rmse(users, items, vals) < UserMean().fit(users, items, vals).train_rmse(users, items, vals)


def test_biased_mf_fits_planted_interactions_the_bias_model_cannot():
    users, items, vals, _, _ = _planted(seed=1, n_users=30, n_items=20, k=2)
    bias = UserItemBias(reg_user=0.1, reg_item=0.1).fit(users, items, vals).train_rmse(users, items, vals)
    mf = BiasedMF(k=4, lr=0.02, reg=0.01, epochs=60, seed=0).fit(users, items, vals)
    assert mf.train_rmse(users, items, vals) < 0.5 * bias
    short = BiasedMF(k=4, lr=0.02, reg=0.01, epochs=2, seed=0).fit(users, items, vals)
    assert mf.train_rmse(users, items, vals) < short.train_rmse(users, items, vals)  # more SGD, lower error


def test_biased_mf_is_deterministic_per_seed():
    users, items, vals, _, _ = _planted(seed=2, n_users=15, n_items=10, k=2)
    qu, qi = users[::7], items[::7]
    a = BiasedMF(k=8, epochs=5, seed=3).fit(users, items, vals).predict(qu, qi)
    b = BiasedMF(k=8, epochs=5, seed=3).fit(users, items, vals).predict(qu, qi)
    c = BiasedMF(k=8, epochs=5, seed=4).fit(users, items, vals).predict(qu, qi)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert BiasedMF(k=32).params_per_user == 33


def test_predictions_are_clipped_to_the_scale_and_unseen_fall_back():
    model = BiasedMF(k=2, epochs=3).fit(["a", "a", "b"], ["x", "y", "x"], [5.0, 5.0, 5.0])
    p = model.predict(["a", "new"], ["x", "new"])
    assert p.max() <= 5.0 and p.min() >= 1.0
    assert p[1] == pytest.approx(5.0)  # global mean for an unseen pair


def test_run_classical_and_rows_agree_with_rating_report():
    table = run_classical(TINY)
    assert set(table) == {"global_mean", "user_mean", "item_mean", "user_item_bias", "biased_mf"}
    # global mean of the 5 visible ratings = 3.0 -> errors 0, 2, 2, 1
    assert table["global_mean"]["mae"] == pytest.approx(5 / 4)
    assert table["global_mean"]["n"] == 4 and table["user_mean"]["params_per_user"] == 1
    rows = classical_rows(_fit(UserMean()), TINY)
    assert [r["pred"] for r in rows] == ["3", "3", "4", "1"]
    rep = rating_report(rows)
    assert rep["mae"] == pytest.approx(rating_scores([3, 3, 4, 1], [3, 5, 1, 4])["mae"])
    assert rep["mae_expected"] == pytest.approx(table["user_mean"]["mae"])
