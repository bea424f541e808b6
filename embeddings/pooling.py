"""Time-aware attention pooling over a user's jagged history (the paper's P_q context).

For every example b with history records j (jagged, no padding):

    s_j = DIN(q_b, h_j) - lambda_t * log(1 + dt_j) - lambda_o * log(1 + dpos_j)  [- lambda_w * softplus(dpos_j - w)]
          [+ beta * cos(q_b - mu_q, h_j - mu_h)]
    alpha = softmax_j(s)          c_b = sum_j alpha_j h_j

The first bracket is the soft recency window, off by default (``window``): a learned width w (records, started at
``window``) and strength lambda_w. Inside the window the penalty is near 0; past it, it grows linearly. The paper's
lambda_o * log(1 + dpos) is a heavy-tailed power law: it cannot keep the last few records level and drop the older
ones, which is what reads a recent drift best (``benchmarks/drift_tagging_readers.py``: recent_k). The window is
part of the order bias, so ``order_bias=False`` (``tapper_no_time``) drops it with lambda_o. With
``learn_window=False`` the width and lambda_w stay where they start (a setting, not a learned scalar).

The bracketed content term is off by default (the paper's score). With ``content_beta`` set it adds a learned
beta (started at ``content_beta``) times the cosine of the centered query and record vectors: attention to the
records that resemble the question needs no learning, which the DIN does not find in a few epochs when the
vectors are plain means (``benchmarks/drift_rating_probe.py``). ``mu_q``, ``mu_h`` are buffers set once from
the training questions and the record bank (:meth:`TimeAwarePooling.set_centers`) and saved with the tower.

History arrives as a ``History`` (``embeddings.history``): record ids in a KeyedJaggedTensor with one key and no
weights, day gaps beside them in a JaggedTensor with the same lengths; the order gap comes from the lengths:

    feature          example 0       example 1   example 2
    ids["history"]   [r3, r7]        []          [r1, r2, r9]      bank rows
    dt               [3.0, 0.5]      []          [0.0, 2.0, 1.0]   days between query and record
    order gap        [2, 1]          []          [3, 2, 1]         from lengths, most recent = 1

Example::

    pool = TimeAwarePooling(TimeAwarePoolingConfig(), d=576)
    c, alpha = pool(q, history, bank)      # c: (B, d), alpha: (T,)

    cache = pool.scorer.record_term(bank).detach()   # once per bank while the scorer is frozen
    c, alpha = pool.infer(q, history, bank, cache)   # same c, inference fast path
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from embeddings.history import History, order_gaps
from embeddings.jagged import segment_ids, segment_softmax, segment_sum, softmax_pool
from embeddings.scorer import DINScorer


@dataclass
class TimeAwarePoolingConfig:
    """Args:
    time_bias: learn and apply lambda_t * log(1 + days).
    order_bias: learn and apply lambda_o * log(1 + position gap).
    interaction_rank: None = the paper's full DIN scorer; k = a rank-k pair interaction.
    content_beta: None = the paper's score; b = add beta * cos(q - mu_q, h - mu_h) with a learned beta from b.
    window: None = the paper's order penalty; w = also subtract lambda_w * softplus(dpos - width), with the
        width learned from w records and lambda_w from ``WINDOW_LAMBDA_START``. Applied only with order_bias.
    learn_window: False = the window's width and lambda_w stay at their start (w, ``WINDOW_LAMBDA_START``):
        neither the data prior (``recsys_tapper.recency_prior``) nor Stage 2 moves them; lambda_t, lambda_o still
        learn. The width is then a setting, chosen on validation queries.
    """

    time_bias: bool = True
    order_bias: bool = True
    interaction_rank: int | None = None
    content_beta: float | None = None
    window: float | None = None
    learn_window: bool = True


WINDOW_LAMBDA_START = 1.0  # lambda_w's start: a record 5 places past the window scores ~5 below one inside it


def _rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]``; a view (no copy) when, on CPU, the ids are one ascending run (a user's records are
    appended to the bank together, so a whole history often is)."""
    t = ids.numel()
    if ids.device.type == "cpu" and t > 1:
        first = int(ids[0])
        last = int(ids[-1])
        if 0 <= first and last < table.shape[0] and last - first == t - 1 and bool((ids.diff() == 1).all()):
            return table[first : first + t]
    return table.index_select(0, ids)


