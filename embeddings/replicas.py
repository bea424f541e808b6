"""Keep replicated (dense) parameters identical across ranks: average their gradients, broadcast their values.

Dense parameters of a sharded job (pooling, projector, bridge LoRA) are not wrapped in DDP: every rank holds
them in full and the training loop calls :func:`average_grads` after each backward, in one flat all-reduce.

Example::

    broadcast_parameters(params)      # once, before training: every rank starts from rank 0's values
    loss.backward()
    average_grads(params)             # each p.grad is now the mean over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def average_grads(params: list[nn.Parameter], pg: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of replicated parameters over ranks, in one flat buffer (a missing grad is 0)."""
    world = dist.get_world_size(pg)
    if world == 1 or not params:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=pg)
    flat.div_(world)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def broadcast_parameters(params: list[torch.Tensor], src: int = 0, pg: dist.ProcessGroup | None = None) -> None:
    """Make replicated parameters bit-identical to rank ``src``'s."""
    if dist.get_world_size(pg) == 1 or not params:
        return
    with torch.no_grad():
        flat = torch._utils._flatten_dense_tensors([p.data for p in params])
        dist.broadcast(flat, src=src, group=pg)
        for p, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.data for p in params]), strict=True):
            p.data.copy_(synced)
