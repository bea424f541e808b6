"""Pure-torch jagged ops: segment softmax and segment sums without padding.

These run on any device (the GPU image has no fbgemm). A jagged batch is ``values`` of shape
(T, ...) plus ``lengths`` (B,); ``segment_ids`` maps each of the T rows to its example.

Example::

    lengths = torch.tensor([2, 0, 3])
    seg = segment_ids(lengths)                   # tensor([0, 0, 2, 2, 2])
    a = segment_softmax(scores, seg, 3)          # sums to 1 within each non-empty example
    c = segment_sum(a[:, None] * h, seg, 3)      # (3, d); the empty example gets zeros
"""

from __future__ import annotations

import torch


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (T,) example index of every jagged row."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of (T,) ``scores`` within each segment; numerically stable (max-shifted)."""
    neg_inf = torch.full((num_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    seg_max = neg_inf.scatter_reduce(0, seg, scores.detach(), reduce="amax", include_self=True)
    e = torch.exp(scores - seg_max[seg])  # (T,)
    denom = torch.zeros(num_segments, dtype=scores.dtype, device=scores.device).index_add(0, seg, e)
    return e / denom[seg]


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum (T, d) rows per segment -> (B, d); empty segments give zeros."""
    out = torch.zeros((num_segments, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, seg, values)
