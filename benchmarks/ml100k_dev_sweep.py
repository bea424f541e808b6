"""Stage-2 settings picked on MovieLens *dev* queries, never on test: one run, every setting side by side.

Each setting trains TAP-PER's Stage 2 on the dev-split profiles of the same users (all 943 by default, as the
benchmark does) and scores the dev queries (5 per user, which come after every Stage-2 target) of a seeded
sample of them. Stage 1 is the benchmark's cached
task LoRA when present (``benchmarks/results/ml100k_stage1_lora.safetensors``), else trained here the same way.
Results are appended per setting to ``benchmarks/results/ml100k_dev_sweep.json``.

    python benchmarks/ml100k_dev_sweep.py --eval-users 300 --settings base standardize_context
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsys_tapper.baselines.classical import run_classical
from recsys_tapper.benchmark import benchmark_config, stage1_model
from recsys_tapper.evaluation import predict_labels, rating_report
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.io import atomic_write_text
from recsys_tapper.job import train_stage2
from recsys_tapper.model import TapperModel
from recsys_tapper.pipeline import load_splits, select_users
from recsys_tapper.runmeta import run_meta
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

# Overrides of the benchmark config (Hydra-style nested dicts), one per setting.
SETTINGS: dict[str, dict] = {
    "base": {},
    "lr_user_3e-2": {"trainer": {"lr_user": 3e-2}},
    "lr_user_1e-1": {"trainer": {"lr_user": 1e-1}},
    "lr_user_3e-2_dense_1e-2": {"trainer": {"lr_user": 3e-2, "lr_dense": 1e-2}},
    "lr_user_3e-2_epochs_2": {"trainer": {"lr_user": 3e-2, "stage2": {"epochs": 2}}},
    "no_time": {"model": {"pooling": {"time_bias": False, "order_bias": False}}},
    "standardize_context": {"model": {"projector": {"standardize_context": True}}},
    "epochs_2": {"trainer": {"stage2": {"epochs": 2}}},
    "epochs_4": {"trainer": {"stage2": {"epochs": 4}}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-users", type=int, default=None, help="default: all")
    ap.add_argument("--users", type=int, default=None,
                    help="round-1 design: train and score the same seeded sample of this many users")
    ap.add_argument("--eval-users", type=int, default=300)
    ap.add_argument("--per-user", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/ml100k_dev_sweep.json"))
    args = ap.parse_args()
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")

    cfg = benchmark_config([f"per_user={args.per_user}"])
    cfg.data.n_users = None
    dev, test = load_splits(cfg)  # dev: Stage-2 profiles and the queries scored here; test is never read
    del test
    everyone = select_users(dev, None)
    chosen = sorted(random.Random(0).sample(everyone, args.users or args.train_users or len(everyone)))
    chosen_set = set(chosen)
    dev_users = [ex for ex in dev if ex.user_id in chosen_set]
    scored = chosen_set if args.users else set(random.Random(1).sample(chosen, min(args.eval_users, len(chosen))))
    dev_scored = [ex for ex in dev_users if ex.user_id in scored]

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"settings": {}}
    result.update(run_meta(" ".join(["python benchmarks/ml100k_dev_sweep.py", *sys.argv[1:]])),
                  n_train_users=len(chosen), n_dev_queries=len(dev_scored), per_user=args.per_user)
    result["classical_dev"] = run_classical(dev_scored, methods=["user_mean", "user_item_bias"], seed=0)

    task = get_task(cfg.task.name)
    results_dir = REPO / "benchmarks/results"
    bench = results_dir / "ml100k.json"
    cached_s = json.loads(bench.read_text()).get("stage1_s") if bench.exists() else None
    lm, tok, fb_all, stage1_s = stage1_model(cfg, dev, dev_users, select_users(dev, None),
                                             results_dir / "ml100k_stage1_lora.safetensors", cached_s)
    result["stage1_s"] = stage1_s
    users = UserIndex(chosen)
    fb = FeatureBuilder(tok, fb_all.encoder, task, fb_all.bank, users, cfg.model.max_prompt_tokens)
    samples = fb.question_samples(dev_scored)
    if "non_personalized" not in result:
        t0 = time.perf_counter()
        rows = predict_labels(TapperModel(lm, None, None), fb, samples, task.labels, 32, desc="non_personalized")
        result["non_personalized"] = {**rating_report(rows), "eval_s": time.perf_counter() - t0,
                                      "pred_counts": dict(Counter(r["pred"] for r in rows))}

    for name in args.settings:
        vcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), SETTINGS[name]))
        vcfg.trainer.stage2_per_user = args.per_user
        model, s2, losses, train_s, _ = train_stage2(vcfg, lm, fb, users, dev_users)
        t0 = time.perf_counter()
        rows = predict_labels(model, fb, samples, task.labels, 32, desc=name)
        result["settings"][name] = {
            "overrides": SETTINGS[name], **rating_report(rows), "n_train": len(s2), "train_s": train_s,
            "eval_s": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "pred_counts": dict(Counter(r["pred"] for r in rows)),
        }
        model.lm.unload()
        atomic_write_text(out, json.dumps(result, indent=2))
        r = result["settings"][name]
        print(f"[sweep] {name}: mae {r['mae']:.3f} rmse {r['rmse']:.3f} mae_E {r['mae_expected']:.3f} "
              f"loss {r['final_loss']:.3f} preds {r['pred_counts']}", flush=True)
    atomic_write_text(out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
