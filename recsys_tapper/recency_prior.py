"""Initialise lambda_t, lambda_o from the data: the recency prior that best explains each target by its history.

The paper starts both scalars at N(0, 0.02). At that start the history attention is flat in time, and a drifting
user's old records weigh as much as the new ones; on a CPU budget of a hundred steps the lambdas barely move
(a user's LaMP-2 run: 0.0105 and 0.0301 after Stage 2). ``model.lambda_init=data`` starts them instead where the
recency prior alone best predicts each Stage-2 target from its visible history.

For Stage-2 samples s (target answer a_s, visible records j with answers a_j, day gaps dt_j, order gaps dpos_j):

    alpha_sj = softmax_j(-lambda_t·log(1+dt_j) - lambda_o·log(1+dpos_j))     (the pooling's bias, no DIN score)
    y_sj     = agree(a_s, a_j)   exact match for labelled tasks; word-set Jaccard for generation
    J        = mean_s log(eps + (1 - eps)·Σ_j alpha_sj y_sj) - rho·(lambda_t² + lambda_o²)

For a label task Σ_j alpha_sj y_sj is the probability that the recency-weighted vote of the history gives the
target's label, so maximising J spreads attention over the records that still agree (after a drift: the recent
ones) instead of betting on the last record. A user without drift gives J flat in the lambdas: they stay near 0.
Only the biases the pooling applies (``time_bias``, ``order_bias``) are fitted. With the pooling's soft recency
window (``model.pooling.window``) the order penalty gains lambda_w·softplus(dpos_j - w), and ``init_lambdas`` fits
lambda_w and the width w with the lambdas (the width from its configured start, unshrunk).
``model.lambda_init_latest=k`` fits the prior on each user's k latest targets only (:func:`latest_targets`).

Example::

    lt, lo = fit_lambdas(samples, record_answers(train, fb), task)   # e.g. (0.21, 1.93) on a drifting task
    init_lambdas(model.tower.pooling, samples, record_answers(train, fb), task)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from embeddings.history import build_history
from embeddings.jagged import segment_ids, segment_softmax, segment_sum
from recsys_tapper.data import LampExample
from recsys_tapper.features import FeatureBuilder, Sample, record_key
from recsys_tapper.tasks import GENERATION, Task

_WORD = re.compile(r"\S+")


def record_answers(examples: Sequence[LampExample], fb: FeatureBuilder) -> dict[int, str]:
    """Bank row -> the record's answer (its ``task.output_field``) for every registered profile record."""
    field = fb.task.output_field
    if field is None:
        return {}
    out = {}
    for ex in examples:
        for r in ex.profile:
            row = fb.bank.index.get(record_key(ex.user_id, r.id))
            if row is not None and field in r.fields:
                out[row] = str(r.fields[field]).strip()
    return out


def latest_targets(samples: Sequence[Sample], k: int | None) -> list[Sample]:
    """Each user's k latest samples (most history records first seen; None = all), in their given order."""
    if k is None:
        return list(samples)
    by_user: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_user.setdefault(s.user, []).append(i)
    keep = {i for idx in by_user.values() for i in sorted(idx, key=lambda i: -len(samples[i].history_rows))[:k]}
    return [s for i, s in enumerate(samples) if i in keep]


def agreement(task: Task, target: str, answer: str) -> float:
    """y in [0, 1]: 1.0 for the same label (labelled tasks), word-set Jaccard for generation."""
    if task.kind != GENERATION:
        return float(target.strip() == answer.strip())
    a, b = set(_WORD.findall(target)), set(_WORD.findall(answer))
    return len(a & b) / len(a | b) if a | b else 0.0


