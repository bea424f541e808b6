"""lambda_init=data: the recency prior fitted to the Stage-2 targets (recsys_tapper.recency_prior), and
lr_lambda: the lambdas' own learning rate."""

import math

import pytest
import torch

from recsys_tapper.features import Sample
from recsys_tapper.recency_prior import agreement, fit_lambdas
from recsys_tapper.tasks import get_task

TAG = get_task("LaMP-2M")


def _samples(answers_per_sample, targets):
    """Samples whose history rows are 0..n-1 of one shared answer table, dated 3 days apart."""
    out = []
    for i, (hist, target) in enumerate(zip(answers_per_sample, targets)):
        n = len(hist)
        out.append(Sample(f"s{i}", "u", list(range(n)), [3.0 * j for j in range(n)], 3.0 * n, "q", target))
    return out


def test_agreement_is_exact_match_for_labels_and_jaccard_for_generation():
    assert agreement(TAG, "comedy", " comedy") == 1.0 and agreement(TAG, "comedy", "romance") == 0.0
    assert agreement(get_task("LaMP-4"), "a b c", "a b d") == 0.5
    assert agreement(get_task("LaMP-4"), "A b", "a b") == 1 / 3  # case counts: CAPS is a habit


def test_fitted_order_lambda_matches_a_grid_search_of_the_same_objective():
    # history answers [x, x, y, y] (oldest first), target y: the two recent records agree
    answers = {0: "x", 1: "x", 2: "y", 3: "y"}
    samples = _samples([["x", "x", "y", "y"]] * 5, ["y"] * 5)
    lt, lo = fit_lambdas(samples, answers, TAG, time_bias=False, steps=2000, lr=0.02)
    assert lt == 0.0

    def objective(lam):  # naive reference: weights (1 + gap)^-lam over gaps 4, 3, 2, 1
        w = [(1 + g) ** -lam for g in (4, 3, 2, 1)]
        p = (w[2] + w[3]) / sum(w)
        return math.log(0.05 + 0.95 * p) - 1e-3 * lam * lam

    best = max((i / 1000 for i in range(20001)), key=objective)
    assert lo == pytest.approx(best, abs=2e-2)
    assert best > 3.0  # the prior leans hard on the recent records


def test_a_history_that_always_agrees_leaves_the_lambdas_at_zero():
    answers = {0: "y", 1: "y", 2: "y"}
    assert fit_lambdas(_samples([["y"] * 3] * 4, ["y"] * 4), answers, TAG) == (0.0, 0.0)
    assert fit_lambdas([], answers, TAG) == (0.0, 0.0)


def test_stage2_starts_the_lambdas_from_the_data_and_trains_them_at_their_own_rate(tmp_path):
    from conftest import tiny_config

    from recsys_tapper.job import run
    from recsys_tapper.synthetic import synthetic_tagging_task

    cfg = tiny_config(tmp_path, n_users=4, stage2_per_user=6)
    cfg.task.name = "LaMP-2M"
    cfg.model.lambda_init = "data"
    cfg.trainer.lr_lambda = 0.05
    cfg.trainer.class_readout = "label_set"
    splits = synthetic_tagging_task(n_users=4, n_records=12, n_test=1, seed=0, drift=True, drift_frac=0.5)
    res = run(cfg, splits=splits)
    tp = res["methods"]["tapper"]
    assert tp["lambda_t"] == res["lambda_t"] and tp["lambda_o"] == res["lambda_o"]
    # the start is the data fit, not N(0, 0.02): refit it the same way
    from embeddings.record_bank import RecordBank
    from llm_bridge.backbone import load_backbone
    from llm_bridge.encoder import TextEncoder
    from recsys_tapper.features import FeatureBuilder
    from recsys_tapper.pipeline import personal_splits
    from recsys_tapper.recency_prior import record_answers
    from recsys_tapper.users import UserIndex

    lm, tok = load_backbone(cfg.model.backbone)
    _, test, trainees, train_chosen = personal_splits(*splits, cfg.data.n_users, TAG)
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), TAG, RecordBank(lm.config.hidden_size), UserIndex(trainees),
                        cfg.model.max_prompt_tokens)
    fb.register(train_chosen + test)
    s2 = fb.stage2_samples(train_chosen, per_user=6, seed=cfg.trainer.seed)
    lt, lo = fit_lambdas(s2, record_answers(train_chosen, fb), TAG)
    assert tp["lambda_t_start"] == pytest.approx(lt, abs=1e-6) and tp["lambda_o_start"] == pytest.approx(lo, abs=1e-6)
    assert lt + lo > 0.5  # half the profile drifted: the prior leans on recent records
    # trained at lr 0.05 without decay: each moved further than lr_dense (3e-3) could take it in these steps
    steps = res["n_stage2_steps"]
    moved = [abs(tp["lambda_t"] - lt), abs(tp["lambda_o"] - lo)]
    assert min(moved) > 3e-3 * steps, (moved, steps)
    assert torch.isfinite(torch.tensor(moved)).all()


