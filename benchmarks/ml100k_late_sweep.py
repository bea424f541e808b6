"""Full-history Stage 2 on the cached trunk: settings compared on MovieLens *dev* queries only, side by side.

Each setting trains TAP-PER's Stage 2 on every training rating (``stage2_per_user=null``: record i is the target,
records before it the history) of a seeded sample of users, and scores those users' dev queries (the 5
validation ratings, which come after every Stage-2 target) with all three readouts. Stage 1 is the benchmark's
cached task LoRA when present, else trained the same way. One Stage 1 and one trunk cache serve every setting.

    python benchmarks/ml100k_late_sweep.py --users 300 --settings late_mf_item late_item late_mf
    python benchmarks/ml100k_late_sweep.py --users 200 --settings late_mf_item late_mf_item_label \
        late_mf_item_pq_only --out benchmarks/results/ml100k_late_sweep_label.json
    python benchmarks/ml100k_late_sweep.py --users 200 --settings late_mf_item late_mf_item_content \
        --out benchmarks/results/ml100k_late_sweep_content.json
    python benchmarks/ml100k_late_sweep.py --users 300 --settings late_mf_item --temperatures 0.8 0.9 1 1.1 \
        1.2 1.35 1.5 1.75 2 --out benchmarks/results/ml100k_readout_temperature.json

``--temperatures`` also scores the median and expectation readouts of the tempered label distribution
``p_T ~ p^(1/T)`` (T > 1 flattens it) on the same dev queries: whether a calibrated readout lowers RMSE.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsys_tapper.baselines.classical import run_classical
from recsys_tapper.benchmark import benchmark_config, stage1_model
from recsys_tapper.build import build_trunk
from recsys_tapper.evaluation import (
    eval_batches,
    label_token_ids,
    median_index,
    predict_labels,
    rating_report,
)
from recsys_tapper.features import FeatureBuilder, bank_key, feature_builder
from recsys_tapper.io import atomic_write_text
from recsys_tapper.job import train_stage2
from recsys_tapper.metrics import rating_metrics, rating_metrics_numeric
from recsys_tapper.pipeline import load_splits, prefill_trunk, select_users
from recsys_tapper.runmeta import run_meta
from recsys_tapper.tasks import get_task

# Overrides of the benchmark config (nested dicts), one per setting.
SETTINGS: dict[str, dict] = {
    "late_mf_item": {"model": {"prefix_layer": 28, "warm_start": "mf", "item_dim": 33}},
    "late_item": {"model": {"prefix_layer": 28, "user_dim": 33, "item_dim": 33}},
    "late_mf": {"model": {"prefix_layer": 28, "warm_start": "mf"}},
    "late_mf_item_k29": {"model": {"prefix_layer": 29, "warm_start": "mf", "item_dim": 33}},
    "late_mf_item_k26": {"model": {"prefix_layer": 26, "warm_start": "mf", "item_dim": 33}},
    "late_mf_item_lr1e-2": {
        "model": {"prefix_layer": 28, "warm_start": "mf", "item_dim": 33},
        "trainer": {"lr_dense": 1e-2},
    },
    # label-aware record vectors (issue 11, 3): h_j = mean_emb(record text) + 1.0 x mean_emb(its rating)
    "late_mf_item_label": {
        "model": {"prefix_layer": 28, "warm_start": "mf", "item_dim": 33, "record_label_weight": 1.0}
    },
    # P_q alone, no P_u row (the table's tapper_pq_only beside the default, here on dev queries)
    "late_mf_item_pq_only": {
        "model": {
            "prefix_layer": 28,
            "warm_start": "mf",
            "item_dim": 33,
            "projector": {"use_user_state": False},
        }
    },
    # SIF-weighted record and question vectors and the pooling's content term (what fixed the drift rating
    # task's genre selection): P_q leans on the user's ratings of films whose text resembles the query's
    "late_mf_item_content": {
        "model": {
            "prefix_layer": 28,
            "warm_start": "mf",
            "item_dim": 33,
            "text_weighting": "sif",
            "pooling": {"content_beta": 10.0},
        }
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument(
        "--temperatures",
        nargs="*",
        type=float,
        default=[],
        help="also score the readouts of the label distribution tempered by each T",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/ml100k_late_sweep.json"))
    args = ap.parse_args()
    if any(t <= 0 for t in args.temperatures):  # p^(1/T): fail now, not after the Stage-2 training
        ap.error(f"--temperatures: every T must be > 0, got {args.temperatures}")
    command = "python benchmarks/ml100k_late_sweep.py " + " ".join(sys.argv[1:])
    cfg = benchmark_config(["per_user=null"])
    cfg.data.n_users = None
    train, test = load_splits(cfg)
    users_all = select_users(test, None)
    picked = set(random.Random(0).sample(sorted(users_all), min(args.users, len(users_all))))
    dev = [ex for ex in train if ex.user_id in picked]  # dev questions: profiles = training ratings
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {"settings": {}}
    result.update(
        run_meta(command),
        n_users=len(picked),
        n_dev_queries=len(dev),
        note="dev queries only; no test query is scored here",
    )
    # no-LLM references on the same dev queries (fitted on the same training ratings)
    result["references"] = {
        k: {m: v[m] for m in ("mae", "rmse", "mae_rounded", "rmse_rounded")}
        for k, v in run_classical(dev, methods=["user_mean", "user_item_bias", "biased_mf"]).items()
    }
    cache = REPO / "benchmarks/results/ml100k_stage1_lora.safetensors"
    lm, _, fb, _ = stage1_model(cfg, train, train + test, users_all, cache, 0.0 if cache.exists() else None)
    task = get_task(cfg.task.name)
    trunks, fbs = {}, {bank_key(cfg.model): fb}
    for name in args.settings:
        vcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), SETTINGS[name]))
        vcfg.trainer.stage2_per_user = None
        fb = fbs.get(bank_key(vcfg.model)) or variant_features(fbs, vcfg, train + test, lm)
        key = (vcfg.model.prefix_layer, vcfg.model.item_dim is not None)
        if key not in trunks:
            trunks[key] = build_trunk(vcfg.model, lm, {"stage1": load_stage1(cache)})
        trunk = trunks[key]
        t0 = time.perf_counter()
        model, s2, losses, stage2_s, _ = train_stage2(vcfg, lm, fb, fb.users, dev, trunk)
        samples = fb.question_samples(dev)
        prefill_trunk(trunk, fb, samples, with_labels=False, desc="trunk cache, dev prompts")
        t1 = time.perf_counter()
        rows = predict_labels(model, fb, samples, task.labels, cfg.trainer.eval_batch_size, desc=name)
        eval_s = time.perf_counter() - t1
        reps = {r: rating_report(rows, r) for r in ("argmax", "median", "expected")}
        result["settings"][name] = {
            "overrides": SETTINGS[name],
            "n_train": len(s2),
            "epochs": vcfg.trainer.stage2.epochs,
            "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
            "stage2_s": stage2_s,
            "s_per_train_example": stage2_s / len(s2),
            "eval_s": eval_s,
            **{f"mae_{r}": reps[r]["mae"] for r in reps},
            **{f"rmse_{r}": reps[r]["rmse"] for r in reps},
            "lambda_t": model.tower.pooling.lambda_t.item(),
            "lambda_o": model.tower.pooling.lambda_o.item(),
            "wall_s": time.perf_counter() - t0,
            "git_sha": result["git_sha"],
        }
        if args.temperatures:
            result["settings"][name]["tempered"] = tempered_readouts(
                model, fb, samples, task.labels, args.temperatures, cfg.trainer.eval_batch_size
            )
            for t, rep in result["settings"][name]["tempered"].items():
                print(
                    f"[sweep] {name} T={t}: " + json.dumps({k: round(v, 4) for k, v in rep.items()}),
                    flush=True,
                )
        print(
            f"[sweep] {name}: "
            + json.dumps(
                {k: round(v, 4) for k, v in result["settings"][name].items() if isinstance(v, float)}
            ),
            flush=True,
        )
        atomic_write_text(out_path, json.dumps(result, indent=2))
        model.lm.unload()


def tempered_readouts(model, fb, samples, labels, temperatures, batch_size) -> dict[str, dict]:
    """MAE/RMSE of the median and the expectation of ``p_T ~ p^(1/T)`` for each T, on ``samples`` (dev)."""
    import torch

    label_ids = label_token_ids(fb.tok, labels)
    with torch.no_grad():
        probs = torch.cat(
            [
                model.label_probs(b, label_ids)
                for _, b in eval_batches(model, fb, samples, batch_size, "label distributions")
            ]
        )
    values = torch.tensor([float(x) for x in labels])
    golds = [s.answer for s in samples]
    out = {}
    for t in temperatures:
        pt = torch.softmax(torch.log(probs.clamp_min(1e-12)) / t, dim=-1)
        med = rating_metrics([labels[median_index(p)] for p in pt], golds)
        exp = rating_metrics_numeric((pt @ values).tolist(), [float(g) for g in golds])
        out[str(t)] = {
            "mae_median": med["mae"],
            "rmse_median": med["rmse"],
            "mae_expected": exp["mae"],
            "rmse_expected": exp["rmse"],
        }
    return out


def variant_features(fbs: dict, vcfg, register: list, lm) -> FeatureBuilder:
    """A feature builder whose record vectors follow ``vcfg``'s ``record_label_weight`` and ``text_weighting``
    (same tokenizer, backbone and users as the first one; an encoder and a bank of its own)."""
    fb0 = next(iter(fbs.values()))
    fb = feature_builder(vcfg.model, lm, fb0.tok, fb0.task, fb0.users, register, progress=True)
    fbs[bank_key(vcfg.model)] = fb
    return fb


def load_stage1(path: Path) -> object:
    """The Stage-1 LoRA file's sha256: what the cached trunk states depend on beyond the backbone."""
    import hashlib

    import torch

    return torch.tensor(list(hashlib.sha256(path.read_bytes()).digest()), dtype=torch.uint8)


if __name__ == "__main__":
    main()
