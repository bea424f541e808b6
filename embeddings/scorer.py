"""The DIN activation unit that scores history records against a query.

``s_j = fc2(GELU(fc1([q; h_j; q - h_j; q * h_j])))`` with fc1: Linear(4d -> d), fc2: Linear(d -> 1), as in
the paper. ``reference`` runs it literally (concatenate, 4d-wide matmul per record). ``forward`` computes the
same function factorized: with fc1.weight = [A | B | C | D] (each d x d),

    fc1(x) = (A + C) q + (B - C) h + D (q * h) + b

so the query term is computed once per query, the record term once per record (and cached with the record
bank at inference), and only ``D (q * h)`` is paid per (query, record) pair: d^2 instead of 4 d^2.
With ``interaction_rank=k`` the pair term becomes low-rank, ``U (V^T (q * h))``, costing 2 d k per pair; that is
a different function (an ablation / speed option), not the paper's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DINScorer(nn.Module):
    """Scores (T, d) records against their queries.

    Args:
        d: vector width.
        interaction_rank: None for the paper's full d x d interaction, or k for a rank-k one.

    Example::

        scorer = DINScorer(576)
        s = scorer(q[seg], h)           # (T,), same as scorer.reference(q[seg], h)
    """

    def __init__(self, d: int, interaction_rank: int | None = None) -> None:
        super().__init__()
        self.d = d
        self.interaction_rank = interaction_rank
        self.fc1 = nn.Linear(4 * d, d)
        self.fc2 = nn.Linear(d, 1)
        if interaction_rank is not None:
            self.inter_v = nn.Linear(d, interaction_rank, bias=False)
            self.inter_u = nn.Linear(interaction_rank, d, bias=False)

    def reference(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The paper's literal computation. q, h: (T, d) -> (T,)."""
        if self.interaction_rank is not None:
            raise ValueError("reference() is the full-rank paper scorer; this scorer is low-rank")
        x = torch.cat([q, h, q - h, q * h], dim=-1)  # (T, 4d)
        return self.fc2(F.gelu(self.fc1(x))).squeeze(-1)

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fc1.weight.split(self.d, dim=1)  # A, B, C, D: each (d, d)

    def query_term(self, q: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, d): (A + C) q."""
        a, _, c, _ = self._blocks()
        return q @ (a + c).T

    def record_term(self, h: torch.Tensor) -> torch.Tensor:
        """(R, d) -> (R, d): (B - C) h + b. Depends on weights only: cacheable per record."""
        _, b, c, _ = self._blocks()
        return h @ (b - c).T + self.fc1.bias

    def pair_term(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(T, d) x (T, d) -> (T, d): D (q * h), or its low-rank version."""
        qh = q * h
        if self.interaction_rank is not None:
            return self.inter_u(self.inter_v(qh))
        return qh @ self._blocks()[3].T

    def combine(self, query_term: torch.Tensor, record_term: torch.Tensor, pair_term: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(query_term + record_term + pair_term)).squeeze(-1)

    def forward(self, q: torch.Tensor, h: torch.Tensor, record_term: torch.Tensor | None = None) -> torch.Tensor:
        """q, h: (T, d) aligned rows -> scores (T,). ``record_term`` (T, d) may come from a cache."""
        rt = self.record_term(h) if record_term is None else record_term
        return self.combine(self.query_term(q), rt, self.pair_term(q, h))
