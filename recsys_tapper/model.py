"""TAP-PER: user tower (TorchRec) + bridge projector + frozen causal LM with a bridge LoRA.

    users KJT, history KJT, q ──► UserTower ──► (P_u row, pooled context c)
                                     BridgeProjector ──► prefix P = P_u + P_q   (B, L, d)
    prompt tokens ──► embed ──► [P | tokens] ──► LM (+ bridge LoRA) ──► logits

Built from already-made parts (compose, don't inherit). ``personalize=False`` runs the LM alone: that is
the non-personalized baseline on the same backbone.

Example::

    model = TapperModel(lm, tower, projector)
    out = model(batch, bank)                    # out.loss, out.logits
    probs = model.label_probs(batch, bank, label_ids)   # (B, n_labels) at the answer position
    tokens = model.generate(batch, bank, max_new_tokens=32, eos_token_id=tok.eos_token_id)  # greedy
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embeddings.tower import UserTower
from llm_bridge.generation import greedy_generate, left_pad
from llm_bridge.inject import prepend_prefix
from llm_bridge.projector import BridgeProjector
from recsys_tapper.features import Batch


@dataclass
class ModelOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L+T, V)
    prefix_len: int


class TapperModel(nn.Module):
    def __init__(self, lm: nn.Module, tower: UserTower | None, projector: BridgeProjector | None) -> None:
        super().__init__()
        self.lm = lm
        self.tower = tower
        self.projector = projector

    @property
    def personalized(self) -> bool:
        return self.tower is not None

    def prefix(self, batch: Batch, bank: torch.Tensor, record_terms: torch.Tensor | None = None) -> torch.Tensor:
        user_state, context, _ = self.tower(batch.users, batch.history, batch.q, bank, record_terms)
        return self.projector(user_state, context)  # (B, L, d)

    def forward(self, batch: Batch, bank: torch.Tensor | None = None, record_terms=None) -> ModelOutput:
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, T, d)
        prefix = self.prefix(batch, bank, record_terms) if self.personalized else None
        embeds, mask, labels = prepend_prefix(embeds, batch.attention_mask, batch.labels, prefix)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        return ModelOutput(out.loss, out.logits, 0 if prefix is None else prefix.shape[1])

    @torch.no_grad()
    def generate(self, batch: Batch, bank: torch.Tensor | None, max_new_tokens: int, eos_token_id: int,
                 record_terms=None) -> list[list[int]]:
        """Greedy answers (token ids, EOS dropped) to the batch's prompts, each led by its user's prefix."""
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, T, d)
        prefix = self.prefix(batch, bank, record_terms) if self.personalized else None  # (B, L, d)
        rows = []
        for i, last in enumerate(batch.last_prompt.tolist()):
            prompt = embeds[i, : last + 1]
            rows.append(prompt if prefix is None else torch.cat([prefix[i].to(prompt.dtype), prompt]))
        padded, mask = left_pad(rows)
        return greedy_generate(self.lm, padded, mask, max_new_tokens, eos_token_id).tokens

    @torch.no_grad()
    def label_probs(self, batch: Batch, bank: torch.Tensor | None, label_ids: list[int], record_terms=None):
        """Next-token distribution over ``label_ids`` at the answer position -> (B, n_labels)."""
        out = self.forward(batch, bank, record_terms)
        pos = batch.last_prompt + out.prefix_len  # (B,)
        logits = out.logits[torch.arange(len(pos)), pos][:, label_ids]  # (B, n_labels)
        return torch.softmax(logits.float(), dim=-1)
