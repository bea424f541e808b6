"""The user tower: a plain TorchRec-style module from jagged features to user state and pooled history.

It holds the sharded-able parts only (the P_u table and the time-aware pooling); the frozen LLM stays
outside, so DistributedModelParallel can wrap this module alone. It can sit inside any TorchRec model:
inputs are the ``user_id`` KJT, a ``History`` (record ids in a KJT, day gaps in a JaggedTensor beside it) and
dense query vectors; outputs are dense tensors. DMP's input dist only touches ``users`` (the sharded table).

Example::

    tower = UserTower(UserStateTable(UserStateConfig(943, 8 * 576)),
                      TimeAwarePooling(TimeAwarePoolingConfig(), d=576))
    user_state, context, alpha = tower(user_kjt, history, q, bank)   # (B, L*d), (B, d), (T,)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.history import History
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
        history: History,
        q: torch.Tensor,
        bank: torch.Tensor,
        record_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        user_state = self.table(users)  # (B, dim)
        # Without autograd (serving, evaluation) the pooling takes its inference fast path: same function.
        pool = self.pooling if torch.is_grad_enabled() else self.pooling.infer
        context, alpha = pool(q, history, bank, record_terms)  # (B, d), (T,)
        return user_state, context, alpha
