"""The user tower: a plain TorchRec-style module from jagged features to user state and pooled history.

It holds the sharded-able parts (the P_u table and the time-aware pooling) and owns the record bank its
history ids index, with the bank's cached record terms; the frozen LLM stays outside, so
DistributedModelParallel can wrap this module alone. It can sit inside any TorchRec model: inputs are the
``user_id`` KJT, a ``History`` (record ids in a KJT, day gaps in a JaggedTensor beside it) and dense query
vectors; outputs are dense tensors. DMP's input dist only touches ``users`` (the sharded table).

Example::

    tower = UserTower(UserStateTable(UserStateConfig(943, 8 * 576)),
                      TimeAwarePooling(TimeAwarePoolingConfig(), d=576), bank)
    user_state, context, alpha = tower(user_kjt, history, q)   # (B, L*d), (B, d), (T,)
    tower(user_kjt, history, q, extra)   # history ids >= len(bank) index ``extra`` (records the bank lacks)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.history import History
from embeddings.pooling import TimeAwarePooling
from embeddings.record_bank import RecordBank
from embeddings.user_state import UserStateTable


class UserTower(nn.Module):
    def __init__(self, table: UserStateTable, pooling: TimeAwarePooling, bank: RecordBank | None = None) -> None:
        super().__init__()
        self.table = table
        self.pooling = pooling
        self.bank = bank  # not a parameter: frozen record vectors, appended to by the feature builder
        self._vectors: tuple[tuple, torch.Tensor] | None = None  # (key, bank vectors on a device)
        self._terms: tuple[tuple, torch.Tensor] | None = None  # (key, their record terms)

    def _vectors_key(self, device: torch.device) -> tuple:
        # The bank's tensor is replaced on every append.
        return (id(self.bank.vectors), len(self.bank), str(device))

    def _bank_key(self, device: torch.device) -> tuple:
        # ... and a scorer step bumps its parameters' versions, which the record terms depend on.
        return (*self._vectors_key(device), tuple(p._version for p in self.pooling.scorer.parameters()))

    def bank_vectors(self, device: torch.device | None = None) -> torch.Tensor:
        """The bank's record vectors on ``device`` (default: where the bank is) -> (R, d), moved once per bank
        version. Never computes record terms: a training step calls it, and the terms of the whole bank would be
        stale after the step's update anyway."""
        if self.bank is None:
            raise ValueError("the user tower has no record bank (UserTower(..., bank) or tower.bank = bank)")
        device = device or self.bank.vectors.device
        key = self._vectors_key(device)
        if self._vectors is None or self._vectors[0] != key:
            self._vectors = (key, self.bank.vectors.to(device))
        return self._vectors[1]

    @torch.no_grad()
    def record_terms(self, device: torch.device | None = None) -> torch.Tensor:
        """``scorer.record_term(bank)`` -> (R, d), cached until the bank grows or the scorer's weights change
        (inference only: training computes the terms of the records it reads, with gradients)."""
        vectors = self.bank_vectors(device)
        key = self._bank_key(vectors.device)
        if self._terms is None or self._terms[0] != key:
            self._terms = (key, self.pooling.scorer.record_term(vectors))
        return self._terms[1]

    def forward(
        self,
        users: KeyedJaggedTensor,
        history: History,
        q: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``extra`` (n, d): vectors of records the bank lacks (serving); history ids ``len(bank) + i`` read
        row i. -> user_state (B, D), context (B, d), alpha (T,)"""
        user_state = self.table(users)  # (B, dim)
        if torch.is_grad_enabled():
            bank = self.bank_vectors(q.device)
            if extra is not None:
                bank = torch.cat([bank, extra.to(bank)])
            context, alpha = self.pooling(q, history, bank)  # (B, d), (T,)
        else:
            # Without autograd (serving, evaluation) the pooling takes its inference fast path (same function)
            # over the cached record terms.
            bank, terms = self.bank_vectors(q.device), self.record_terms(q.device)
            if extra is not None:
                extra = extra.to(bank)
                bank = torch.cat([bank, extra])
                terms = torch.cat([terms, self.pooling.scorer.record_term(extra)])
            context, alpha = self.pooling.infer(q, history, bank, terms)
        return user_state, context, alpha
