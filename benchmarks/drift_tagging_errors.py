"""Which errors each method makes on the tagging drift task, from the answers a drift run saved.

``tapper benchmark drift`` writes each row's answers to ``<results_dir>/predictions/tagging_<f>_<method>.jsonl``.
This script regenerates the same draw (the seed and sizes in ``<results_dir>/drift.json``; no LLM) and sorts each
answer by what the question and the profile say about it:

- ``right``: the gold tag;
- ``old_tag``: a cued tag the user used only before the drift point (the old rule's answer);
- ``other_cued``: another of the question's three cued tags;
- ``not_cued``: none of the three (``not_cued_recent``: of those, a tag of one of the last 5 records).

It also gives the accuracy on the queries whose gold tag is among the tags of the last 5 profile records and on
the others, and, from the label scores, how often the three best-scored labels are exactly the cued ones.

    python benchmarks/drift_tagging_errors.py runs/benchmark_drift          # -> <dir>/tagging_errors.json
    python benchmarks/drift_tagging_errors.py DIR --out benchmarks/results/drift_dev/NAME_errors.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import run_meta
from benchmarks.drift_tagging_readers import cued
from recsys_tapper.io import atomic_write_text
from recsys_tapper.synthetic import RECORD_DAYS, drift_point, synthetic_tagging_task

RECENT = 5  # the last-k reader's best k at f = 0.25 on both draws (drift_tagging_readers.json)


def sort_answers(rows: list[dict], test: list, at: int) -> dict:
    """Shares of each kind of answer (module docstring) over ``rows`` (one per test query of ``test``)."""
    by_id = {ex.id: ex for ex in test}
    kinds: Counter = Counter()
    hit: Counter = Counter()  # (gold among the last RECENT tags, right)
    top3 = 0
    for r in rows:
        ex = by_id[r["id"]]
        cues = cued(ex.input)
        recs = sorted(ex.profile, key=lambda rec: rec.date)
        before = {rec.fields["tag"] for rec in recs if rec.date < at * RECORD_DAYS}
        after = {rec.fields["tag"] for rec in recs if rec.date >= at * RECORD_DAYS}
        recent = {rec.fields["tag"] for rec in recs[-RECENT:]}
        pred, gold = r["pred"], r["gold"]
        if pred == gold:
            kind = "right"
        elif pred in cues:
            kind = "old_tag" if pred in before and pred not in after else "other_cued"
        else:
            kind = "not_cued_recent" if pred in recent else "not_cued_other"
        kinds[kind] += 1
        hit[(gold in recent, pred == gold)] += 1
        if "label_scores" in r:
            best = sorted(r["label_scores"], key=r["label_scores"].get, reverse=True)[:3]
            top3 += set(best) == set(cues)
    n = len(rows)
    out = {k: round(kinds[k] / n, 4) for k in ("right", "old_tag", "other_cued", "not_cued_recent", "not_cued_other")}
    out["not_cued"] = round(out["not_cued_recent"] + out["not_cued_other"], 4)
    for inside in (True, False):
        m = hit[(inside, True)] + hit[(inside, False)]
        key = f"accuracy_gold_{'in' if inside else 'not_in'}_last{RECENT}"
        out[key] = round(hit[(inside, True)] / m, 4) if m else None
        out[f"queries_gold_{'in' if inside else 'not_in'}_last{RECENT}"] = m
    out["top3_are_the_cues"] = round(top3 / n, 4) if rows and "label_scores" in rows[0] else None
    out["queries"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path, help="a drift run's results_dir (drift.json and predictions/)")
    ap.add_argument("--out", type=Path, help="where the JSON goes (default: <results_dir>/tagging_errors.json)")
    args = ap.parse_args()
    table = args.results_dir / "drift.json"
    if not table.exists():
        sys.exit(f"error: {table} not found (a results_dir of tapper benchmark drift)")
    s = json.loads(table.read_text())["settings"]
    files = sorted((args.results_dir / "predictions").glob("tagging_*.jsonl"))
    if not files:
        sys.exit(f"error: no tagging predictions in {args.results_dir / 'predictions'} (written since 10d563e)")
    out = {"meta": run_meta(), "results_dir": str(args.results_dir), "seed": s["seed"], "recent_k": RECENT,
           "rows": {}}
    for path in files:
        frac_s, method = path.stem.removeprefix("tagging_").split("_", 1)
        frac = float(frac_s)
        _, test = synthetic_tagging_task(n_users=s["n_users"], n_records=s["n_records"], n_test=s["n_test"],
                                         seed=s["seed"], drift=True, drift_frac=frac)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out["rows"][f"{frac_s}|{method}"] = res = sort_answers(rows, test, drift_point(s["n_records"], s["n_test"],
                                                                                       True, frac))
        print(f"f={frac_s} {method}: " + ", ".join(f"{k} {v}" for k, v in res.items()))
    dest = args.out or args.results_dir / "tagging_errors.json"
    atomic_write_text(dest, json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
