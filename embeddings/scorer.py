"""The DIN activation unit that scores history records against a query.

``s_j = fc2(GELU(fc1([q; h_j; q - h_j; q * h_j])))`` with fc1: Linear(4d -> d), fc2: Linear(d -> 1), as in
the paper. ``reference`` runs it literally (concatenate, 4d-wide matmul per record). ``forward`` computes the
same function factorized: with fc1.weight = [A | B | C | D] (each d x d),

    fc1(x) = (A + C) q + (B - C) h + D (q * h) + b

so the query term is computed once per query, the record term once per record (and cached with the record
bank at inference), and only ``D (q * h)`` is paid per (query, record) pair: d^2 instead of 4 d^2.
With ``interaction_rank=k`` the pair term becomes low-rank, ``U (V^T (q * h))``, costing 2 d k per pair; that is
a different function (an ablation / speed option), not the paper's.

``score_jagged`` is the inference fast path (no autograd, frozen weights) for jagged batches: one query,
many records folds the query into the weights, ``fc1(x) = (B - C + D diag(q)) h + (A + C) q + b``, so the whole
score is one (N, d) x (d, d) GEMM, GELU and a mat-vec; several queries use ``X = q[seg] * h`` and one
``addmm(record_term + query_term[seg], X, D^T)``. Its weight layout is cached per (weights version, dtype,
device) by ``inference_weights``, so an optimizer step (which bumps the parameters' versions) invalidates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class InferenceWeights:
    """fc1/fc2 of a DINScorer laid out for inference (one dtype and device). fc1.weight = [A | B | C | D].

    qc: (d, d) (A + C)^T, so ``q @ qc`` is the query term.   bmc: (d, d) B - C.   dmat: (d, d) D.
    b1: (d,) fc1 bias.   w2: (d,) fc2 weight.   b2: () fc2 bias.
    v: (k, d) and u_t: (k, d) = U^T for a rank-k interaction, else None.
    """

    qc: torch.Tensor
    bmc: torch.Tensor
    dmat: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    v: torch.Tensor | None
    u_t: torch.Tensor | None


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

    # ---- inference fast path (no autograd; valid for the weights' current version) ----

    def inference_weights(self, dtype: torch.dtype, device: torch.device) -> InferenceWeights:
        """The weight layout ``score_jagged`` uses, built once per (weights version, dtype, device)."""
        params = tuple(self.parameters())
        version = tuple((p.data_ptr(), p._version) for p in params)
        key = (dtype, torch.device(device))
        cache = self.__dict__.setdefault("_infer_cache", {})  # {(dtype, device): (version, weights)}
        hit = cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        with torch.no_grad():
            a, b, c, dm = (w.to(device=device, dtype=dtype) for w in self._blocks())
            low = self.interaction_rank is not None
            w = InferenceWeights(
                qc=(a + c).T.contiguous(),
                bmc=(b - c).contiguous(),
                dmat=dm.contiguous(),
                b1=self.fc1.bias.to(device=device, dtype=dtype),
                w2=self.fc2.weight.reshape(-1).to(device=device, dtype=dtype),
                b2=self.fc2.bias.reshape(()).to(device=device, dtype=dtype),
                v=self.inter_v.weight.to(device=device, dtype=dtype).contiguous() if low else None,
                u_t=self.inter_u.weight.T.to(device=device, dtype=dtype).contiguous() if low else None,
            )
        for k in [k for k, val in cache.items() if val[0] != version]:
            del cache[k]  # stale layouts of older weights
        cache[key] = (version, w)
        return w

    @torch.no_grad()
    def score_jagged(
        self,
        q: torch.Tensor,
        h: torch.Tensor,
        lengths: torch.Tensor,
        record_term: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference scores for a jagged batch; equals ``forward(q[seg], h)`` (no autograd).

        Args:
            q: (B, d) queries.
            h: (T, d) records, example b owning the next ``lengths[b]`` rows (jagged, no padding).
            lengths: (B,) records per example.
            record_term: optional (T, d) rows of the ``record_term(bank)`` cache, aligned with ``h``.

        Returns:
            (T,) scores in ``h``'s dtype.

        Example::

            s = scorer.score_jagged(q, bank[ids], lengths, cache[ids])   # == scorer(q[seg], bank[ids])
        """
        w = self.inference_weights(h.dtype, h.device)
        n_q, t, d = q.shape[0], h.shape[0], self.d
        q = q.to(h.dtype)
        if t == 0:
            return h.new_zeros(0)
        low = self.interaction_rank is not None
        if n_q == 1 and not low and (record_term is None or t >= d):
            # One query, full rank: fold q into the weights; no record term needed, one GEMM.
            m = torch.addcmul(w.bmc, w.dmat, q)  # (d, d): B - C + D diag(q)
            base = torch.addmv(w.b1, w.qc.T, q[0])  # (d,): (A + C) q + b
            pre = torch.addmm(base, h, m.T)  # (T, d): d^2 per record
        else:
            if record_term is None:
                record_term = torch.addmm(w.b1, h, w.bmc.T)  # (T, d), includes b
            qt = q @ w.qc  # (B, d): (A + C) q, once per query
            if n_q == 1 and low:
                # One query, rank k: q folded into V, the query term into the up-projection (ones column).
                z = torch.cat([h @ (w.v * q).T, h.new_ones(t, 1)], 1)  # (T, k + 1)
                pre = torch.addmm(record_term, z, torch.cat([w.u_t, qt], 0))  # (T, d): 2 d k per record
            else:
                rep = torch.cat([q, qt], 1).repeat_interleave(lengths, dim=0, output_size=t)  # (T, 2d)
                x = h * rep[:, :d]  # (T, d): q * h
                pre = record_term + rep[:, d:]  # (T, d)
                if low:
                    pre.addmm_(x @ w.v.T, w.u_t)  # U (V^T (q * h)): 2 d k per pair
                else:
                    pre.addmm_(x, w.dmat.T)  # D (q * h): d^2 per pair
        pre = torch.ops.aten.gelu_(pre)
        return torch.addmv(w.b2, pre, w.w2)  # (T,)
