"""memory: bytes per user and peak RSS of the user-state table at 10k, 100k and 1M users.

Each size runs in a fresh subprocess (peak RSS is per process): it builds the TorchRec table, does one pooled
lookup of 1,024 users, and reports ru_maxrss minus the RSS measured right after imports. Full rows (L*d =
8*576 = 4,608 fp32 = 18,432 bytes) at 1M users need 18.4 GB: over what this 24 GB machine can hold next to the
rest, so that cell is computed, not measured, and marked so.

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, run_meta, write_section

CHILD = r"""
import resource, sys, json, torch
from embeddings.user_state import UserStateConfig, UserStateTable, user_kjt
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
users, dim = int(sys.argv[1]), int(sys.argv[2])
t = UserStateTable(UserStateConfig(num_users=users, dim=dim))
ids = torch.randint(0, users, (1024,)).tolist()
out = t(user_kjt(ids))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_mb": peak / 1024, "delta_rss_mb": (peak - base) / 1024,
                  "table_mb": users * dim * 4 / 2**20, "out": list(out.shape)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for name, dim in (("full_L8xd576", 8 * 576), ("compressed_r64", 64)):
        for users in (10_000, 100_000, 1_000_000):
            row = {"variant": name, "users": users, "row_dim": dim, "bytes_per_user": dim * 4}
            if users * dim * 4 > 8 * 2**30:
                row.update(measured=False, table_mb_computed=users * dim * 4 / 2**20,
                           note="not measured: the table alone exceeds 8 GiB on a 24 GiB machine")
            else:
                p = subprocess.run([sys.executable, "-c", CHILD, str(users), str(dim)], cwd=repo,
                                   capture_output=True, text=True, check=True)
                row.update(measured=True, **json.loads(p.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(row)
    write_section(args.out, "memory", {"meta": run_meta(), "rows": rows,
                                       "parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


if __name__ == "__main__":
    main()
