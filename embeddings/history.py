"""A batch of jagged histories: record ids in a KeyedJaggedTensor, their time gaps beside it.

The one place that turns (record rows, record dates, query date) into model inputs, used by training and
serving alike. B examples, T records in all:

    feature            example 0      example 1   example 2
    ids["history"]     [r3, r7]       []          [r1, r2, r9]       KJT: bank rows, no weights
    dt                 [3.0, 0.5]     []          [0.0, 2.0, 1.0]    JaggedTensor, same lengths: days before the query
    order gap          [2, 1]         []          [3, 2, 1]          not carried: ``order_gaps(lengths)``

Why this shape (and not the alternatives):

- Not KJT weights. In TorchRec a KJT's weights are pooling weights: an ``EmbeddingBagCollection`` multiplies
  each looked-up row by its weight before summing (``PositionWeightedModule`` writes them for exactly that).
  Our gaps are not multipliers of the records; they enter the attention logits,
  ``s_j = DIN(q, h_j) - lambda_t log(1 + dt_j) - lambda_o log(1 + dpos_j)``. Carrying them as weights meant
  two keys with duplicated ids and a side channel any weighted EBC would silently misuse.
- The time gap is data (it comes from event dates), so it travels beside the ids as a ``JaggedTensor`` with
  the KJT's lengths.
- The order gap is a function of position alone (most recent = 1), so, as ``PositionWeightedModule`` derives
  positions from the KJT's offsets, the pooling derives it from the lengths; nothing extra travels.
- Not a feature-processor module: the learned part is two scalars (``lambda_t``, ``lambda_o``) the pooling
  already owns (checkpoint keys ``pooling.lambda_t/_o`` unchanged), and a feature processor's output is, again,
  KJT weights for an EBC, which this bias is not.

DMP shards only the user table (it reads ``users``); ``History`` passes through ``UserTower.forward`` untouched,
and the ids stay a KJT so a sharded record table could read them as they are.

Example::

    history = build_history([[3, 7], [], [1, 2, 9]],
                            record_days=[[10.0, 12.5], [], [None, 4.0, 5.0]],
                            query_days=[13.0, None, 6.0])
    history.record_ids()     # tensor([3, 7, 1, 2, 9])            (T,)
    history.lengths()        # tensor([2, 0, 3])                  (B,)
    history.dt.values()      # tensor([3.0, 0.5, 0.0, 2.0, 1.0])  (T,)
    history.order_gaps()     # tensor([2., 1., 3., 2., 1.])       (T,)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

HISTORY = "history"


def order_gaps(lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(B,) lengths -> (T,) fp32 order gap of every jagged row: n_b - j for record j of example b (the most
    recent record, last in time order, is 1). ``total`` = T (saves a device sync when known)."""
    lengths = lengths.long()
    t = int(lengths.sum()) if total is None else total
    if lengths.numel() == 1:
        return torch.arange(t, 0, -1, dtype=torch.float32, device=lengths.device)
    ends = lengths.cumsum(0)  # (B,) exclusive end of each example's rows
    gap = ends.repeat_interleave(lengths, output_size=t)  # (T,) end of the row's example
    return gap.sub_(torch.arange(t, device=lengths.device)).float()  # (T,): end - row index


@dataclass
class History:
    """Jagged histories of B examples (T records in all).

    Args:
        ids: KJT with the one key ``history``: record rows (bank indices) as values, no weights.
        dt: JaggedTensor with ``ids``' lengths: fp32 days between the query and each record (>= 0).
    """

    ids: KeyedJaggedTensor
    dt: JaggedTensor

    def __post_init__(self) -> None:
        if self.ids.keys() != [HISTORY]:
            raise ValueError(f"history ids must be a KJT with the one key {HISTORY!r}, got keys {self.ids.keys()}")
        if self.ids.weights_or_none() is not None:
            raise ValueError("history ids carry no weights; time gaps travel in History.dt")
        if self.dt.values().shape != self.ids.values().shape:
            raise ValueError(f"dt has {tuple(self.dt.values().shape)} values for {self.ids.values().numel()} records")

    def record_ids(self) -> torch.Tensor:
        """(T,) bank rows, example after example."""
        return self.ids.values()

    def lengths(self) -> torch.Tensor:
        """(B,) records per example."""
        return self.ids.lengths()

    def order_gaps(self) -> torch.Tensor:
        """(T,) fp32 order gaps, most recent = 1 (``order_gaps`` of the lengths)."""
        return order_gaps(self.ids.lengths(), self.ids.values().numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> History:
        return History(self.ids.to(device=device, non_blocking=non_blocking),
                       self.dt.to(device=device, non_blocking=non_blocking))


def gaps(record_days: Sequence[float | None], query_day: float | None) -> tuple[list[float], list[float]]:
    """Time gaps (days, >= 0; 0 when a date is missing) and order gaps (most recent record = 1) of one example.

    Records are in time order. A query without a date uses the last dated history record's date.
    """
    n = len(record_days)
    if query_day is None:
        dated = [d for d in record_days if d is not None]
        query_day = dated[-1] if dated else None
    dts = [0.0 if (d is None or query_day is None) else max(0.0, query_day - d) for d in record_days]
    dpos = [float(n - j) for j in range(n)]
    return dts, dpos


def build_history(
    record_rows: Sequence[Sequence[int]],
    record_days: Sequence[Sequence[float | None]],
    query_days: Sequence[float | None],
) -> History:
    """(B examples of jagged record rows, their dates, the query dates) -> ``History``."""
    lengths, values, dts = [], [], []
    for rows, days, qd in zip(record_rows, record_days, query_days, strict=True):
        if len(rows) != len(days):
            raise ValueError(f"history has {len(rows)} records but {len(days)} dates")
        lengths.append(len(rows))
        values.extend(rows)
        dts.extend(gaps(days, qd)[0])
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    ids = KeyedJaggedTensor.from_lengths_sync(
        keys=[HISTORY], values=torch.tensor(values, dtype=torch.long), lengths=lengths_t
    )
    return History(ids, JaggedTensor(values=torch.tensor(dts, dtype=torch.float32), lengths=lengths_t))
