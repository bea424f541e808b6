"""Prepend L soft tokens to a right-padded batch at the input-embedding level.

    inputs_embeds  [P_1 .. P_L | t_1 .. t_n | pad ..]
    attention_mask [1  ..  1   | 1   ..  1  | 0   ..]
    labels         [-100 .. -100 | labels of t | -100]

Example::

    embeds, mask, labels = prepend_prefix(model.get_input_embeddings()(ids), mask, labels, prefix)
"""

from __future__ import annotations

import torch

IGNORE = -100


def prepend_prefix(
    token_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    prefix: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """token_embeds (B, T, d), attention_mask (B, T), labels (B, T) | None, prefix (B, L, d) | None."""
    if prefix is None:
        return token_embeds, attention_mask, labels
    b, n_slots, _ = prefix.shape
    if prefix.shape[0] != token_embeds.shape[0] or prefix.shape[2] != token_embeds.shape[2]:
        raise ValueError(f"prefix {tuple(prefix.shape)} does not fit token embeddings {tuple(token_embeds.shape)}")
    embeds = torch.cat([prefix.to(token_embeds.dtype), token_embeds], dim=1)  # (B, L+T, d)
    ones = torch.ones(b, n_slots, dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)  # (B, L+T)
    if labels is not None:
        ignore = torch.full((b, n_slots), IGNORE, dtype=labels.dtype, device=labels.device)
        labels = torch.cat([ignore, labels], dim=1)  # (B, L+T)
    return embeds, mask, labels