def _agreement_prob(pool, samples, answers):
    """Mean over samples of sum_j alpha_sj y_sj under the pooling's own penalty (no DIN)."""
    out = []
    for s in samples:
        n = len(s.history_rows)
        dt = torch.tensor([s.query_day - d for d in s.history_days])
        dpos = torch.arange(n, 0, -1, dtype=torch.float32)
        alpha = torch.softmax(-pool.bias(dt, dpos), 0)
        out.append(float(alpha @ torch.tensor([float(answers[r] == s.answer) for r in s.history_rows])))
    return sum(out) / len(out)


def _six_x_then_three() -> tuple[list[Sample], dict[int, str]]:
    """Histories of six x then the three records (y y z) in each order, before a y target (twice each)."""
    samples, answers = [], {}
    for i, tail in enumerate([["y", "y", "z"], ["y", "z", "y"], ["z", "y", "y"]] * 2):
        hist = ["x"] * 6 + tail
        rows = list(range(len(answers), len(answers) + len(hist)))
        answers.update(zip(rows, hist))
        samples.append(Sample(f"s{i}", "u", rows, [3.0 * j for j in range(len(hist))], 3.0 * len(hist), "q", "y"))
    return samples, answers


def test_the_data_prior_fits_the_soft_window_and_reads_a_recent_drift_better_than_the_power_law():
    """init_lambdas fits the pooling's own recency scalars; with ``window`` it fits lambda_w and the width too.
    Histories of six x then the three records (y y z) in each order, before a y target: the best prior weighs the
    last three alike (2/3 agreement), which a window can and a power law in the gap cannot (it must either bet
    on the last record or spread onto the x's)."""
    from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
    from recsys_tapper.recency_prior import init_lambdas

    samples, answers = _six_x_then_three()
    plain = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=False), d=4)
    got = init_lambdas(plain, samples, answers, TAG)
    assert got[1] == pytest.approx(fit_lambdas(samples, answers, TAG, time_bias=False)[1], abs=1e-6)
    windowed = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=False, window=5.0), d=4)
    t_before = float(windowed.lambda_t)
    lt, _lo, lw, width = init_lambdas(windowed, samples, answers, TAG)
    assert lt == t_before  # the time bias is off: its scalar is left alone
    assert lw > 1.0 and 2.0 < width < 4.0  # the window closes in on the last three records
    with torch.no_grad():
        p_plain, p_win = _agreement_prob(plain, samples, answers), _agreement_prob(windowed, samples, answers)
    assert p_plain < 0.62 and 0.64 < p_win <= 2 / 3, (p_plain, p_win)
    assert all(p.grad is None for p in windowed.parameters())
    assert all(p.requires_grad for p in windowed.parameters())


def test_a_fixed_window_keeps_its_width_and_strength_while_the_lambdas_fit_and_train():
    """``learn_window=False``: the data prior fits lambda_o around the window without moving lambda_w or the width
    (on the histories above it would close the window to ~3), and a training loss gives them no gradient."""
    from embeddings.pooling import WINDOW_LAMBDA_START, TimeAwarePooling, TimeAwarePoolingConfig
    from recsys_tapper.recency_prior import init_lambdas

    samples, answers = _six_x_then_three()
    fixed = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=False, window=5.0, learn_window=False), d=4)
    _lt, lo, lw, width = init_lambdas(fixed, samples, answers, TAG)
    assert (lw, width) == (WINDOW_LAMBDA_START, 5.0)
    assert lo > 0.1  # lambda_o alone weighs the recent records up inside the fixed window
    assert [p.requires_grad for p in fixed.recency_parameters()] == [True, True, False, False]
    fixed.bias(torch.tensor([1.0, 9.0]), torch.tensor([1.0, 9.0])).sum().backward()
    assert fixed.window_width.grad is None and fixed.window_lambda.grad is None and fixed.lambda_o.grad is not None


def test_latest_targets_keeps_each_users_k_latest_in_order():
    from recsys_tapper.recency_prior import latest_targets

    s = [Sample(f"{u}{n}", u, list(range(n)), [0.0] * n, float(n), "q", "y") for n in (1, 3, 2) for u in "ab"]
    got = latest_targets(s, 2)
    assert [x.id for x in got] == ["a3", "b3", "a2", "b2"]
    assert latest_targets(s, None) == s and [x.id for x in latest_targets(s, 1)] == ["a3", "b3"]


def test_lambda_init_latest_needs_the_data_prior_and_a_positive_count():
    from conftest import tiny_config

    from recsys_tapper.checks import check_run_config
    from recsys_tapper.errors import InputError

    cfg = tiny_config("/tmp/unused")
    cfg.model.lambda_init_latest = 5
    with pytest.raises(InputError, match="lambda_init=data"):
        check_run_config(cfg)
    cfg.model.lambda_init = "data"
    check_run_config(cfg)
    cfg.model.lambda_init_latest = 0
    with pytest.raises(InputError, match="count >= 1"):
        check_run_config(cfg)
