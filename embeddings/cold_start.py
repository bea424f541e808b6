"""The P_u row used for a user without a trained row (cold start).

The paper gives such a user zeros, so the prefix is P_q alone (an empty bag in the user-state EBC pools to
zeros, which is the ``zero`` mode). ``mean`` uses the mean of the trained rows instead: the "average user",
which keeps the prefix at the scale the bridge LoRA was trained on.

    mode    row for a cold user          served_by
    zero    0                            "pq_only(zero)"
    mean    mean_i table_weight[i]       "pq_only(mean)"

Example::

    row = cold_start_rows(table.weight, "mean")        # (D,)
    user_state[cold] = row                              # (B, D) rows of cold users replaced
"""

from __future__ import annotations

import torch

COLD_START_MODES = ("zero", "mean")


def cold_start_rows(table_weight: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, D) table -> the (D,) row served to a user who has none. An empty table gives zeros in both modes."""
    if mode not in COLD_START_MODES:
        raise ValueError(f"cold_start mode {mode!r} is not one of {', '.join(COLD_START_MODES)}")
    if table_weight.dim() != 2:
        raise ValueError(f"table weight must be (N, D), got shape {tuple(table_weight.shape)}")
    w = table_weight.detach()
    if mode == "zero" or w.shape[0] == 0:
        return torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
    return w.mean(dim=0)  # (D,)


def served_by(has_row: bool, mode: str) -> str:
    """The path that produced a prefix: ``pu+pq`` for a user with a row, else ``pq_only(<mode>)``."""
    return "pu+pq" if has_row else f"pq_only({mode})"
