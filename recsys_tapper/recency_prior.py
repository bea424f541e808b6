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
Only the biases the pooling applies (``time_bias``, ``order_bias``) are fitted.

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


def agreement(task: Task, target: str, answer: str) -> float:
    """y in [0, 1]: 1.0 for the same label (labelled tasks), word-set Jaccard for generation."""
    if task.kind != GENERATION:
        return float(target.strip() == answer.strip())
    a, b = set(_WORD.findall(target)), set(_WORD.findall(answer))
    return len(a & b) / len(a | b) if a | b else 0.0


def fit_lambdas(samples: Sequence[Sample], answers: Mapping[int, str], task: Task, time_bias: bool = True,
                order_bias: bool = True, eps: float = 0.05, rho: float = 1e-3, steps: int = 300,
                lr: float = 0.05) -> tuple[float, float]:
    """(lambda_t, lambda_o) maximising J (module docstring) by full-batch Adam from 0; a disabled bias stays 0.

    Args:
        samples: Stage-2 samples (``answer`` set); samples without visible history are skipped.
        answers: bank row -> answer of that record (:func:`record_answers`).
        task: decides the agreement (:func:`agreement`).
    """
    keep = [s for s in samples if s.answer is not None and s.history_rows
            and all(r in answers for r in s.history_rows)]
    if not keep or not (time_bias or order_bias):
        return 0.0, 0.0
    hist = build_history([s.history_rows for s in keep], [s.history_days for s in keep], [s.query_day for s in keep])
    lengths = hist.lengths()
    seg = segment_ids(lengths)  # (T,)
    y = torch.tensor([agreement(task, s.answer, answers[r]) for s in keep for r in s.history_rows])  # (T,)
    ft = torch.log1p(hist.dt.values().float().clamp_min(0)) if time_bias else torch.zeros_like(y)  # (T,)
    fo = torch.log1p(hist.order_gaps().clamp_min(0)) if order_bias else torch.zeros_like(y)  # (T,)
    lam = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    for _ in range(steps):
        alpha = segment_softmax(-(lam[0] * ft + lam[1] * fo), seg, len(keep))  # (T,)
        p = segment_sum((alpha * y)[:, None], seg, len(keep))[:, 0]  # (S,)
        loss = -torch.log(eps + (1 - eps) * p).mean() + rho * lam.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lt, lo = lam.detach().tolist()
    return (lt if time_bias else 0.0), (lo if order_bias else 0.0)


def init_lambdas(pooling, samples: Sequence[Sample], answers: Mapping[int, str], task: Task) -> tuple[float, float]:
    """Set ``pooling.lambda_t`` / ``lambda_o`` (the enabled ones) to :func:`fit_lambdas`; returns the fit."""
    lt, lo = fit_lambdas(samples, answers, task, pooling.cfg.time_bias, pooling.cfg.order_bias)
    with torch.no_grad():
        if pooling.cfg.time_bias:
            pooling.lambda_t.fill_(lt)
        if pooling.cfg.order_bias:
            pooling.lambda_o.fill_(lo)
    return lt, lo
