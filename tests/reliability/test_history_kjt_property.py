"""Property test of the one KJT builder (training and serving): lengths, values and gaps agree with the
per-example inputs for any mix of empty histories, missing dates and query dates."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.history import gaps, history_kjt
from embeddings.pooling import HISTORY_DPOS, HISTORY_DT

day = st.one_of(st.none(), st.floats(min_value=0, max_value=1e5, allow_nan=False))
example = st.lists(st.tuples(st.integers(0, 10_000), day), max_size=12).flatmap(
    lambda recs: st.tuples(st.just(recs), day))


@settings(max_examples=150, deadline=None)
@given(st.lists(example, min_size=1, max_size=8))
def test_history_kjt_matches_per_example_inputs(batch):
    rows = [[r for r, _ in recs] for recs, _ in batch]
    days = [[d for _, d in recs] for recs, _ in batch]
    qdays = [q for _, q in batch]
    kjt = history_kjt(rows, days, qdays)
    for key in (HISTORY_DT, HISTORY_DPOS):
        jt = kjt[key]
        assert jt.lengths().tolist() == [len(r) for r in rows]
        assert jt.values().tolist() == [x for r in rows for x in r]
    dt_all, dp_all = [], []
    for d, q in zip(days, qdays):
        dt, dp = gaps(d, q)
        assert all(x >= 0 for x in dt)
        assert dp == [float(len(d) - j) for j in range(len(d))]
        dt_all += dt
        dp_all += dp
    torch.testing.assert_close(kjt[HISTORY_DT].weights(), torch.tensor(dt_all, dtype=torch.float32))
    torch.testing.assert_close(kjt[HISTORY_DPOS].weights(), torch.tensor(dp_all, dtype=torch.float32))


def test_mismatched_dates_are_an_error():
    try:
        history_kjt([[1, 2]], [[1.0]], [None])
    except ValueError as e:
        assert str(e) == "history has 2 records but 1 dates"
    else:
        raise AssertionError("expected ValueError")