def _fit(samples: Sequence[Sample], answers: Mapping[int, str], task: Task, params: list[torch.Tensor],
         penalty, shrink: list[torch.Tensor], eps: float, rho: float, steps: int, lr: float) -> bool:
    """Maximise J (module docstring) over ``params`` in place by full-batch Adam from where they stand;
    ``penalty(dt, dpos)`` gives the (T,) bias, ``shrink`` the scalars under the rho·x² term. False (nothing
    changed) when no sample has a fully answered visible history."""
    keep = [s for s in samples if s.answer is not None and s.history_rows
            and all(r in answers for r in s.history_rows)]
    if not keep or not params:
        return False
    hist = build_history([s.history_rows for s in keep], [s.history_days for s in keep], [s.query_day for s in keep])
    seg = segment_ids(hist.lengths())  # (T,)
    y = torch.tensor([agreement(task, s.answer, answers[r]) for s in keep for r in s.history_rows])  # (T,)
    dt, dpos = hist.dt.values().float(), hist.order_gaps()  # (T,)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        alpha = segment_softmax(-penalty(dt, dpos), seg, len(keep))  # (T,)
        p = segment_sum((alpha * y)[:, None], seg, len(keep))[:, 0]  # (S,)
        loss = -torch.log(eps + (1 - eps) * p).mean() + rho * sum(x.pow(2).sum() for x in shrink)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return True


def fit_lambdas(samples: Sequence[Sample], answers: Mapping[int, str], task: Task, time_bias: bool = True,
                order_bias: bool = True, eps: float = 0.05, rho: float = 1e-3, steps: int = 300,
                lr: float = 0.05) -> tuple[float, float]:
    """(lambda_t, lambda_o) maximising J (module docstring) by full-batch Adam from 0; a disabled bias stays 0.

    Args:
        samples: Stage-2 samples (``answer`` set); samples without visible history are skipped.
        answers: bank row -> answer of that record (:func:`record_answers`).
        task: decides the agreement (:func:`agreement`).
    """
    lam = torch.zeros(2, requires_grad=True)

    def penalty(dt, dpos):
        return lam[0] * torch.log1p(dt.clamp_min(0)) * time_bias + lam[1] * torch.log1p(dpos.clamp_min(0)) * order_bias

    if not (time_bias or order_bias) or not _fit(samples, answers, task, [lam], penalty, [lam], eps, rho, steps, lr):
        return 0.0, 0.0
    lt, lo = lam.detach().tolist()
    return (lt if time_bias else 0.0), (lo if order_bias else 0.0)


def init_lambdas(pooling, samples: Sequence[Sample], answers: Mapping[int, str], task: Task, eps: float = 0.05,
                 rho: float = 1e-3, steps: int = 300, lr: float = 0.05) -> list[float]:
    """Fit the pooling's own enabled recency scalars to J, in place, with its own penalty
    (``TimeAwarePooling.bias``): lambda_t, lambda_o (the fit of :func:`fit_lambdas`) and, with the soft window,
    lambda_w and the width (unless the window is fixed: ``learn_window=False``). The lambdas start at 0, the width
    at ``pooling.cfg.window``; rho shrinks the lambdas only. Returns ``pooling.recency_parameters()``'s values (a
    disabled bias or a fixed window keeps its start; with no sample to fit, the enabled lambdas stay at 0 and the
    width at its start)."""
    params = pooling.recency_parameters()
    on = ([pooling.lambda_t] if pooling.cfg.time_bias else []) + (
        [p for p in params if p is not pooling.lambda_t] if pooling.cfg.order_bias else [])
    on = [p for p in on if p.requires_grad]  # a fixed window (``learn_window=False``) keeps its start
    lambdas = [p for p in on if not (pooling.windowed and p is pooling.window_width)]
    with torch.no_grad():
        for p in lambdas:
            p.zero_()
        if pooling.windowed:
            pooling.window_width.fill_(float(pooling.cfg.window))
    try:  # pooling.bias reads only the enabled recency scalars: no gradient reaches the DIN scorer
        _fit(samples, answers, task, on, pooling.bias, lambdas, eps, rho, steps, lr)
    finally:
        for p in on:
            p.grad = None
    return [p.detach().item() for p in params]
