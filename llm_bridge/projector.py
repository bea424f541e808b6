"""The bridge projector: user state and pooled history -> L prefix slots of width d.

    P_u = reshape(user_up(u), (L, d))       user_up is the identity when the row is already L*d wide
    P_q = reshape(W c + b, (L, d))          one linear layer, as in the authors' code
                                            (c standardized first with ``standardize_context``)
    P   = P_u + P_q                         (B, L, d)

Example::

    proj = BridgeProjector(BridgeProjectorConfig(slots=8), d=576, user_dim=8 * 576)
    prefix = proj(user_state, context)      # (B, 8, 576)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BridgeProjectorConfig:
    """Args:
    slots: L, the number of soft tokens.
    use_user_state: include P_u (False = the ``pq_only`` ablation).
    use_history: include P_q (False = the ``pu_only`` ablation).
    init_std: projection weights start from N(0, init_std).
    standardize_context: feed P_q's projection (c - mean) / std, per dimension, with mean and std of the
        training examples' histories (fixed buffers, saved with the model; see ``fit_context``). The pooled
        context of different users differs by little against its common part; this puts that difference at
        unit scale. False = the paper's W c + b.
    """

    slots: int = 8
    use_user_state: bool = True
    use_history: bool = True
    init_std: float = 0.02
    standardize_context: bool = False


class BridgeProjector(nn.Module):
    def __init__(self, cfg: BridgeProjectorConfig, d: int, user_dim: int) -> None:
        super().__init__()
        if not (cfg.use_user_state or cfg.use_history):
            raise ValueError("the prefix needs at least one of use_user_state / use_history")
        self.cfg, self.d, self.slots = cfg, d, cfg.slots
        full = cfg.slots * d
        self.user_up = nn.Identity() if user_dim == full else nn.Linear(user_dim, full)
        self.history_proj = nn.Linear(d, full)
        for lin in [m for m in (self.user_up, self.history_proj) if isinstance(m, nn.Linear)]:
            nn.init.normal_(lin.weight, std=cfg.init_std)
            nn.init.normal_(lin.bias, std=cfg.init_std)
        if cfg.standardize_context:
            self.register_buffer("context_mean", torch.zeros(d))
            self.register_buffer("context_std", torch.ones(d))

    @torch.no_grad()
    def fit_context(self, contexts: torch.Tensor) -> None:
        """Set the standardizer from (N, d) example contexts (e.g. each training history's mean record)."""
        if not self.cfg.standardize_context:
            raise ValueError("fit_context needs standardize_context=True")
        if contexts.ndim != 2 or contexts.shape[1] != self.d or contexts.shape[0] < 2:
            raise ValueError(f"expected (N>=2, {self.d}) contexts, got {tuple(contexts.shape)}")
        self.context_mean.copy_(contexts.mean(0))
        self.context_std.copy_(contexts.std(0).clamp_min(1e-6))

    def forward(self, user_state: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """user_state (B, user_dim), context (B, d) -> prefix (B, L, d)."""
        b = context.shape[0]
        prefix = torch.zeros(b, self.slots * self.d, dtype=context.dtype, device=context.device)
        if self.cfg.use_user_state:
            prefix = prefix + self.user_up(user_state)
        if self.cfg.use_history:
            if self.cfg.standardize_context:
                context = (context - self.context_mean) / self.context_std
            prefix = prefix + self.history_proj(context)
        return prefix.view(b, self.slots, self.d)  # (B, L, d)
