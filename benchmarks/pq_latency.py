"""P_q latency: the paper's dense design against our inference path, side by side in one process.

For each case (width d, batch B, N cached records per query) it times, round-robin:

- ``ref``: the paper's design, dense and padded (``common.dense_reference_pq``): [q; h; q-h; q*h] for all
  B*N records (B, N, 4d) -> Linear(4d->d) -> GELU -> Linear(d->1) -> minus temporal biases -> masked softmax
  -> weighted sum -> Linear(d -> L*d). Its padded (B, N, d) input is built before timing.
- ``ours``: ``TimeAwarePooling.infer`` (exact factorized scorer, record terms cached with the bank, jagged,
  gathers its rows from the bank inside the timing) -> the same Linear(d -> L*d). Same function.
- ``ours_lowrank``: the same with ``interaction_rank=k``: a different function (labelled separately).
- ``ours_bf16`` / ``ref_bf16``: both sides with bf16 weights and inputs (softmax in fp32).

Writes the ``pq_latency`` section of benchmarks/results/perf.json (other sections are kept).

Example::

    python benchmarks/pq_latency.py                       # the committed run (~2-3 min on 2 busy cores)
    python benchmarks/pq_latency.py --cases 576x1x1000 --trials 5 --out /tmp/perf.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks.common import (
    RESULTS,
    dense_reference_pq,
    interleave,
    lowrank_like,
    module_scores,
    pad_jagged,
    rel_err,
    run_meta,
    speedup_pair,
    write_section,
)
from embeddings.history import build_history
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig


def make_inputs(d: int, batch: int, n: int, seed: int):
    """B queries, each with its own N records (contiguous bank rows, in time order), a day-stamped History."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(batch * n, d, generator=g)  # (R, d) cached record vectors
    q = torch.randn(batch, d, generator=g)  # (B, d)
    rows = [list(range(b * n, (b + 1) * n)) for b in range(batch)]
    days = [sorted((torch.rand(n, generator=g) * 365).tolist()) for _ in range(batch)]
    hist = build_history(rows, days, [366.0] * batch)
    ids, lengths = hist.record_ids(), hist.lengths().long()
    hp, mask, dtp, dposp = pad_jagged(bank, ids, lengths, hist.dt.values(), hist.order_gaps())
    return q, bank, hist, (hp, mask, dtp, dposp)


def gflop(d: int, batch: int, n: int, slots: int, rank: int) -> dict:
    """Multiply-adds x 2 of the matmuls on each side (elementwise work not counted)."""
    proj = batch * d * slots * d
    ref = batch * n * 4 * d * d + proj
    ours_exact = (batch * n * d * d + proj) + (batch * d * d if batch > 1 else d * d)
    ours_low = batch * n * 2 * d * rank + batch * d * d + proj
    return {
        k: round(2 * v / 1e9, 3)
        for k, v in {"ref": ref, "ours": ours_exact, "ours_lowrank": ours_low}.items()
    }


