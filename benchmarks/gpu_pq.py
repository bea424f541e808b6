"""P_q latency and pooling throughput on a GPU, pure torch (no torchrec, no fbgemm import anywhere).

It measures what ``pq_latency.py`` and ``pooling_throughput.py`` measure on CPU, at the Llama-3.1-8B width
(d=4096, random init) and in fp32 and bf16, with CUDA events after warm-up:

- ``pq``: batch 1 and 64, N cached records per query (default 1000). ``ref`` = the paper's design, dense and
  padded (``common.dense_reference_pq``); ``ours`` = the same code path as ``TimeAwarePooling.infer``
  (``DINScorer.score_jagged`` + ``softmax_pool`` over jagged rows gathered from the bank, record terms cached)
  then the same Linear(d -> L*d); ``ours_lowrank`` = rank-k pair interaction (a different function).
- ``pooling``: batch 256, power-law history lengths 1..1000; ``ref`` pads to the longest and runs the literal
  scorer densely with a mask; ``padded_factorized`` isolates the jagged layout; ``ours`` is jagged.

bf16 rows use bf16 weights and inputs (softmax in fp32); their rel_err is against the fp32 reference.
TF32 is left at torch's default (off for fp32 matmuls); the JSON records it.

Example::

    python benchmarks/gpu_pq.py --device cuda --out results/gpu_pq.json      # ~1-2 min on an H100
    python benchmarks/gpu_pq.py --device cpu --quick --out /tmp/gpu_pq.json  # tiny sizes, checks the script
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks.common import (
    dense_reference_context,
    dense_reference_pq,
    interleave,
    lowrank_like,
    module_scores,
    pad_jagged,
    padded_factorized_scores,
    power_law_lengths,
    rel_err,
    run_meta,
    speedup_pair,
    temporal_bias,
    write_section,
)
from embeddings.jagged import softmax_pool
from embeddings.scorer import DINScorer


def fast_context(scorer, lam_t, lam_o, q, bank, cache, ids, lengths, dt, dpos) -> torch.Tensor:
    """``TimeAwarePooling.infer`` without the KJT: (B, d) pooled context over jagged rows of ``bank``."""
    h = bank.index_select(0, ids)  # (T, d)
    rt = None if cache is None else cache.index_select(0, ids)  # (T, d)
    s = scorer.score_jagged(q, h, lengths, rt).float() - temporal_bias(lam_t, lam_o, dt, dpos)  # (T,)
    return softmax_pool(s, h, lengths)[0]


def jagged_inputs(lengths: torch.Tensor, d: int, device, seed: int):
    """Each example owns its records (contiguous bank rows in time order); gaps as the history builder makes."""
    g = torch.Generator().manual_seed(seed)
    b, t = lengths.numel(), int(lengths.sum())
    bank = torch.randn(t, d, generator=g).to(device)  # (R, d)
    q = torch.randn(b, d, generator=g).to(device)  # (B, d)
    ids = torch.arange(t, device=device)
    lengths = lengths.cpu()
    seg = torch.repeat_interleave(torch.arange(b), lengths)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    dpos = (lengths[seg] - (torch.arange(t) - starts[seg])).float()  # most recent = 1
    dt = dpos * 365.0 / lengths[seg].float() * torch.rand(t, generator=g)  # days, >= 0
    return q, bank, ids, lengths.to(device), dt.to(device), dpos.to(device)


def build(d: int, slots: int, rank: int, device):
    with torch.device(device):
        scorer = DINScorer(d).eval()
        proj = nn.Linear(d, slots * d)
        nn.init.normal_(proj.weight, std=0.02)
        nn.init.normal_(proj.bias, std=0.02)
        lam = (
            torch.randn(()) * 0.02,
            torch.randn(()) * 0.02,
        )  # lambda_t, lambda_o: N(0, 0.02) as in the paper
    return scorer, lowrank_like(scorer, rank), proj, lam


def _cast(m: nn.Module, dtype) -> nn.Module:
    import copy

    return copy.deepcopy(m).to(dtype)


def run_pq(d, batch, n, dtype, args, device) -> dict:
    torch.manual_seed(0)
    scorer, lowrank, proj, lam = build(d, args.slots, args.rank, device)
    lengths = torch.full((batch,), n, dtype=torch.long)
    q, bank, ids, lens, dt, dpos = jagged_inputs(lengths, d, device, seed=1)
    hp, mask, dtp, dposp = pad_jagged(bank, ids, lens, dt, dpos)
    with torch.no_grad():
        cache, cache_lr = scorer.record_term(bank), lowrank.record_term(bank)  # built once with the bank
        ref32 = dense_reference_pq(scorer, *lam, proj, q, hp, mask, dtp, dposp, args.slots)
        lowrank_def = dense_reference_pq(
            lowrank, *lam, proj, q, hp, mask, dtp, dposp, args.slots, score_fn=module_scores(lowrank)
        )
        if dtype != torch.float32:
            scorer, lowrank, proj = _cast(scorer, dtype), _cast(lowrank, dtype), _cast(proj, dtype)
            q, bank, hp, cache, cache_lr = (x.to(dtype) for x in (q, bank, hp, cache, cache_lr))
        shape = (batch, args.slots, d)
        fns = {
            "ref": lambda: dense_reference_pq(scorer, *lam, proj, q, hp, mask, dtp, dposp, args.slots),
            "ours": lambda: proj(fast_context(scorer, *lam, q, bank, cache, ids, lens, dt, dpos)).view(shape),
            "ours_lowrank": lambda: proj(
                fast_context(lowrank, *lam, q, bank, cache_lr, ids, lens, dt, dpos)
            ).view(shape),
        }
        outs = {k: f() for k, f in fns.items()}
        times = interleave(fns, trials=args.trials, block_ms=args.block_ms, warmup=args.warmup, device=device)
    tag = "fp32 ref" if dtype == torch.float32 else "fp32 ref (this row's ref is itself bf16)"
    return {
        "settings": {
            "d": d,
            "batch": batch,
            "records_per_query": n,
            "slots_L": args.slots,
            "interaction_rank": args.rank,
            "dtype": str(dtype).replace("torch.", ""),
            "trials": args.trials,
        },
        "pairs": {
            "ours": speedup_pair(
                times,
                "ref",
                "ours",
                rel_err(outs["ours"], ref32),
                function=f"exact (paper's scorer); rel_err vs {tag}",
                ref_rel_err_vs_fp32=float(f"{rel_err(outs['ref'], ref32):.3g}"),
            ),
            "ours_lowrank": speedup_pair(
                times,
                "ref",
                "ours_lowrank",
                rel_err(outs["ours_lowrank"], lowrank_def),
                function=f"DIFFERENT: rank-{args.rank} pair interaction; rel_err vs its own fp32 unfused definition",
                rel_err_vs_paper_scorer_svd_init=float(f"{rel_err(outs['ours_lowrank'], ref32):.3g}"),
            ),
        },
    }


def run_pool(d, dtype, args, device) -> dict:
    torch.manual_seed(0)
    scorer, lowrank, _, lam = build(d, 1, args.rank, device)
    lengths = power_law_lengths(args.pool_batch, 1, args.pool_max_len, args.alpha, seed=0)
    q, bank, ids, lens, dt, dpos = jagged_inputs(lengths, d, device, seed=1)
    hp, mask, dtp, dposp = pad_jagged(bank, ids, lens, dt, dpos)
    with torch.no_grad():
        cache, cache_lr = scorer.record_term(bank), lowrank.record_term(bank)
        ref32 = dense_reference_context(scorer, *lam, q, hp, mask, dtp, dposp, chunk=args.chunk)
        lowrank_def = dense_reference_context(
            lowrank, *lam, q, hp, mask, dtp, dposp, chunk=args.chunk, score_fn=module_scores(lowrank)
        )
        if dtype != torch.float32:
            scorer, lowrank = _cast(scorer, dtype), _cast(lowrank, dtype)
            q, bank, hp, cache, cache_lr = (x.to(dtype) for x in (q, bank, hp, cache, cache_lr))
        rtp = pad_jagged(cache, ids, lens)[0]  # (B, N_max, d) padded record terms
        fns = {
            "ref": lambda: dense_reference_context(scorer, *lam, q, hp, mask, dtp, dposp, chunk=args.chunk),
            "padded_factorized": lambda: dense_reference_context(
                scorer,
                *lam,
                q,
                hp,
                mask,
                dtp,
                dposp,
                chunk=args.chunk,
                score_fn=padded_factorized_scores(scorer, rtp),
            ),
            "ours": lambda: fast_context(scorer, *lam, q, bank, cache, ids, lens, dt, dpos),
            "ours_lowrank": lambda: fast_context(lowrank, *lam, q, bank, cache_lr, ids, lens, dt, dpos),
        }
        outs = {k: f() for k, f in fns.items()}
        times = interleave(fns, trials=args.trials, block_ms=args.block_ms, warmup=args.warmup, device=device)
    t, n_max = int(lengths.sum()), int(lengths.max())
    return {
        "settings": {
            "d": d,
            "batch": args.pool_batch,
            "dtype": str(dtype).replace("torch.", ""),
            "lengths": f"power law P(n) ~ n^-{args.alpha} on 1..{args.pool_max_len}, seed 0",
            "total_records_T": t,
            "longest_N_max": n_max,
            "padding_fraction": round(1 - t / (args.pool_batch * n_max), 4),
            "interaction_rank": args.rank,
            "ref_chunk_examples": args.chunk,
            "trials": args.trials,
        },
        "pairs": {
            "ours": speedup_pair(
                times, "ref", "ours", rel_err(outs["ours"], ref32), function="exact; rel_err vs fp32 ref"
            ),
            "ours_lowrank": speedup_pair(
                times,
                "ref",
                "ours_lowrank",
                rel_err(outs["ours_lowrank"], lowrank_def),
                function=f"DIFFERENT: rank-{args.rank}; rel_err vs its own fp32 unfused definition",
            ),
            "ours_vs_padded_factorized": speedup_pair(
                times,
                "padded_factorized",
                "ours",
                rel_err(outs["ours"], outs["padded_factorized"]),
                function="exact; the gain of the jagged layout alone",
            ),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (d=64), to check the script on CPU")
    ap.add_argument("--out", required=True, help="JSON file; the 'gpu_pq' section is set, others kept")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--pool-dims", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--pool-batch", type=int, default=256)
    ap.add_argument("--pool-max-len", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument(
        "--chunk", type=int, default=32, help="examples per slice of the padded pooling reference"
    )
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block-ms", type=float, default=100.0)
    args = ap.parse_args()
    if args.quick:
        args.d, args.records, args.pool_dims, args.pool_batch, args.pool_max_len = 64, 50, [64], 8, 50
        args.batches, args.trials, args.warmup, args.block_ms, args.rank = [1, 4], 2, 1, 5.0, 8
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    results: dict = {"pq": {}, "pooling": {}}
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for b in args.batches:
            key = f"d{args.d}_b{b}_n{args.records}_{name}"
            results["pq"][key] = r = run_pq(args.d, b, args.records, dtype, args, device)
            print(
                key,
                {k: (v["ref_ms"], v["ours_ms"], v["speedup"], v["rel_err"]) for k, v in r["pairs"].items()},
                flush=True,
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for d in args.pool_dims:
            key = f"d{d}_b{args.pool_batch}_{name}"
            results["pooling"][key] = r = run_pool(d, dtype, args, device)
            print(
                "pool",
                key,
                {k: (v["ref_ms"], v["ours_ms"], v["speedup"], v["rel_err"]) for k, v in r["pairs"].items()},
                flush=True,
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu"))
    meta = run_meta(str(device))
    meta["machine"]["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":
        meta["machine"]["cuda"] = torch.version.cuda
        meta["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    payload = {
        "meta": meta,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "imported_torchrec_or_fbgemm": leaked,
        "method": (
            "Round-robin trials (order rotated), CUDA events around each block of calls after warm-up; *_ms are "
            "medians over trials; speedup is the median of per-trial ref/ours ratios. rel_err = max|ours-ref| / "
            "max|ref| on the same inputs. Record terms are cached once per bank outside the timing; the ref's "
            "padded input is built outside its timing; ours gathers its rows inside."
        ),
        **results,
    }
    write_section(args.out, "gpu_pq", payload)
    print("wrote", args.out, "in", payload["wall_s"], "s; torchrec/fbgemm imported:", leaked or "none")
    if leaked:
        sys.exit(1)


if __name__ == "__main__":
    main()
