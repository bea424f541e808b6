"""Record and query vectors: mean-pooled frozen input embeddings (no transformer layers run).

Example::

    enc = TextEncoder(model, tokenizer, max_tokens=128)
    h = enc.encode(["Toy Story (1995) rating: 4", "Heat (1995) rating: 2"])   # (2, d)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


class TextEncoder:
    def __init__(self, model, tokenizer, max_tokens: int = 128) -> None:
        self.embed = model.get_input_embeddings()
        self.tok = tokenizer
        self.max_tokens = max_tokens
        self.n_truncated = 0

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 512, progress: bool = False) -> torch.Tensor:
        """(N texts) -> (N, d) float32; each text is truncated to ``max_tokens`` tokens (counted)."""
        out = []
        it = range(0, len(texts), batch_size)
        for i in tqdm(it, desc="encode records", disable=not progress, leave=False):
            chunk = list(texts[i : i + batch_size])
            ids = self.tok(chunk, add_special_tokens=False)["input_ids"]
            self.n_truncated += sum(len(x) > self.max_tokens for x in ids)
            ids = [x[: self.max_tokens] or [self.tok.eos_token_id] for x in ids]
            lens = torch.tensor([len(x) for x in ids])
            pad = torch.zeros(len(ids), int(lens.max()), dtype=torch.long)
            for j, x in enumerate(ids):
                pad[j, : len(x)] = torch.tensor(x)
            mask = (torch.arange(pad.shape[1])[None, :] < lens[:, None]).float()  # (n, T)
            e = self.embed(pad).float()  # (n, T, d)
            out.append((e * mask[..., None]).sum(1) / lens[:, None])  # (n, d)
        d = self.embed.weight.shape[1]
        return torch.cat(out) if out else torch.zeros(0, d)
