"""scale: the P_u table at 1,000,000 users x r=64, sharded over 2 ranks (the EBC alone, no LLM), on CPU.

    torchrun --nproc_per_node=2 benchmarks/scale.py                     # writes benchmarks/results/scale.json
    torchrun --nproc_per_node=2 benchmarks/scale.py --users 100000 --out /tmp/scale.json

The table is built on the meta device, so no rank ever holds it whole; DMP materializes each rank's shard
(column_wise: two (U, r/2) slices, one per rank) with the fused row-wise Adagrad. Measured in one run:

- peak RSS per rank (``ru_maxrss``) after sharding and the lookups, and again at the end (export + import),
- pooled lookups per second: every rank looks up 1,024 random user ids per batch (global batch 2,048),
  forward only (``torch.no_grad``), after warm-up; and forward + backward with the fused optimizer,
- baseline, same run: the unsharded EBC doing the same global batch in rank 0 alone (the other rank waits),
- export: ``gather_user_table`` to rank 0 + safetensors write + fsync; import: every rank reads its own
  rows/columns from that file (safetensors slice) and loads them (``load_user_table``); the round trip is
  checked bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_meta
from embeddings.sharding import gather_user_table, load_user_table, shard_user_tower
from embeddings.user_state import TABLE, UserStateConfig, UserStateTable, user_kjt
from recsys_tapper.io import atomic_write_text

RESULT = Path(__file__).resolve().parent / "results" / "scale.json"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gather(x) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def timed(fn, iters: int) -> float:
    """Seconds for ``iters`` calls on the slowest rank (every call is a collective)."""
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(iters):
        fn(i)
    dist.barrier()
    dt = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sharding", default="column_wise")
    ap.add_argument("--batch", type=int, default=1024, help="user ids per rank per batch")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()

    load_avg = os.getloadavg()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_imports = rss_mb()

    t0 = time.perf_counter()
    table = UserStateTable(UserStateConfig(num_users=args.users, dim=args.dim), device=torch.device("meta"))
    dmp = shard_user_tower(table, args.sharding, "rowwise_adagrad", lr=0.01)
    shard_s = time.perf_counter() - t0
    local = dmp.state_dict()[f"ebc.embedding_bags.{TABLE}.weight"]
    layout = [(list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in local.local_shards()]

    g = torch.Generator().manual_seed(rank)
    batches = [user_kjt(torch.randint(0, args.users, (args.batch,), generator=g).tolist()) for _ in range(16)]

    def lookup(i: int) -> None:
        with torch.no_grad():
            dmp(batches[i % len(batches)])

    def train(i: int) -> None:
        dmp(batches[i % len(batches)]).square().sum().backward()  # rows update inside backward (fused)

    timed(lookup, args.warmup)
    lookup_s = timed(lookup, args.iters)
    timed(train, args.warmup)
    train_s = timed(train, args.iters)
    rss_lookups = rss_mb()

    # baseline: the same global batch through the unsharded EBC, in rank 0 alone
    base_s = None
    if rank == 0:
        plain = UserStateTable(UserStateConfig(num_users=args.users, dim=args.dim))
        merged = [user_kjt(torch.randint(0, args.users, (args.batch * world,), generator=g).tolist())
                  for _ in range(16)]
        with torch.no_grad():
            for i in range(args.warmup):
                plain(merged[i % 16])
            t1 = time.perf_counter()
            for i in range(args.iters):
                plain(merged[i % 16])
            base_s = time.perf_counter() - t1
        del plain
    dist.barrier()

    # export: gather to rank 0, write safetensors, fsync
    tmpdir = [tempfile.mkdtemp(prefix="scale-export-") if rank == 0 else None]
    dist.broadcast_object_list(tmpdir, src=0)
    path = Path(tmpdir[0]) / "user_state.safetensors"
    dist.barrier()
    t1 = time.perf_counter()
    full = gather_user_table(dmp)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({TABLE: full}, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    dist.barrier()
    export_s = time.perf_counter() - t1
    export_bytes = path.stat().st_size if rank == 0 else None

    # import: each rank reads its own slice of the file and loads it into its shards
    load_user_table(dmp, torch.zeros(()).expand(args.users, args.dim))  # a failed import cannot pass the check
    dist.barrier()
    t1 = time.perf_counter()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        load_user_table(dmp, f.get_slice(TABLE))
    dist.barrier()
    import_s = time.perf_counter() - t1
    again = gather_user_table(dmp)
    if rank == 0:
        assert torch.equal(again, full), "import did not restore the exported table"
        path.unlink()
        os.rmdir(tmpdir[0])
    rss_end = rss_mb()

    per_rank = gather({"rss_imports_mb": rss_imports, "rss_lookups_mb": rss_lookups, "rss_end_mb": rss_end,
                       "shards": layout})
    if rank == 0:
        meta = run_meta()
        n_lookups = args.batch * world * args.iters
        result = {
            "users": args.users,
            "ranks": world,
            "row_dim": args.dim,
            "sharding": args.sharding,
            "shards_per_rank": [r["shards"] for r in per_rank],
            "table_mb": args.users * args.dim * 4 / 2**20,
            "peak_rss_mb_per_rank": [round(r["rss_lookups_mb"], 1) for r in per_rank],
            "peak_rss_mb_per_rank_end": [round(r["rss_end_mb"], 1) for r in per_rank],
            "rss_after_imports_mb_per_rank": [round(r["rss_imports_mb"], 1) for r in per_rank],
            "lookups_per_s": round(n_lookups / lookup_s),
            "train_lookups_per_s": round(n_lookups / train_s),
            "baseline_unsharded_1proc_lookups_per_s": round(n_lookups / base_s),
            "lookups_vs_unsharded": round(base_s / lookup_s, 3),
            "batch_per_rank": args.batch,
            "iters": args.iters,
            "shard_s": round(shard_s, 3),
            "export_s": round(export_s, 3),
            "import_s": round(import_s, 3),
            "export_bytes": export_bytes,
            "load_avg_at_start": [round(x, 2) for x in load_avg],
            "command": f"torchrun --nproc_per_node={world} benchmarks/scale.py {' '.join(sys.argv[1:])}".strip(),
            "git_sha": meta["git_sha"],
            "dirty": meta["dirty"],
            "machine": meta["machine"],
            "date": meta["date"],
            "notes": "CPU, gloo, 1 thread per rank; peak_rss_mb_per_rank is after sharding and the lookups, "
                     "_end after export (rank 0 holds the gathered table) and import. The machine is shared "
                     "(see load_avg_at_start): throughputs are indicative.",
        }
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
