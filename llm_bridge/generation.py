"""Greedy decoding from input embeddings (so a soft-token prefix can lead the prompt), with a KV cache.

Rows are LEFT-padded for generation: ``[pad .. | prefix | prompt]``; position ids follow the attention mask, so
padding does not shift positions.

Example::

    embeds, mask = left_pad([prefix_and_prompt_embeds_1, ...])
    out = greedy_generate(lm, embeds, mask, max_new_tokens=16, eos_token_id=tok.eos_token_id)
    out.tokens          # list of generated id lists, EOS excluded
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: list[list[int]]
    first_token_s: float  # prefill + first token
    total_s: float


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, d) embeddings -> (B, T, d) left-padded embeddings and (B, T) mask."""
    t = max(r.shape[0] for r in rows)
    d = rows[0].shape[1]
    embeds = rows[0].new_zeros(len(rows), t, d)
    mask = torch.zeros(len(rows), t, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        embeds[i, t - r.shape[0] :] = r
        mask[i, t - r.shape[0] :] = 1
    return embeds, mask


@torch.no_grad()
def greedy_generate(lm, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_token_id: int) -> Generation:
    t0 = time.perf_counter()
    b = embeds.shape[0]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    past = out.cache
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    first = time.perf_counter() - t0
    tokens: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        for i in range(b):
            if not done[i]:
                if int(nxt[i]) == eos_token_id:
                    done[i] = True
                else:
                    tokens[i].append(int(nxt[i]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=past, use_cache=True)
        past = out.cache
        nxt = out.logits[:, -1].argmax(-1)
    return Generation(tokens, first, time.perf_counter() - t0)