def run_case(d, batch, n, *, slots, rank, trials, bf16, ref_bf16, block_ms, seed=0) -> dict:
    torch.manual_seed(seed)
    pool = TimeAwarePooling(TimeAwarePoolingConfig(), d).eval()
    proj = nn.Linear(d, slots * d)  # the P_q projection, shared by both sides
    nn.init.normal_(proj.weight, std=0.02)
    nn.init.normal_(proj.bias, std=0.02)
    pool_lr = copy.deepcopy(pool)
    pool_lr.cfg = TimeAwarePoolingConfig(interaction_rank=rank)
    pool_lr.scorer = lowrank_like(pool.scorer, rank)
    q, bank, hist, (hp, mask, dtp, dposp) = make_inputs(d, batch, n, seed)
    lam = (pool.lambda_t.detach(), pool.lambda_o.detach())

    with torch.no_grad():
        t0 = time.perf_counter()
        cache = pool.scorer.record_term(bank)  # (R, d): built once with the bank (scorer frozen)
        cache_ms = (time.perf_counter() - t0) * 1e3
        cache_lr = pool_lr.scorer.record_term(bank)

        def ref():
            return dense_reference_pq(pool.scorer, *lam, proj, q, hp, mask, dtp, dposp, slots)

        def ours():
            return proj(pool.infer(q, hist, bank, cache)[0]).view(batch, slots, d)

        def ours_lowrank():
            return proj(pool_lr.infer(q, hist, bank, cache_lr)[0]).view(batch, slots, d)

        fns = {"ref": ref, "ours": ours, "ours_lowrank": ours_lowrank}
        if bf16:
            bf = torch.bfloat16
            pool16, proj16 = copy.deepcopy(pool).to(bf), copy.deepcopy(proj).to(bf)
            q16, bank16, hp16 = q.to(bf), bank.to(bf), hp.to(bf)
            cache16 = pool16.scorer.record_term(bank16)
            lam16 = (pool16.lambda_t.float(), pool16.lambda_o.float())

            def ours_bf16():
                return proj16(pool16.infer(q16, hist, bank16, cache16)[0]).view(batch, slots, d)

            def ref_bf16_fn():
                return dense_reference_pq(pool16.scorer, *lam16, proj16, q16, hp16, mask, dtp, dposp, slots)

            fns["ours_bf16"] = ours_bf16
            if ref_bf16:
                fns["ref_bf16"] = ref_bf16_fn

        outs = {k: f() for k, f in fns.items()}
        lowrank_def = dense_reference_pq(
            pool_lr.scorer, *lam, proj, q, hp, mask, dtp, dposp, slots, score_fn=module_scores(pool_lr.scorer)
        )  # the low-rank scorer's own (unfused) definition
        times = interleave(fns, trials=trials, block_ms=block_ms, warmup=0)  # outs above warmed each up

    r = outs["ref"]
    pairs = {
        "ours": speedup_pair(
            times, "ref", "ours", rel_err(outs["ours"], r), function="exact (paper's scorer)"
        ),
        "ours_lowrank": speedup_pair(
            times,
            "ref",
            "ours_lowrank",
            rel_err(outs["ours_lowrank"], lowrank_def),
            function=f"DIFFERENT: rank-{rank} pair interaction; rel_err is vs its own unfused definition",
            rel_err_vs_paper_scorer_svd_init=float(f"{rel_err(outs['ours_lowrank'], r):.3g}"),
        ),
    }
    if "ours_bf16" in outs:
        pairs["ours_bf16"] = speedup_pair(
            times,
            "ref",
            "ours_bf16",
            rel_err(outs["ours_bf16"], r),
            function="exact, bf16 (rel_err vs fp32 ref)",
        )
    if "ref_bf16" in outs:
        pairs["ref_bf16"] = speedup_pair(
            times, "ref", "ref_bf16", rel_err(outs["ref_bf16"], r), function="the reference itself in bf16"
        )
        pairs["ours_bf16_vs_ref_bf16"] = speedup_pair(
            times, "ref_bf16", "ours_bf16", rel_err(outs["ours_bf16"], outs["ref_bf16"]), function="both bf16"
        )
    return {
        "settings": {
            "d": d,
            "batch": batch,
            "records_per_query": n,
            "slots_L": slots,
            "interaction_rank": rank,
            "dtype": "float32 unless the row says bf16",
            "trials": trials,
            "cache_build_ms": round(cache_ms, 3),
            "gflop_per_call": gflop(d, batch, n, slots, rank),
        },
        "pairs": pairs,
    }


