"""Carry rows of an earlier ``ml100k.json`` into the current table, when the earlier rows are what this table's
code and settings would compute again.

A row qualifies when (1) its settings equal what ``method_settings`` gives the current config (so a resumed
``tapper benchmark ml100k`` would reuse it), and (2) it depends on the shared Stage-1 model only through its
predictions, and both tables' ``non_personalized`` rows (the Stage-1 model alone, scored on the same 4,715
test queries) agree: argmax MAE and RMSE equal, the expectation's MAE within 1e-6. That is the evidence that
the retrained Stage-1 LoRA is the one the earlier rows used. Each carried row keeps its own ``git_sha`` and
``date`` and gains ``carried_from`` (the earlier table's commit and the check).

    python benchmarks/carry_rows.py --rev 5ad3451 --methods rag_recency_k4 rag_bm25_k4 oppu
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from recsys_tapper.benchmark import (
    CLASSICAL_METHODS,
    LLM_METHODS,
    benchmark_config,
    merge_rows,
    method_settings,
    table_lock,
    write_report,
)
from recsys_tapper.io import atomic_write_text
from recsys_tapper.runmeta import run_meta

ROOT = Path(__file__).resolve().parents[1]


def stage1_agrees(old: dict, new: dict) -> str:
    """The check, as a sentence; raises when the two non_personalized rows differ."""
    a, b = old["methods"]["non_personalized"], new["methods"]["non_personalized"]
    old_mae, old_rmse = a.get("mae_argmax", a["mae"]), a.get("rmse_argmax", a["rmse"])
    if (old_mae, old_rmse) != (b["mae_argmax"], b["rmse_argmax"]) or abs(a["mae_expected"] - b["mae_expected"]) > 1e-6:
        raise SystemExit(f"the Stage-1 models differ: non_personalized argmax MAE/RMSE {old_mae}/{old_rmse} vs "
                         f"{b['mae_argmax']}/{b['rmse_argmax']}, MAE(E) {a['mae_expected']} vs {b['mae_expected']}")
    return (f"non_personalized argmax MAE {old_mae} and RMSE {old_rmse} equal in both tables, MAE(E) "
            f"{a['mae_expected']:.9f} vs {b['mae_expected']:.9f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="the commit whose benchmarks/results/ml100k.json holds the rows")
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    sha = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    old = json.loads(subprocess.run(["git", "show", f"{sha}:benchmarks/results/ml100k.json"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout)
    cfg = benchmark_config()
    path = Path(args.results_dir) / "ml100k.json"
    with table_lock(path):
        new = json.loads(path.read_text())
        check = stage1_agrees(old, new)
        for name in args.methods:
            row = old["methods"][name]
            if row.get("settings") != method_settings(cfg, name):
                raise SystemExit(f"{name}: its settings {row.get('settings')} are not this config's "
                                 f"{method_settings(cfg, name)}")
        meta = run_meta()
        carried = {"methods": {**new["methods"], **{n: {**old["methods"][n], "carried_from": {
            "git_sha": sha, "table": "benchmarks/results/ml100k.json", "check": check}} for n in args.methods}},
                   "table_started": new.get("table_started"), "runs": [*new.get("runs", []), {
                       k: meta[k] for k in ("command", "git_sha", "date")}]}
        merge_rows(carried, new, set(args.methods))
        new.update(methods=carried["methods"], runs=carried["runs"])
        new["complete"] = all(m in new["methods"] for m in CLASSICAL_METHODS + LLM_METHODS)
        atomic_write_text(path, json.dumps(new, indent=2))
        write_report(new, path.parent)
    print(f"carried {', '.join(args.methods)} from {sha[:7]} into {path} ({check})")


if __name__ == "__main__":
    main()
