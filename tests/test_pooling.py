import math

import pytest
import torch
from torch.testing import assert_close
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.history import HISTORY, History, build_history, gaps, order_gaps
from embeddings.jagged import segment_ids, segment_softmax, segment_sum
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
from embeddings.scorer import DINScorer


def test_segment_softmax_matches_per_segment_softmax():
    lengths = torch.tensor([2, 0, 3])
    seg = segment_ids(lengths)
    assert seg.tolist() == [0, 0, 2, 2, 2]
    s = torch.tensor([1.0, 3.0, 0.5, -1.0, 2.0])
    a = segment_softmax(s, seg, 3)
    assert_close(a[:2], torch.softmax(s[:2], 0))
    assert_close(a[2:], torch.softmax(s[2:], 0))
    c = segment_sum(a[:, None] * torch.ones(5, 2), seg, 3)
    assert_close(c, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_factorized_scorer_equals_literal_din():
    sc = DINScorer(16)
    q, h = torch.randn(7, 16), torch.randn(7, 16)
    assert_close(sc(q, h), sc.reference(q, h), rtol=1e-5, atol=1e-5)


def test_gaps_follow_the_formula_inputs():
    dt, dp = gaps([1.0, None, 4.0], 10.0)
    assert dt == [9.0, 0.0, 6.0]
    assert dp == [3.0, 2.0, 1.0]
    # no query date: the last dated record's date is used
    dt, _ = gaps([1.0, 4.0, None], None)
    assert dt == [3.0, 0.0, 0.0]


def _random_batch(d=8, lengths=(3, 0, 5, 1), n_records=20):
    rows = [torch.randint(0, n_records, (n,)).tolist() for n in lengths]
    days = [[float(x) for x in torch.rand(n).mul(30).sort().values.tolist()] for n in lengths]
    qdays = [40.0, None, 35.0, None]
    return rows, days, qdays, torch.randn(n_records, d), torch.randn(len(lengths), d)


def test_jagged_pooling_equals_naive_loop():
    rows, days, qdays, bank, q = _random_batch()
    pool = TimeAwarePooling(TimeAwarePoolingConfig(), d=8)
    with torch.no_grad():
        pool.lambda_t.fill_(0.7)
        pool.lambda_o.fill_(-0.3)
    hist = build_history(rows, days, qdays)
    c, alpha = pool(q, hist, bank)
    hists = [bank[torch.tensor(r, dtype=torch.long)] for r in rows]
    dts, dps = [], []
    for r, dd, qd in zip(rows, days, qdays):
        a, b = gaps(dd, qd)
        dts.append(torch.tensor(a))
        dps.append(torch.tensor(b))
    ref = pool.reference(q, hists, dts, dps)
    assert_close(c, ref, rtol=1e-5, atol=1e-5)
    assert_close(c[1], torch.zeros(8))  # empty history pools to zeros
    assert alpha.shape == (9,)
    # cached record terms give the same answer
    c2, _ = pool(q, hist, bank, record_terms=pool.scorer.record_term(bank))
    assert_close(c2, c, rtol=1e-5, atol=1e-5)


def test_time_bias_moves_weight_to_recent_records_by_the_formula():
    pool = TimeAwarePooling(TimeAwarePoolingConfig(order_bias=False), d=4)
    h = torch.randn(1, 4).repeat(2, 1)  # identical records: DIN scores tie, only the bias differs
    hist = build_history([[0, 1]], [[0.0, 9.0]], [10.0])  # gaps: 10 days and 1 day
    with torch.no_grad():
        pool.lambda_t.fill_(1.0)
    _, alpha = pool(torch.randn(1, 4), hist, h)
    # s_old - s_new = -(log 11 - log 2): alpha_new / alpha_old = 11 / 2
    assert_close(alpha[1] / alpha[0], torch.tensor(11.0 / 2.0))
    with torch.no_grad():
        pool.lambda_t.fill_(-1.0)  # negative lambda favours older records
    _, alpha = pool(torch.randn(1, 4), hist, h)
    assert alpha[0] > alpha[1]


def test_order_bias_uses_position_gap():
    pool = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=False), d=4)
    h = torch.randn(1, 4).repeat(3, 1)
    hist = build_history([[0, 1, 2]], [[None, None, None]], [None])
    assert hist.order_gaps().tolist() == [3.0, 2.0, 1.0]
    assert hist.dt.values().tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        pool.lambda_o.fill_(2.0)
    _, alpha = pool(torch.randn(1, 4), hist, h)
    expect = torch.softmax(-2.0 * torch.log1p(torch.tensor([3.0, 2.0, 1.0])), 0)
    assert_close(alpha, expect)
    assert math.isclose(alpha.sum().item(), 1.0, rel_tol=1e-6)


def test_disabled_biases_ignore_gaps():
    pool = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=False, order_bias=False), d=4)
    h = torch.randn(1, 4).repeat(2, 1)
    _, alpha = pool(torch.randn(1, 4), build_history([[0, 1]], [[0.0, 9.0]], [10.0]), h)
    assert_close(alpha, torch.tensor([0.5, 0.5]))


def test_history_is_one_unweighted_kjt_key_with_day_gaps_beside_it():
    hist = build_history([[3, 7], [], [1, 2, 9]], [[10.0, 12.5], [], [None, 4.0, 5.0]], [13.0, None, 6.0])
    assert hist.ids.keys() == [HISTORY] and hist.ids.weights_or_none() is None
    assert hist.record_ids().tolist() == [3, 7, 1, 2, 9]
    assert hist.lengths().tolist() == [2, 0, 3] and hist.dt.lengths().tolist() == [2, 0, 3]
    assert hist.dt.values().tolist() == [3.0, 0.5, 0.0, 2.0, 1.0]
    assert hist.order_gaps().tolist() == [2.0, 1.0, 3.0, 2.0, 1.0]
    moved = hist.to("cpu")
    assert moved.record_ids().tolist() == [3, 7, 1, 2, 9] and moved.dt.values().tolist() == [3.0, 0.5, 0.0, 2.0, 1.0]
    # gaps must not hide in KJT weights
    with pytest.raises(ValueError, match="carry no weights"):
        History(KeyedJaggedTensor.from_lengths_sync(keys=[HISTORY], values=hist.record_ids(),
                                                    lengths=hist.lengths(), weights=hist.dt.values()), hist.dt)


@pytest.mark.parametrize("lengths", [[], [0], [4], [2, 0, 3, 1, 0], [0, 0]])
def test_order_gaps_from_lengths_equal_the_per_example_gaps(lengths):
    expect = [g for n in lengths for g in gaps([None] * n, None)[1]]
    got = order_gaps(torch.tensor(lengths, dtype=torch.int32))
    assert got.dtype == torch.float32 and got.tolist() == expect
    assert order_gaps(torch.tensor(lengths), total=sum(lengths)).tolist() == expect
