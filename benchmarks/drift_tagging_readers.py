"""What the tagging drift task allows: rule readers of the history, no LLM, in exact expectation.

The tagging drift task (``tapper benchmark drift``, ``synthetic_tagging_task``) cues three tags in each
description: the gold, one of the user's 3 current tags, and two of the 12 others. From the drift point on the
user's 3 tags are replaced by 3 others, so the old tags can turn up as the distractors. Issue 12 asks TAP-PER to
beat TAP-PER without time and order bias by 0.3. This script measures how much room there is, with readers that
see only the query's cues and the tags of the profile records (ties split evenly, so every number is an exact
expectation over the readers' coin, on the benchmark's own draws):

- ``set``: a cued tag the user has ever used (uniform among them; 1/3 when none): order-free, like a TAP-PER
  without time bias that learned perfectly which tags the user uses;
- ``count``: the cued tag the user used most often (order-free, uses frequency);
- ``recent_k``: a cued tag among the user's last k records, else ``count`` (``recent_best``: the best k per f on
  these very queries, an upper bound for the family, not a chosen setting; ``recent_by_k``: every k, to compare
  with the width of TAP-PER's recency window);
- ``rule``: knows the current tags (1.0 by construction; a check on the cue parsing).

``set`` is what an order-free reader can reach; ``1 - set`` is the largest margin any time-aware method can have
over an order-free one that reads the history that well.

    python benchmarks/drift_tagging_readers.py   # -> benchmarks/results/drift_tagging_readers.json (seconds)
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
from recsys_tapper.io import atomic_write_text
from recsys_tapper.synthetic import RECORD_DAYS, TAG_CUES, TAGS, drift_point, synthetic_tagging_task

OUT = REPO / "benchmarks" / "results" / "drift_tagging_readers.json"
FRACTIONS = (0.1, 0.25, 0.5)
# (name, seed, test queries per user): the benchmark's scored draw and the validation draw its settings use
# the scored table's draw (n_test=3 since cc1d7e6), the earlier table's (n_test=1), the validation draw
DRAWS = (("scored", 0, 3), ("scored_n_test1", 0, 1), ("validation", 1, 3))
N_USERS, N_RECORDS = 100, 20


def cued(question: str) -> list[str]:
    """The three tags whose cue phrase the description holds."""
    tags = [t for t in TAGS if TAG_CUES[t] in question]
    if len(tags) != 3:
        raise ValueError(f"expected 3 cued tags, found {tags} in {question!r}")
    return tags


def pick(cands: list[str], gold: str) -> float:
    """Expected accuracy of a uniform choice among ``cands`` (empty: among all three cues, 1/3)."""
    return (gold in cands) / len(cands) if cands else 1.0 / 3.0


def count_reader(cues: list[str], tags: list[str], gold: str) -> float:
    c = Counter(tags)
    top = max(c[t] for t in cues)
    return pick([t for t in cues if c[t] == top], gold)


def readers(cues: list[str], tags: list[str], gold: str, current: tuple[str, ...]) -> dict[str, float]:
    """Expected accuracy of every reader on one query; ``tags``: profile record tags, oldest first."""
    ever = set(tags)
    out = {"set": pick([t for t in cues if t in ever], gold), "count": count_reader(cues, tags, gold),
           "rule": pick([t for t in cues if t in current], gold)}
    for k in range(1, len(tags) + 1):
        last = set(tags[-k:])
        hit = [t for t in cues if t in last]
        out[f"recent_{k}"] = pick(hit, gold) if hit else count_reader(cues, tags, gold)
    return out


def evaluate(seed: int, n_test: int, frac: float) -> dict[str, float]:
    _, test = synthetic_tagging_task(n_users=N_USERS, n_records=N_RECORDS, n_test=n_test, seed=seed, drift=True,
                                     drift_frac=frac)
    sums: Counter = Counter()
    drift_day = drift_point(N_RECORDS, n_test, True, frac) * RECORD_DAYS
    for ex in test:
        tags = [r.fields["tag"] for r in sorted(ex.profile, key=lambda r: r.date)]
        # the current tags: those of the records after the drift point (the test queries follow them)
        current = tuple({r.fields["tag"] for r in ex.profile if r.date >= drift_day} | {ex.output})
        sums.update(readers(cued(ex.input), tags, ex.output, current))
    n = len(test)
    res = {k: round(v / n, 4) for k, v in sums.items() if not k.startswith("recent_")}
    recent = {int(k.split("_")[1]): v / n for k, v in sums.items() if k.startswith("recent_")}
    best_k = max(recent, key=recent.get)
    res.update({"recent_by_k": {k: round(v, 4) for k, v in sorted(recent.items())},
                "recent_1": round(recent[1], 4), "recent_best": round(recent[best_k], 4), "recent_best_k": best_k,
                "queries": n, "max_margin_over_set": round(1.0 - res["set"], 4)})
    return res


def main() -> None:
    # no options: an unknown argument is refused before the committed JSON is overwritten
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    out = {"meta": run_meta(), "n_users": N_USERS, "n_records": N_RECORDS, "draws": {}}
    for name, seed, n_test in DRAWS:
        out["draws"][name] = {"seed": seed, "n_test": n_test,
                              "fractions": {str(f): evaluate(seed, n_test, f) for f in FRACTIONS}}
        for f, r in out["draws"][name]["fractions"].items():
            print(f"{name:10s} f={f:4s} set {r['set']:.3f} count {r['count']:.3f} recent_1 {r['recent_1']:.3f} "
                  f"recent_best {r['recent_best']:.3f} (k={r['recent_best_k']}) rule {r['rule']:.3f}")
    atomic_write_text(OUT, json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
