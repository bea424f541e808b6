"""The user tower: a plain TorchRec-style module from KJTs to user state and pooled history.

It holds the sharded-able parts only (the P_u table and the time-aware pooling); the frozen LLM stays
outside, so DistributedModelParallel can wrap this module alone. It can sit inside any TorchRec model:
inputs are KJTs and dense query vectors, outputs are dense tensors.

Example::

    tower = UserTower(UserStateTable(UserStateConfig(943, 8 * 576)),
                      TimeAwarePooling(TimeAwarePoolingConfig(), d=576))
    user_state, context, alpha = tower(user_kjt, history_kjt, q, bank)   # (B, L*d), (B, d), (T,)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.pooling import TimeAwarePooling
from embeddings.user_state import UserStateTable


class UserTower(nn.Module):
    def __init__(self, table: UserStateTable, pooling: TimeAwarePooling) -> None:
        super().__init__()
        self.table = table
        self.pooling = pooling

    def forward(
        self,
        users: KeyedJaggedTensor,
        history: KeyedJaggedTensor,
        q: torch.Tensor,
        bank: torch.Tensor,
        record_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        user_state = self.table(users)  # (B, dim)
        # Without autograd (serving, evaluation) the pooling takes its inference fast path: same function.
        pool = self.pooling if torch.is_grad_enabled() else self.pooling.infer
        context, alpha = pool(q, history, bank, record_terms)  # (B, d), (T,)
        return user_state, context, alpha
