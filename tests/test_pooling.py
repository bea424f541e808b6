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


def test_content_term_adds_beta_times_the_centered_cosine_by_hand():
    """content_beta: s_j = DIN - penalties + beta * cos(q - mu_q, h_j - mu_h); training path, inference path
    and the naive loop agree with a hand computation."""
    rows, days, qdays, bank, q = _random_batch()
    pool = TimeAwarePooling(TimeAwarePoolingConfig(content_beta=3.0), d=8)
    mu_q, mu_h = torch.randn(8), torch.randn(8)
    pool.set_centers(torch.stack([mu_q - 1.0, mu_q + 1.0]), torch.stack([mu_h, mu_h, mu_h]))
    assert_close(pool.query_center, mu_q)
    assert_close(pool.record_center, mu_h)
    with torch.no_grad():
        pool.lambda_t.fill_(0.4)
        pool.beta.fill_(2.5)
    hist = build_history(rows, days, qdays)
    c, alpha = pool(q, hist, bank)
    c_inf, alpha_inf = pool.infer(q, hist, bank)
    want_c, want_alpha = [], []
    for b, r in enumerate(rows):
        if not r:
            want_c.append(torch.zeros(8))
            continue
        h = bank[torch.tensor(r)]
        dt, dp = gaps(days[b], qdays[b])
        qc, hc = q[b] - mu_q, h - mu_h
        cos = torch.tensor([float(qc @ x) / (math.sqrt(float(qc @ qc)) * math.sqrt(float(x @ x))) for x in hc])
        with torch.no_grad():
            s = (pool.scorer.reference(q[b].expand_as(h), h) - torch.tensor([0.4 * math.log1p(x) for x in dt])
                 - pool.lambda_o * torch.log1p(torch.tensor(dp)) + 2.5 * cos)
        a = torch.softmax(s, 0)
        want_alpha.append(a)
        want_c.append(a @ h)
    assert_close(alpha.detach(), torch.cat(want_alpha), rtol=1e-5, atol=1e-6)
    assert_close(c.detach(), torch.stack(want_c), rtol=1e-5, atol=1e-6)
    assert_close(alpha_inf, alpha.detach(), rtol=1e-5, atol=1e-6)
    assert_close(c_inf, c.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = pool.reference(q, [bank[torch.tensor(r, dtype=torch.long)] for r in rows],
                             [torch.tensor(gaps(dd, qd)[0]) for dd, qd in zip(days, qdays)],
                             [torch.tensor(gaps(dd, qd)[1]) for dd, qd in zip(days, qdays)])
    assert_close(ref, c.detach(), rtol=1e-5, atol=1e-6)
    c.sum().backward()  # beta learns
    assert pool.beta.grad is not None and float(pool.beta.grad.abs()) > 0


def test_content_term_is_off_by_default_and_leaves_the_papers_state_names():
    off = TimeAwarePooling(TimeAwarePoolingConfig(), d=8)
    on = TimeAwarePooling(TimeAwarePoolingConfig(content_beta=10.0), d=8)
    assert set(off.state_dict()) == {k for k in on.state_dict() if k not in ("beta", "query_center", "record_center")}
    assert off.content(torch.randn(3, 8), torch.randn(3, 8)) is None
    assert float(on.beta.detach()) == 10.0 and "beta" in on.state_dict() and "query_center" in on.state_dict()


def test_soft_window_subtracts_lambda_w_softplus_past_the_width_by_hand():
    """window=w: s_j = DIN - lambda_t log(1+dt) - lambda_o log(1+dpos) - lambda_w softplus(dpos - width); the
    training path, the inference path and the naive loop agree with a hand computation, and both window scalars
    learn."""
    rows, days, qdays, bank, q = _random_batch()
    pool = TimeAwarePooling(TimeAwarePoolingConfig(window=2.0), d=8)
    assert pool.windowed and float(pool.window_width) == 2.0 and float(pool.window_lambda) == 1.0
    with torch.no_grad():
        pool.lambda_t.fill_(0.3)
        pool.lambda_o.fill_(0.2)
        pool.window_lambda.fill_(1.7)
    hist = build_history(rows, days, qdays)
    c, alpha = pool(q, hist, bank)
    c_inf, alpha_inf = pool.infer(q, hist, bank)
    want_c, want_alpha = [], []
    for b, r in enumerate(rows):
        if not r:
            want_c.append(torch.zeros(8))
            continue
        h = bank[torch.tensor(r)]
        dt, dp = gaps(days[b], qdays[b])
        pen = [0.3 * math.log1p(t) + 0.2 * math.log1p(g) + 1.7 * math.log1p(math.exp(g - 2.0)) for t, g in zip(dt, dp)]
        with torch.no_grad():
            s = pool.scorer.reference(q[b].expand_as(h), h) - torch.tensor(pen)
        a = torch.softmax(s, 0)
        want_alpha.append(a)
        want_c.append(a @ h)
    assert_close(alpha.detach(), torch.cat(want_alpha), rtol=1e-5, atol=1e-6)
    assert_close(c.detach(), torch.stack(want_c), rtol=1e-5, atol=1e-6)
    assert_close(alpha_inf, alpha.detach(), rtol=1e-5, atol=1e-6)
    assert_close(c_inf, c.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = pool.reference(q, [bank[torch.tensor(r, dtype=torch.long)] for r in rows],
                             [torch.tensor(gaps(dd, qd)[0]) for dd, qd in zip(days, qdays)],
                             [torch.tensor(gaps(dd, qd)[1]) for dd, qd in zip(days, qdays)])
    assert_close(ref, c.detach(), rtol=1e-5, atol=1e-6)
    (c * torch.randn_like(c)).sum().backward()
    assert float(pool.window_lambda.grad.abs()) > 0 and float(pool.window_width.grad.abs()) > 0
    assert pool.recency_parameters() == [pool.lambda_t, pool.lambda_o, pool.window_lambda, pool.window_width]


def test_soft_window_is_off_by_default_and_dropped_with_the_order_bias():
    off = TimeAwarePooling(TimeAwarePoolingConfig(), d=8)
    on = TimeAwarePooling(TimeAwarePoolingConfig(window=5.0), d=8)
    no_order = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=False, order_bias=False, window=5.0), d=8)
    assert set(off.state_dict()) == {k for k in on.state_dict() if k not in ("window_lambda", "window_width")}
    assert set(no_order.state_dict()) == set(off.state_dict()) and not no_order.windowed
    assert no_order.recency_parameters() == [no_order.lambda_t, no_order.lambda_o]
    dpos = torch.arange(1.0, 11.0)
    assert_close(no_order.bias(torch.ones(10), dpos), torch.zeros(10))
    pen = on.order_penalty(dpos).detach() - on.lambda_o.detach() * torch.log1p(dpos)  # the window's part
    # inside the window the window's penalty stays under softplus(0) = log 2; 5 places past it, above 5
    assert float(pen[:5].max()) <= math.log(2) + 1e-6 and float(pen[9]) > 5.0
