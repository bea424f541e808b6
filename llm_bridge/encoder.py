"""Record and query vectors: mean-pooled frozen input embeddings (no transformer layers run).

The paper's vector is the plain mean over a text's tokens. ``token_weights`` makes it a weighted mean
(Σ w_t e_t / Σ w_t); :func:`sif_weights` gives the smooth-inverse-frequency weights a / (a + p(t)) of Arora et
al. (2017), which let a text's rare, content-bearing tokens outweigh the template words every text shares.

Example::

    enc = TextEncoder(model, tokenizer, max_tokens=128)
    h = enc.encode(["Toy Story (1995) rating: 4", "Heat (1995) rating: 2"])   # (2, d)
    sif = TextEncoder(model, tokenizer, token_weights=sif_weights(tokenizer, corpus, model.config.vocab_size))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def sif_weights(tokenizer, texts: Sequence[str], vocab_size: int, a: float = 1e-3) -> torch.Tensor:
    """(vocab_size,) smooth-inverse-frequency weights a / (a + p(t)), p(t) = token t's share of all tokens of
    ``texts``; tokens that never occur get weight 1 (the most a weight can be)."""
    counts: Counter[int] = Counter()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    w = torch.ones(vocab_size)
    total = sum(counts.values())
    if total:
        ids = torch.tensor(list(counts))
        w[ids] = a / (a + torch.tensor(list(counts.values()), dtype=torch.float) / total)
    return w


class TextEncoder:
    def __init__(self, model, tokenizer, max_tokens: int = 128, token_weights: torch.Tensor | None = None) -> None:
        self.embed = model.get_input_embeddings()
        self.tok = tokenizer
        self.max_tokens = max_tokens
        self.n_truncated = 0
        self.token_weights = token_weights  # (vocab,) or None: the plain mean

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
            if self.token_weights is not None:
                mask = mask * self.token_weights[pad]
            e = self.embed(pad).float()  # (n, T, d)
            out.append((e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-12))  # (n, d)
        d = self.embed.weight.shape[1]
        return torch.cat(out) if out else torch.zeros(0, d)