NOTES = [
    (
        "Exact path limit: with q folded into the weights, fc1(x) = (B - C + D diag(q)) h + (A + C) q + b, the "
        "exact scorer is one (N, d) x (d, d) GEMM per query: N d^2 multiply-adds against the reference's 4 N d^2 "
        "(gflop_per_call). D (q * h_j) is a generic bilinear form, so no exact rewrite goes below d^2 per "
        "(query, record) pair; the FLOP ratio is <= 4x and the measured exact ratios are ~3.3-3.6x. The 20x "
        "(d=576, batch 1) and 10x (d=4096, batch 64) targets are not reachable by the exact function on this CPU."
    ),
    (
        "Low-rank path (ours_lowrank, rank k, a DIFFERENT function): the pair term costs 2 d k, but per record "
        "the cached record term, GELU over d hidden units and fc2 remain O(d), and per query the projection "
        "Linear(d -> L d) (10.6 MB of fp32 weights at d=576, 537 MB at d=4096; identical on both sides) is "
        "memory-bound. Those fixed costs cap it at ~10x at d=576 batch 1 and ~17x at d=4096 batch 1 here "
        "(at d=4096 the projection read is most of its time)."
    ),
    (
        "bf16: this CPU exposes avx512_bf16 but no AMX; bf16 GEMMs were slower than fp32 (ref_bf16 runs at "
        "~0.6x the fp32 ref), so fp32 is the main CPU choice and bf16 rows are reported for honesty only."
    ),
    (
        "d=4096 batch 64 runs with 32 records per query on CPU (ref at 64 x 1000 records would be ~8.6 TFLOP, "
        "minutes per call on these cores). Both sides scale linearly in records except the per-query query "
        "term and projection, which weigh more at 32 records: the FLOP model at 1000 records gives 3.97x (exact) "
        "and ~163x (rank 32). benchmarks/gpu_pq.py measures the real 64 x 1000 case."
    ),
    (
        "Threads: both sides use the same intra-op thread count (1 by default). With 2 threads on this shared "
        "2-core machine (load average 5-6 from other jobs) OpenMP barriers stalled small ops by tens of ms "
        "(a 0.4 ms call measured 56 ms) and per-trial ratios swung 0.4x-6x."
    ),
    (
        "Favouring the reference: its padded (B, N, d) input is built outside its timing; ours reads the History "
        "and gathers its rows from the bank inside. The record-term cache is built once per bank "
        "(cache_build_ms, not per query); a single full-rank query with N >= d does not use it at all."
    ),
]


def targets(cases: dict) -> dict:
    """The issue's targets, met or not, from the measured rows."""
    out = {}
    for key, want, label in (
        ("d576_b1_n1000", 20.0, "pq d=576 batch 1: >= 20x"),
        ("d4096_b64_n32", 10.0, "pq d=4096 batch 64: >= 10x (CPU at 32 records)"),
    ):
        if key in cases:
            p = cases[key]["pairs"]
            out[label] = {
                "ours_exact": p["ours"]["speedup"],
                "ours_lowrank": p["ours_lowrank"]["speedup"],
                "met_by_exact": p["ours"]["speedup"] >= want,
                "met_by_lowrank": p["ours_lowrank"]["speedup"] >= want,
            }
    return out


def parse_case(s: str) -> tuple[int, int, int]:
    d, b, n = (int(x) for x in s.split("x"))
    return d, b, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["576x1x1000", "4096x1x1000", "4096x64x32"],
        help="d x batch x records-per-query",
    )
    ap.add_argument("--trials", type=int, default=9, help="round-robin trials for d <= 1024")
    ap.add_argument(
        "--trials-large", type=int, default=3, help="trials for d > 1024 (each ref call ~seconds)"
    )
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32, help="interaction_rank of the ours_lowrank row")
    ap.add_argument("--block-ms", type=float, default=150.0)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for both sides (1: the 2 shared cores stall OpenMP barriers)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cases = {}
    for spec in args.cases:
        d, b, n = parse_case(spec)
        large = d > 1024
        t0 = time.perf_counter()
        cases[f"d{d}_b{b}_n{n}"] = res = run_case(
            d,
            b,
            n,
            slots=args.slots,
            rank=args.rank,
            trials=args.trials_large if large else args.trials,
            bf16=not args.no_bf16 and not (large and b > 1),
            ref_bf16=not args.no_bf16 and not large,
            block_ms=args.block_ms,
        )
        res["settings"]["wall_s"] = round(time.perf_counter() - t0, 1)
        p = res["pairs"]
        print(
            spec,
            {k: (v["ref_ms"], v["ours_ms"], v["speedup"], v["rel_err"]) for k, v in p.items()},
            flush=True,
        )

    payload = {
        "meta": run_meta("cpu"),
        "method": (
            "Round-robin trials in one process (order rotated); each trial times each callable for ~block_ms "
            "(>=1 call); *_ms are medians over trials of the mean per call; speedup is the median of per-trial "
            "ref/ours ratios. rel_err = max|ours-ref| / max|ref| on P_q (B, L, d), same inputs. Record terms "
            "(the cache) are built once per bank outside the timing; the ref's padded input is also built "
            "outside its timing, while ours gathers its rows from the bank inside."
        ),
        "threads": args.threads,
        "cases": cases,
        "targets": targets(cases),
        "notes": NOTES,
    }
    write_section(args.out, "pq_latency", payload)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
