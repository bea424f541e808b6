"""Where the data prior starts the tagging drift task's recency scalars, by draw and by the targets it is fitted on.

``tapper benchmark drift`` starts TAP-PER's lambda_t, lambda_o, the soft window's lambda_w and its width at the
recency prior that best predicts each Stage-2 target's tag from its history's tags (``model.lambda_init=data``,
``recsys_tapper.recency_prior``). The prior is fitted either on every Stage-2 target (the default) or on each
user's k latest (``model.lambda_init_latest=k``). This script fits it the way Stage 2 does, on the benchmark's own
tagging draws (the scored one, seed 0, and the validation one, seed 1) and on their training profiles only (no
test query is read), without the LLM: the record bank is the frozen input embeddings. It shows whether the start
depends on the draw.

    python benchmarks/drift_prior_starts.py   # -> benchmarks/results/drift_prior_starts.json (about a minute)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from benchmarks.common import run_meta
from embeddings.pooling import TimeAwarePooling
from llm_bridge.backbone import load_backbone
from recsys_tapper.drift_benchmark import drift_config, drift_splits, task_config
from recsys_tapper.features import feature_builder
from recsys_tapper.io import atomic_write_text
from recsys_tapper.pipeline import personal_splits
from recsys_tapper.recency_prior import init_lambdas, latest_targets, record_answers
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

OUT = REPO / "benchmarks" / "results" / "drift_prior_starts.json"
DRAWS = (("scored", 0), ("validation", 1))
FRACTIONS = (0.5, 0.25, 0.1)
LATEST = (None, 5, 3, 1)  # None: every Stage-2 target (the default)
NAMES = ("lambda_t", "lambda_o", "lambda_w", "window_width")


def starts(seed: int) -> dict:
    """{f: {"all" | "latest_k": {name: start}}} for the tagging task's default config on draw ``seed``."""
    tcfg = task_config(drift_config([f"trainer.seed={seed}"]), "tagging")
    lm, tok = load_backbone(tcfg.model.backbone)
    spec = get_task(tcfg.task.name)
    out = {}
    for frac in FRACTIONS:
        train, test = drift_splits(tcfg, "tagging", frac)
        _, test, trainees, chosen = personal_splits(train, test, None, spec)
        fb = feature_builder(tcfg.model, lm, tok, spec, UserIndex(trainees), chosen + test)
        s2 = fb.stage2_samples(chosen, per_user=tcfg.trainer.stage2_per_user, seed=seed)
        answers = record_answers(chosen, fb)
        out[str(frac)] = {}
        for k in LATEST:
            pool = TimeAwarePooling(tcfg.model.pooling, lm.config.hidden_size)
            values = init_lambdas(pool, latest_targets(s2, k), answers, fb.task)
            out[str(frac)]["all" if k is None else f"latest_{k}"] = dict(zip(NAMES, values, strict=True))
    return out


def main() -> None:
    # no options: an unknown argument is refused before the committed JSON is overwritten
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.set_num_threads(1)
    out = {"meta": run_meta(), "task": "tagging", "draws": {}}
    for name, seed in DRAWS:
        out["draws"][name] = {"seed": seed, "fractions": starts(seed)}
        for f, fits in out["draws"][name]["fractions"].items():
            print(f"{name:10s} f={f:4s} " + "  ".join(
                f"{k}: width {v['window_width']:.2f} λ_w {v['lambda_w']:.2f}" for k, v in fits.items()))
    atomic_write_text(OUT, json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
