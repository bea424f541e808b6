"""Build the jagged history KJT from per-example record rows and dates.

The one place that turns (record rows, record dates, query date) into time and order gaps, used by training
and serving alike.

Example::

    kjt = history_kjt([[3, 7], [], [1, 2, 9]],
                      record_days=[[10.0, 12.5], [], [None, 4.0, 5.0]],
                      query_days=[13.0, None, 6.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.pooling import HISTORY_DPOS, HISTORY_DT


def gaps(record_days: Sequence[float | None], query_day: float | None) -> tuple[list[float], list[float]]:
    """Time gaps (days, >= 0; 0 when a date is missing) and order gaps (most recent record = 1).

    Records are in time order. A query without a date uses the last dated history record's date.
    """
    n = len(record_days)
    if query_day is None:
        dated = [d for d in record_days if d is not None]
        query_day = dated[-1] if dated else None
    dts = [0.0 if (d is None or query_day is None) else max(0.0, query_day - d) for d in record_days]
    dpos = [float(n - j) for j in range(n)]
    return dts, dpos


def history_kjt(
    record_rows: Sequence[Sequence[int]],
    record_days: Sequence[Sequence[float | None]],
    query_days: Sequence[float | None],
) -> KeyedJaggedTensor:
    """(B examples of jagged record rows) -> weighted KJT with keys history_dt and history_dpos."""
    lengths, values, w_dt, w_pos = [], [], [], []
    for rows, days, qd in zip(record_rows, record_days, query_days, strict=True):
        if len(rows) != len(days):
            raise ValueError(f"history has {len(rows)} records but {len(days)} dates")
        dt, dp = gaps(days, qd)
        lengths.append(len(rows))
        values.extend(rows)
        w_dt.extend(dt)
        w_pos.extend(dp)
    lengths_t = torch.tensor(lengths * 2, dtype=torch.int32)
    v = torch.tensor(values, dtype=torch.long)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[HISTORY_DT, HISTORY_DPOS],
        values=torch.cat([v, v]),
        weights=torch.tensor(w_dt + w_pos, dtype=torch.float32),
        lengths=lengths_t,
    )
