"""Time-aware pooling throughput: jagged (ours) against pad-to-longest dense attention, in one process.

A batch of B examples with power-law history lengths (P(n) ~ n^-alpha on 1..max_len) is pooled
(c = sum_j softmax_j(DIN(q, h_j) - temporal bias) h_j, the P_q context before its projection) by, round-robin:

- ``ref``: pad every history to the longest in the batch, run the literal DIN scorer ([q; h; q-h; q*h],
  (B, N_max, 4d)) densely with a mask (``common.dense_reference_context``; sliced over examples in chunks to
  bound memory, same FLOPs). Its padded input is built before timing.
- ``padded_factorized``: the same padding, but the factorized scorer (``DINScorer.forward``): isolates what
  the jagged layout alone buys.
- ``jagged_forward``: ``TimeAwarePooling.forward`` (the training path: jagged, autograd-capable) under no_grad.
- ``ours``: ``TimeAwarePooling.infer`` on the ``History`` (record ids in a KJT, day gaps beside them) with the
  record-term cache (exact).
- ``ours_lowrank``: the same with ``interaction_rank=k`` (a different function, labelled separately).

Writes the ``pooling_throughput`` section of benchmarks/results/perf.json (other sections are kept).

Example::

    python benchmarks/pooling_throughput.py                  # the committed run (~1-2 min on 2 busy cores)
    python benchmarks/pooling_throughput.py --batch 64 --trials 3 --out /tmp/perf.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    RESULTS,
    dense_reference_context,
    interleave,
    lowrank_like,
    module_scores,
    pad_jagged,
    padded_factorized_scores,
    power_law_lengths,
    rel_err,
    run_meta,
    speedup_pair,
    write_section,
)
from embeddings.history import build_history
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig


def make_batch(d: int, lengths: torch.Tensor, seed: int):
    """Each example owns its records (contiguous bank rows, in time order, as the record bank appends them)."""
    g = torch.Generator().manual_seed(seed)
    total = int(lengths.sum())
    bank = torch.randn(total, d, generator=g)  # (R, d)
    q = torch.randn(lengths.numel(), d, generator=g)  # (B, d)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]).tolist()
    rows = [list(range(s, s + n)) for s, n in zip(starts, lengths.tolist(), strict=True)]
    days = [sorted((torch.rand(n, generator=g) * 365).tolist()) for n in lengths.tolist()]
    history = build_history(rows, days, [366.0] * lengths.numel())
    return q, bank, history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the history lengths")
    ap.add_argument("--rank", type=int, default=32, help="interaction_rank of the ours_lowrank row")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=16, help="examples per slice of the padded reference")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for every side (1: the 2 shared cores stall OpenMP barriers)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)
    d, b = args.d, args.batch
    lengths = power_law_lengths(b, 1, args.max_len, args.alpha, args.seed)
    q, bank, history = make_batch(d, lengths, args.seed)
    pool = TimeAwarePooling(TimeAwarePoolingConfig(), d).eval()
    pool_lr = copy.deepcopy(pool)
    pool_lr.cfg = TimeAwarePoolingConfig(interaction_rank=args.rank)
    pool_lr.scorer = lowrank_like(pool.scorer, args.rank)
    lam = (pool.lambda_t.detach(), pool.lambda_o.detach())
    ids, lens = history.record_ids(), history.lengths().long()
    hp, mask, dtp, dposp = pad_jagged(bank, ids, lens, history.dt.values(), history.order_gaps())
    t0 = time.perf_counter()
    cache = pool.scorer.record_term(bank)  # built once with the bank (scorer frozen)
    cache_ms = (time.perf_counter() - t0) * 1e3
    cache_lr = pool_lr.scorer.record_term(bank)
    rtp = pad_jagged(cache, ids, lens)[0]  # (B, N_max, d) padded record terms for padded_factorized

    fns = {
        "ref": lambda: dense_reference_context(pool.scorer, *lam, q, hp, mask, dtp, dposp, chunk=args.chunk),
        "padded_factorized": lambda: dense_reference_context(
            pool.scorer,
            *lam,
            q,
            hp,
            mask,
            dtp,
            dposp,
            chunk=args.chunk,
            score_fn=padded_factorized_scores(pool.scorer, rtp),
        ),
        "jagged_forward": lambda: pool(q, history, bank, cache)[0],
        "ours": lambda: pool.infer(q, history, bank, cache)[0],
        "ours_lowrank": lambda: pool_lr.infer(q, history, bank, cache_lr)[0],
    }
    outs = {k: f() for k, f in fns.items()}
    lowrank_def = dense_reference_context(
        pool_lr.scorer,
        *lam,
        q,
        hp,
        mask,
        dtp,
        dposp,
        chunk=args.chunk,
        score_fn=module_scores(pool_lr.scorer),
    )
    times = interleave(fns, trials=args.trials, block_ms=150.0, warmup=0)

    r = outs["ref"]
    total = int(lengths.sum())
    n_max = int(lengths.max())

    def thr(name):
        ms = sorted(times[name]["ms"])[len(times[name]["ms"]) // 2]
        return {"examples_per_s": round(b / ms * 1e3, 1), "records_per_s": round(total / ms * 1e3, 1)}

    pairs = {
        "ours": speedup_pair(
            times, "ref", "ours", rel_err(outs["ours"], r), function="exact (paper's scorer)"
        ),
        "ours_lowrank": speedup_pair(
            times,
            "ref",
            "ours_lowrank",
            rel_err(outs["ours_lowrank"], lowrank_def),
            function=f"DIFFERENT: rank-{args.rank} pair interaction; rel_err is vs its own unfused definition",
            rel_err_vs_paper_scorer_svd_init=float(f"{rel_err(outs['ours_lowrank'], r):.3g}"),
        ),
        "ours_vs_padded_factorized": speedup_pair(
            times,
            "padded_factorized",
            "ours",
            rel_err(outs["ours"], outs["padded_factorized"]),
            function="exact; same scorer algebra both sides: the gain of the jagged layout alone",
        ),
        "padded_factorized_vs_ref": speedup_pair(
            times,
            "ref",
            "padded_factorized",
            rel_err(outs["padded_factorized"], r),
            function="exact; both padded: the gain of the factorized scorer alone",
        ),
        "ours_vs_jagged_forward": speedup_pair(
            times,
            "jagged_forward",
            "ours",
            rel_err(outs["ours"], outs["jagged_forward"]),
            function="exact; infer() fast path against the existing training forward()",
        ),
    }
    payload = {
        "meta": run_meta("cpu"),
        "method": (
            "Round-robin trials in one process (order rotated); *_ms are medians over trials; speedup is the "
            "median of per-trial ref/ours ratios. rel_err = max|ours-ref| / max|ref| on the pooled context "
            "c (B, d). The record-term cache is built once outside the timing; the padded inputs of the dense "
            "rows are built outside their timing; ours reads the History and gathers from the bank inside."
        ),
        "settings": {
            "d": d,
            "batch": b,
            "lengths": f"power law P(n) ~ n^-{args.alpha} on 1..{args.max_len}, seed {args.seed}",
            "total_records_T": total,
            "longest_N_max": n_max,
            "mean_length": round(total / b, 1),
            "padded_slots": b * n_max,
            "padding_fraction": round(1 - total / (b * n_max), 4),
            "interaction_rank": args.rank,
            "ref_chunk_examples": args.chunk,
            "dtype": "float32",
            "trials": args.trials,
            "threads": args.threads,
            "cache_build_ms": round(cache_ms, 2),
            "gflop_per_call": {
                "ref": round(2 * b * n_max * 4 * d * d / 1e9, 2),
                "padded_factorized": round(2 * (b * n_max * d * d + b * d * d) / 1e9, 2),
                "ours": round(2 * (total * d * d + b * d * d) / 1e9, 2),
                "ours_lowrank": round(2 * (total * 2 * d * args.rank + b * d * d) / 1e9, 2),
            },
        },
        "throughput": {k: thr(k) for k in fns},
        "pairs": pairs,
        "target": {
            "ours >= 5x ref (exact)": pairs["ours"]["speedup"] >= 5.0,
            "ours_speedup": pairs["ours"]["speedup"],
        },
        "notes": [
            (
                "The ratio splits into the jagged layout (ours_vs_padded_factorized: no work on padding slots) "
                "and the factorized scorer (padded_factorized_vs_ref: d^2 instead of 4 d^2 per slot); the two "
                "multiply to roughly the total."
            ),
            (
                "ours_lowrank gains little over ours here: with rank k the per-record work left is O(d) "
                "elementwise (record-term gather, GELU, fc2), memory-bound on this shared CPU."
            ),
            (
                "Threads: 1 intra-op thread on every side (the 2 cores are shared with other jobs; 2 threads "
                "stalled on OpenMP barriers)."
            ),
        ],
    }
    for k, v in pairs.items():
        print(k, v["ref_ms"], v["ours_ms"], v["speedup"], v["rel_err"], flush=True)
    write_section(args.out, "pooling_throughput", payload)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
