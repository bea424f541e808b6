"""Pure-torch jagged ops: segment softmax and segment sums without padding.

These run on any device (the GPU image has no fbgemm). A jagged batch is ``values`` of shape
(T, ...) plus ``lengths`` (B,); ``segment_ids`` maps each of the T rows to its example.

Example::

    lengths = torch.tensor([2, 0, 3])
    seg = segment_ids(lengths)                   # tensor([0, 0, 2, 2, 2])
    a = segment_softmax(scores, seg, 3)          # sums to 1 within each non-empty example
    c = segment_sum(a[:, None] * h, seg, 3)      # (3, d); the empty example gets zeros
    c, a = softmax_pool(scores, h, lengths)      # the same two steps, inference fast path
"""

from __future__ import annotations

import warnings

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


def segment_weighted_sum(weights: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``segment_sum(weights[:, None] * values, seg, B)`` without the (T, d) temporary, for inference.

    On CPU (fp32/fp64) it is one sparse-CSR x dense product (rows = examples); elsewhere a fp32-accumulated
    ``index_add_``. weights: (T,), values: (T, d), lengths: (B,) -> (B, d) in ``values``' dtype.
    """
    num, t = lengths.numel(), values.shape[0]
    if num == 1:
        return (weights.to(values.dtype) @ values)[None]  # (1, d)
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        crow = torch.zeros(num + 1, dtype=torch.long)
        crow[1:] = lengths.cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            m = torch.sparse_csr_tensor(
                crow, torch.arange(t), weights.to(values.dtype), (num, t), check_invariants=False
            )
            return m @ values  # (B, d)
    seg = torch.repeat_interleave(torch.arange(num, device=lengths.device), lengths, output_size=t)
    acc = torch.zeros(num, values.shape[1], dtype=torch.float32, device=values.device)
    acc.index_add_(0, seg, weights.float()[:, None] * values.float())
    return acc.to(values.dtype)


def softmax_pool(
    scores: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling over a jagged batch (inference fast path): alpha = segment softmax of ``scores``
    (computed in fp32), c = sum_j alpha_j values_j per example.

    Args:
        scores: (T,) scores.   values: (T, d) rows.   lengths: (B,) rows per example.

    Returns:
        c: (B, d) in ``values``' dtype, zeros for an empty example; alpha: (T,) fp32.
    """
    num, t = lengths.numel(), scores.shape[0]
    s = scores.float()
    if num == 1:
        alpha = torch.softmax(s, 0) if t else s
    else:
        seg = torch.repeat_interleave(torch.arange(num, device=lengths.device), lengths, output_size=t)
        alpha = segment_softmax(s, seg, num)
    if t == 0:
        return values.new_zeros(num, values.shape[1]), alpha
    return segment_weighted_sum(alpha, values, lengths), alpha
