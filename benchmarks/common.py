"""Shared pieces of the benchmarks: the dense reference, interleaved timing, and the JSON writer.

Pure torch (no torchrec, no fbgemm): ``gpu_pq.py`` imports it on a machine that has only torch.

- ``bucketed_reference_context`` / ``pad_buckets``: the same literal scorer on length-sorted buckets, each padded
  to its own longest (the baseline a careful user writes).
- ``dense_reference_pq`` is the paper's design, dense and padded: [q; h; q-h; q*h] for every (padded) slot
  (B, N, 4d) -> Linear(4d->d) -> GELU -> Linear(d->1) -> minus temporal biases -> masked softmax ->
  weighted sum -> Linear(d -> L*d).
- ``interleave`` times several callables in one process, round-robin, repeated trials, so a noisy shared
  machine slows every side alike; speedups are medians of per-trial ratios.
- ``write_section`` merges one section into a results JSON by key (file-locked, atomic replace), so
  benchmarks written by others survive.

Example::

    times = interleave({"ref": ref_fn, "ours": ours_fn}, trials=7)
    pair = speedup_pair(times, "ref", "ours", rel_err=rel_err(ours_out, ref_out))
    write_section("benchmarks/results/perf.json", "pq_latency", {"meta": run_meta(), "pairs": {...}})
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "perf.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embeddings.scorer import DINScorer
from recsys_tapper.runmeta import run_meta as _project_run_meta

# ---------------------------------------------------------------- reference (the paper's design)


def temporal_bias(lam_t, lam_o, dt: torch.Tensor, dpos: torch.Tensor) -> torch.Tensor:
    """lambda_t * log(1 + dt) + lambda_o * log(1 + dpos), fp32, any shape (``TimeAwarePooling.bias``)."""
    return lam_t * torch.log1p(dt.float().clamp_min(0)) + lam_o * torch.log1p(dpos.float().clamp_min(0))


def dense_reference_context(
    scorer, lam_t, lam_o, q, hp, mask, dt, dpos, chunk: int | None = None, score_fn=None
) -> torch.Tensor:
    """Pooled context c (B, d), dense and padded, with the literal DIN scorer by default.

    Args:
        scorer: a ``DINScorer``; q: (B, d); hp: (B, N, d) padded records; mask: (B, N) bool, True = real;
        dt, dpos: (B, N) gaps; chunk: examples per slice (bounds the (chunk, N, 4d) temporary; same FLOPs);
        score_fn: (q (b, d), h (b, N, d), rows: slice of the batch) -> (b, N) scores; default
            ``scorer.reference`` on [q; h; q-h; q*h] (the paper's concat MLP).
    """
    if score_fn is None:
        score_fn = literal_scores(scorer)
    b = q.shape[0]
    chunk = chunk or b
    out = []
    for i in range(0, b, chunk):
        sl = slice(i, i + chunk)
        hs = hp[sl]
        s = score_fn(q[sl], hs, sl).float()  # (b, N)
        s = s - temporal_bias(lam_t, lam_o, dt[sl], dpos[sl])
        s = s.masked_fill(~mask[sl], float("-inf"))
        a = torch.softmax(s, -1).nan_to_num(0.0)  # (b, N); an all-padding row pools to zeros
        out.append(torch.bmm(a.to(hs.dtype)[:, None, :], hs)[:, 0])  # (b, d)
    return torch.cat(out)


def literal_scores(scorer):
    """score_fn of the paper's scorer: fc2(GELU(fc1([q; h; q-h; q*h]))) over (b, N, 4d)."""
    return lambda qs, hs, sl: scorer.reference(qs[:, None, :].expand_as(hs), hs)


def module_scores(scorer):
    """score_fn of ``scorer.forward`` (its unfused definition; the low-rank scorer's own reference)."""
    return lambda qs, hs, sl: scorer(qs[:, None, :].expand_as(hs), hs)


def padded_factorized_scores(scorer, rt_padded: torch.Tensor):
    """score_fn of the factorized scorer on padded slots: query term once per example, record terms from a
    padded cache (B, N, d), D (q * h) per slot: the same algebra as the jagged path, with padding."""
    return lambda qs, hs, sl: scorer.combine(
        scorer.query_term(qs)[:, None, :], rt_padded[sl], scorer.pair_term(qs[:, None, :], hs)
    )


def dense_reference_pq(scorer, lam_t, lam_o, proj, q, hp, mask, dt, dpos, slots: int, **kw) -> torch.Tensor:
    """P_q (B, L, d) of the paper's design: ``dense_reference_context`` then Linear(d -> L*d)."""
    c = dense_reference_context(scorer, lam_t, lam_o, q, hp, mask, dt, dpos, **kw)
    return proj(c).view(q.shape[0], slots, -1)


def pad_jagged(bank: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, *gaps: torch.Tensor):
    """Jagged (ids, gaps) -> padded (B, N_max, d) rows, (B, N_max) mask and padded gaps."""
    lens = lengths.tolist()
    b, n = len(lens), max(lens) if lens else 0
    mask = torch.arange(n)[None, :] < lengths.cpu()[:, None]  # (B, N)
    hp = bank.new_zeros(b, n, bank.shape[1])
    hp[mask.to(bank.device)] = bank.index_select(0, ids)
    padded = []
    for g in gaps:
        gp = g.new_zeros(b, n)
        gp[mask.to(g.device)] = g
        padded.append(gp)
    return (hp, mask.to(bank.device), *padded)


def length_buckets(lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Example indices sorted by length (stable), cut into consecutive groups of ``size``: the batches a careful
    user pads, each to its own longest."""
    return list(torch.argsort(lengths, stable=True).split(size))


def pad_buckets(bank: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, *gaps: torch.Tensor, size: int):
    """Jagged (ids, gaps) -> [(idx (b,), hp (b, N_bucket, d), mask (b, N_bucket), *padded gaps)], one per
    length-sorted bucket of ``size`` examples (``length_buckets``), each padded to its own longest."""
    starts = (lengths.cumsum(0) - lengths).tolist()
    out = []
    for idx in length_buckets(lengths, size):
        rows = [torch.arange(starts[i], starts[i] + int(lengths[i])) for i in idx.tolist()]
        sel = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)  # jagged rows of these examples
        out.append((idx, *pad_jagged(bank, ids[sel], lengths[idx], *(g[sel] for g in gaps))))
    return out


def bucket_slots(lengths: torch.Tensor, size: int) -> int:
    """Slots (real + padding) of length-sorted buckets of ``size``, each padded to its longest."""
    return sum(len(idx) * int(lengths[idx].max()) for idx in length_buckets(lengths, size) if len(idx))


def bucketed_reference_context(scorer, lam_t, lam_o, q, buckets, score_fn=None) -> torch.Tensor:
    """Pooled context c (B, d) from ``pad_buckets``' buckets: ``dense_reference_context`` (the literal scorer by
    default) on each bucket, written back in example order."""
    d = buckets[0][1].shape[-1]
    out = buckets[0][1].new_zeros(q.shape[0], d)  # (B, d)
    for idx, hp, mask, dt, dpos in buckets:
        out[idx] = dense_reference_context(scorer, lam_t, lam_o, q[idx], hp, mask, dt, dpos, score_fn=score_fn)
    return out


def lowrank_like(scorer: DINScorer, rank: int) -> DINScorer:
    """A rank-``rank`` scorer with the same fc1/fc2 and U V^T = the best rank-k approximation of the D block
    (randomized SVD). It is a different function from ``scorer``; this init makes the gap measurable."""
    lr = DINScorer(scorer.d, rank).to(device=scorer.fc1.weight.device, dtype=scorer.fc1.weight.dtype)
    with torch.no_grad():
        lr.fc1.load_state_dict(scorer.fc1.state_dict())
        lr.fc2.load_state_dict(scorer.fc2.state_dict())
        dm = scorer.fc1.weight[:, 3 * scorer.d :].float()  # D: (d, d)
        u, s, v = torch.svd_lowrank(dm, q=rank, niter=2)  # D ~ u diag(s) v^T
        lr.inter_u.weight.copy_(u * s)  # (d, k)
        lr.inter_v.weight.copy_(v.T)  # (k, d)
    return lr


# ---------------------------------------------------------------- inputs


def power_law_lengths(batch: int, lo: int, hi: int, alpha: float, seed: int) -> torch.Tensor:
    """(batch,) history lengths drawn with P(n) proportional to n**-alpha on lo..hi."""
    n = torch.arange(lo, hi + 1, dtype=torch.float64)
    p = n.pow(-alpha)
    g = torch.Generator().manual_seed(seed)
    return n[torch.multinomial(p / p.sum(), batch, replacement=True, generator=g)].long()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (fp32): a relative error that does not blow up at entries near 0."""
    ours, ref = ours.detach().float(), ref.detach().float()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- timing


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], n: int, device=None) -> float:
    """Mean ms of ``n`` back-to-back calls; CUDA events and a synchronize on GPU."""
    if device is not None and torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def interleave(
    fns: dict[str, Callable[[], object]],
    trials: int,
    block_ms: float = 150.0,
    warmup: int = 1,
    device=None,
    max_inner: int = 200,
) -> dict[str, dict]:
    """Round-robin timing: every trial times each callable once (order rotated each trial).

    Each callable is warmed up, then calibrated to ``inner`` back-to-back calls per trial (about
    ``block_ms``, at least 1). Returns {name: {"ms": [per-trial mean ms], "inner": inner}}.
    """
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        one = time_ms(fn, 1, device)
        inner[name] = max(1, min(max_inner, int(block_ms / max(one, 1e-3))))
    out = {name: {"ms": [], "inner": inner[name]} for name in fns}
    names = list(fns)
    for t in range(trials):
        order = names[t % len(names) :] + names[: t % len(names)]
        for name in order:
            out[name]["ms"].append(time_ms(fns[name], inner[name], device))
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def speedup_pair(times: dict, ref: str, ours: str, rel_err: float | None, **extra) -> dict:
    """{ref_ms, ours_ms, speedup, rel_err, per_trial_speedup, ...}: medians; speedup = median of per-trial
    ratios ref/ours (each ratio from the same round-robin trial)."""
    r, o = times[ref]["ms"], times[ours]["ms"]
    ratios = [a / b for a, b in zip(r, o, strict=True)]
    return {
        "ref": ref,
        "ours": ours,
        "ref_ms": round(median(r), 4),
        "ours_ms": round(median(o), 4),
        "speedup": round(median(ratios), 3),
        "rel_err": None if rel_err is None else float(f"{rel_err:.3g}"),
        "per_trial_speedup": [round(x, 3) for x in ratios],
        "calls_per_trial": {ref: times[ref]["inner"], ours: times[ours]["inner"]},
        **extra,
    }


# ---------------------------------------------------------------- results JSON


def run_meta(device: str = "cpu", files: Sequence[str] = ()) -> dict:
    """command, git sha, dirty flag, machine and date of this run: :func:`recsys_tapper.runmeta.run_meta` with
    the command taken from ``sys.argv`` (the benchmarks' spelling: ``run_meta()``, ``run_meta("cuda:0")``).
    ``files``: repository-relative paths whose committed state at that sha is recorded (``files_committed``)."""
    return _project_run_meta(device=device, files=files)


def _clean(x):
    """JSON-safe: inf/nan -> None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_section(path: str | Path, section: str, payload: dict) -> Path:
    """Set ``data[section] = payload`` in the JSON at ``path``, keeping every other section.

    Read-modify-write under an exclusive ``flock`` on the results folder (no lock file left behind); the
    new file is written to a temp file in the same folder and moved into place (atomic on POSIX), so a
    reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() and path.stat().st_size else {}
        data[section] = _clean(payload)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        os.close(lock)  # releases the flock
    return path
