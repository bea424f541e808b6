"""Property test of the one history builder (training and serving): lengths, values and gaps agree with the
per-example inputs for any mix of empty histories, missing dates and query dates."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.history import HISTORY, build_history, gaps

day = st.one_of(st.none(), st.floats(min_value=0, max_value=1e5, allow_nan=False))
example = st.lists(st.tuples(st.integers(0, 10_000), day), max_size=12).flatmap(
    lambda recs: st.tuples(st.just(recs), day))


@settings(max_examples=150, deadline=None)
@given(st.lists(example, min_size=1, max_size=8))
def test_history_kjt_matches_per_example_inputs(batch):
    rows = [[r for r, _ in recs] for recs, _ in batch]
    days = [[d for _, d in recs] for recs, _ in batch]
    qdays = [q for _, q in batch]
    hist = build_history(rows, days, qdays)
    assert hist.ids.keys() == [HISTORY] and hist.ids.weights_or_none() is None
    for lengths in (hist.ids[HISTORY].lengths(), hist.dt.lengths()):
        assert lengths.tolist() == [len(r) for r in rows]
    assert hist.record_ids().tolist() == [x for r in rows for x in r]
    dt_all, dp_all = [], []
    for d, q in zip(days, qdays):
        dt, dp = gaps(d, q)
        assert all(x >= 0 for x in dt)
        assert dp == [float(len(d) - j) for j in range(len(d))]
        dt_all += dt
        dp_all += dp
    torch.testing.assert_close(hist.dt.values(), torch.tensor(dt_all, dtype=torch.float32))
    torch.testing.assert_close(hist.order_gaps(), torch.tensor(dp_all, dtype=torch.float32))


def test_mismatched_dates_are_an_error():
    try:
        build_history([[1, 2]], [[1.0]], [None])
    except ValueError as e:
        assert str(e) == "history has 2 records but 1 dates"
    else:
        raise AssertionError("expected ValueError")