class TimeAwarePooling(nn.Module):
    def __init__(self, cfg: TimeAwarePoolingConfig, d: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.scorer = DINScorer(d, cfg.interaction_rank)
        # Learned, shared, unconstrained scalars, N(0, 0.02) as in the paper.
        self.lambda_t = nn.Parameter(torch.randn(()) * 0.02)
        self.lambda_o = nn.Parameter(torch.randn(()) * 0.02)
        if cfg.content_beta is not None:  # only then: the paper's tower keeps its state-dict names
            self.beta = nn.Parameter(torch.tensor(float(cfg.content_beta)))
            self.register_buffer("query_center", torch.zeros(d))  # mu_q (d,)
            self.register_buffer("record_center", torch.zeros(d))  # mu_h (d,)
        if self.windowed:  # only then, as beta
            self.window_lambda = nn.Parameter(torch.tensor(WINDOW_LAMBDA_START))
            self.window_width = nn.Parameter(torch.tensor(float(cfg.window)))
            if not cfg.learn_window:  # a fixed window: the optimizer finds no gradient on them
                self.window_lambda.requires_grad_(False)
                self.window_width.requires_grad_(False)

    @property
    def windowed(self) -> bool:
        """Whether the soft recency window applies (``window`` set and the order bias on)."""
        return self.cfg.window is not None and self.cfg.order_bias

    def recency_parameters(self) -> list[nn.Parameter]:
        """The recency prior's scalars: lambda_t, lambda_o and, when windowed, lambda_w and the width."""
        return [self.lambda_t, self.lambda_o, *([self.window_lambda, self.window_width] if self.windowed else [])]

    @torch.no_grad()
    def set_centers(self, queries: torch.Tensor, records: torch.Tensor) -> None:
        """mu_q, mu_h of the content term: the means of (n, d) question vectors and (R, d) record vectors."""
        self.query_center.copy_(queries.float().mean(0))
        self.record_center.copy_(records.float().mean(0))

    def content(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """(T,) beta * cos(q - mu_q, h - mu_h) for (T, d) per-record queries and records; None when off."""
        if self.cfg.content_beta is None:
            return None
        return self.beta * F.cosine_similarity(q.float() - self.query_center, h.float() - self.record_center, dim=-1)

    def time_penalty(self, dt: torch.Tensor) -> torch.Tensor:
        """lambda_t * log(1 + days), zeros while the time bias is off; any shape."""
        return self.lambda_t * torch.log1p(dt.clamp_min(0)) if self.cfg.time_bias else torch.zeros_like(dt)

    def order_penalty(self, dpos: torch.Tensor) -> torch.Tensor:
        """lambda_o * log(1 + dpos) [+ lambda_w * softplus(dpos - w)], zeros while the order bias is off."""
        if not self.cfg.order_bias:
            return torch.zeros_like(dpos)
        out = self.lambda_o * torch.log1p(dpos.clamp_min(0))
        if self.windowed:
            out = out + self.window_lambda * F.softplus(dpos - self.window_width)
        return out

    def bias(self, dt: torch.Tensor, dpos: torch.Tensor) -> torch.Tensor:
        """(T,) temporal penalty subtracted from the scores."""
        return self.time_penalty(dt) + self.order_penalty(dpos)

    def forward(
        self,
        q: torch.Tensor,
        history: History,
        bank: torch.Tensor,
        record_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool the history of each example.

        Args:
            q: (B, d) query vectors.
            history: ``History``: record ids (KJT, key ``history``) and day gaps (JaggedTensor) of B examples.
            bank: (R, d) record vectors; record ids index its rows.
            record_terms: optional (R, d) cache of ``scorer.record_term(bank)`` (valid while the scorer is frozen).

        Returns:
            c: (B, d) pooled context, zeros for an empty history; alpha: (T,) attention weights.
        """
        ids = history.record_ids()  # (T,)
        num = q.shape[0]
        seg = segment_ids(history.lengths())  # (T,)
        h = bank[ids]  # (T, d)
        if record_terms is None:
            uniq, inv = torch.unique(ids, return_inverse=True)  # records shared across examples: once each
            rt = self.scorer.record_term(bank[uniq])[inv]  # (T, d)
        else:
            rt = record_terms[ids]
        qt = self.scorer.query_term(q)[seg]  # (T, d): d^2 per query, not per record
        s = self.scorer.combine(qt, rt, self.scorer.pair_term(q[seg], h))  # (T,)
        s = s - self.bias(history.dt.values(), history.order_gaps())
        cs = self.content(q[seg], h)
        if cs is not None:
            s = s + cs
        alpha = segment_softmax(s, seg, num)  # (T,)
        c = segment_sum(alpha[:, None] * h, seg, num)  # (B, d)
        return c, alpha

    @torch.no_grad()
    def infer(
        self,
        q: torch.Tensor,
        history: History,
        bank: torch.Tensor,
        record_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference fast path of ``forward`` (same arguments and function; no autograd).

        It runs ``DINScorer.score_jagged`` (query folded into the weights for a single query; otherwise one
        fused addmm over the jagged rows) and ``softmax_pool`` (CSR segment sum on CPU). Pass the
        ``record_terms`` cache for several queries or a low-rank scorer; a single full-rank query needs none.
        q, bank and record_terms may be bf16: scores are then bf16 GEMMs, the softmax is fp32.

        Returns:
            c: (B, d) in ``bank``'s dtype; alpha: (T,) fp32.
        """
        ids = history.record_ids()  # (T,)
        lengths = history.lengths().long()  # (B,)
        h = _rows(bank, ids)  # (T, d)
        rt = None if record_terms is None else _rows(record_terms, ids)  # (T, d)
        s = self.scorer.score_jagged(q, h, lengths, rt).float()  # (T,)
        s = s - self.bias(history.dt.values().float(), order_gaps(lengths, ids.numel()))
        if self.cfg.content_beta is not None:
            s = s + self.content(q[segment_ids(lengths)], h)
        return softmax_pool(s, h, lengths)

    def reference(
        self, q: torch.Tensor, hists: list[torch.Tensor], dts: list[torch.Tensor], dposs: list[torch.Tensor]
    ) -> torch.Tensor:
        """Naive per-example loop with the literal scorer; for tests and benchmarks. Returns (B, d)."""
        out = []
        for b in range(q.shape[0]):
            h = hists[b]
            if h.shape[0] == 0:
                out.append(torch.zeros_like(q[b]))
                continue
            s = self.scorer.reference(q[b].expand_as(h), h) - self.bias(dts[b], dposs[b])
            if self.cfg.content_beta is not None:
                qc, hc = q[b] - self.query_center, h - self.record_center
                s = s + self.beta * (hc @ qc) / (hc.norm(dim=-1) * qc.norm()).clamp_min(1e-8)
            out.append(torch.softmax(s, 0) @ h)
        return torch.stack(out)
