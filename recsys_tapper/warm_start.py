"""The recsys warm start: user and item rows from a biased MF fitted on the Stage-2 training ratings only.

CoLLM-style: a collaborative model that already knows the users and items hands its vectors to the LLM
through a shared up-projection. Row u of the P_u table becomes ``[p_u, b_u]``, row i of the item table
``[q_i, b_i]`` (width ``rank + 1``); users or items MF never saw keep their random rows.

Example::

    mf = fit_mf(train_examples, rank=32, seed=0)           # BiasedMF on the training profiles' ratings
    n = init_rows(model.tower.table.weight, users, mf.users, mf.P, mf.bu)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recsys_tapper.baselines.classical import BiasedMF, visible_ratings
from recsys_tapper.data import LampExample
from recsys_tapper.features import Sample
from recsys_tapper.users import UserIndex


def fit_mf(train: Sequence[LampExample], rank: int, seed: int, field: str = "score") -> BiasedMF:
    """BiasedMF (the ``biased_mf`` baseline's settings, ``k=rank``) on the ratings in ``train``'s profiles."""
    ratings = visible_ratings(train, field)
    if not ratings:
        raise ValueError("warm_start=mf needs rated profile records in the Stage-2 training questions; none found")
    return BiasedMF(k=rank, seed=seed).fit(*zip(*ratings))


@torch.no_grad()
def init_rows(weight: torch.Tensor, index: UserIndex, mf_index, factors: np.ndarray, bias: np.ndarray) -> int:
    """Write ``[factors[j], bias[j]]`` into ``weight[row]`` for every id MF knows; returns how many rows."""
    if weight.shape[1] != factors.shape[1] + 1:
        raise ValueError(f"rows are {weight.shape[1]} wide, MF gives {factors.shape[1]} factors + 1 bias")
    rows, src = [], []
    for uid, row in index.index.items():
        j = mf_index.index.get(uid)
        if j is not None:
            rows.append(row)
            src.append(j)
    if rows:
        vec = np.concatenate([factors[src], bias[src, None]], axis=1)
        weight[torch.tensor(rows)] = torch.as_tensor(vec, dtype=weight.dtype)
    return len(rows)


def item_index(samples: Sequence[Sample]) -> UserIndex:
    """Item id -> item-table row for the items of the Stage-2 targets (other items are served cold)."""
    return UserIndex(sorted({s.item for s in samples if s.item is not None}, key=lambda x: (len(x), x)))
