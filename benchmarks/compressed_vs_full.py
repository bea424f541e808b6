"""Compressed user state (r-wide rows + a shared up-projection) against full P_u rows, next to each other.

Quality: two `make demo` runs on the same 100 MovieLens users, split, seed and code path, differing only in
``model.user_dim`` (full = L*d = 4,608; compressed = 64). Storage: parameter counts from the backbone's config
(``recsys_tapper.params``, tested against the modules it builds) for SmolLM2, per user and for 1,000 users,
next to OPPU (LoRA r=8 on q,v) and the paper's reference configuration (Llama-3.1-8B, L=8: 32,768 per user).

    tapper demo out_dir=runs/demo                       # full   (benchmarks/results/demo_metrics.json)
    tapper demo model.user_dim=64 out_dir=runs/demo_r64  # compressed
    python benchmarks/compressed_vs_full.py --full benchmarks/results/demo_metrics.json \\
        --compressed runs/demo_r64/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_meta
from llm_bridge.backbone import smollm2_dir
from recsys_tapper.io import atomic_write_text
from recsys_tapper.params import BackboneShape, oppu_params, paper_reference, tapper_params

OUT = Path(__file__).resolve().parent / "results" / "compressed_vs_full.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", required=True)
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--users", type=int, default=1000)
    args = ap.parse_args()
    full, comp = json.loads(Path(args.full).read_text()), json.loads(Path(args.compressed).read_text())
    shape = BackboneShape.from_model_dir(smollm2_dir())  # SmolLM2-135M-Instruct's config
    r = comp["methods"]["tapper"]["params_per_user"]
    storage = {
        "tapper_full": tapper_params(shape, args.users),
        "tapper_compressed": tapper_params(shape, args.users, user_dim=r),
        "oppu_r8_qv": oppu_params(shape, args.users),
        "paper_reference_llama31_8b": paper_reference(args.users)["tapper_full"],
    }
    for v in storage.values():
        v["bytes_per_user_fp32"] = 4 * v["per_user"]
    quality = {name: {k: m["methods"]["tapper"][k] for k in ("mae", "rmse", "mae_expected", "rmse_expected")}
               for name, m in (("tapper_full", full), ("tapper_compressed", comp))}
    quality["non_personalized"] = {k: comp["methods"]["non_personalized"][k] for k in ("mae", "rmse")}
    payload = {**run_meta(), "users_for_totals": args.users, "row_width_compressed": r,
               "demo_users": comp["n_users"], "test_queries": comp["n_test_queries"],
               "quality_on_demo_users": quality, "storage": storage,
               "sources": {"full": args.full, "compressed": args.compressed}}
    atomic_write_text(OUT, json.dumps(payload, indent=2))
    print(json.dumps({"quality": quality, "per_user": {k: v["per_user"] for k, v in storage.items()}}, indent=1))


if __name__ == "__main__":
    main()
