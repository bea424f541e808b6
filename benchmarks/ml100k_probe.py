"""Is the user signal in TAP-PER's inputs? A linear probe on the same vectors P_q pools, no LLM.

Features per question: the mean of its visible history's record vectors (c with uniform attention) and the
query vector q, both exactly as TAP-PER computes them (frozen input embeddings, mean-pooled over tokens),
standardized. A multinomial logistic regression over the 5 ratings is fit on the dev queries and scored on the
test queries (all 943 users), next to the same run's constant and user-mean references.

    python benchmarks/ml100k_probe.py      # -> benchmarks/results/ml100k_probe.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embeddings.record_bank import RecordBank
from llm_bridge.backbone import load_backbone
from llm_bridge.encoder import TextEncoder
from recsys_tapper.baselines.classical import run_classical
from recsys_tapper.benchmark import benchmark_config
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.io import atomic_write_text
from recsys_tapper.pipeline import load_splits, mean_histories, select_users
from recsys_tapper.runmeta import run_meta
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex


def features(fb: FeatureBuilder, examples) -> tuple[torch.Tensor, torch.Tensor]:
    samples = fb.question_samples(examples)
    c = mean_histories(fb.bank.vectors, samples)  # (N, d); every MovieLens question has a history
    if len(c) != len(samples):
        raise ValueError(f"{len(samples) - len(c)} questions have no visible history")
    q = fb.encoder.encode([s.question for s in samples])  # (N, d)
    y = torch.tensor([int(s.answer) - 1 for s in samples])
    return torch.cat([c, q], 1), y


def fit_predict(x: torch.Tensor, y: torch.Tensor, x_eval: torch.Tensor, wd: float) -> torch.Tensor:
    w = torch.zeros(x.shape[1], 5, requires_grad=True)
    b = torch.zeros(5, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + wd * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(x_eval @ w + b, -1).detach()


def main() -> None:
    torch.manual_seed(0)
    cfg = benchmark_config()
    cfg.data.n_users = None
    dev, test = load_splits(cfg)
    lm, tok = load_backbone(cfg.model.backbone)
    task = get_task(cfg.task.name)
    fb = FeatureBuilder(tok, TextEncoder(lm, tok, cfg.model.max_record_tokens), task,
                        RecordBank(lm.config.hidden_size), UserIndex(select_users(test, None)))
    t0 = time.perf_counter()
    fb.register(dev + test, progress=True)
    x_dev, y_dev = features(fb, dev)
    x_test, y_test = features(fb, test)
    mean, std = x_dev.mean(0), x_dev.std(0).clamp_min(1e-6)
    x_dev, x_test = (x_dev - mean) / std, (x_test - mean) / std
    d = lm.config.hidden_size
    result = {**run_meta("python benchmarks/ml100k_probe.py"), "n_fit": len(y_dev), "n_test_queries": len(y_test),
              "features_s": time.perf_counter() - t0, "probes": {}}
    values = torch.arange(1.0, 6.0)
    for name, cols in (("history_mean+query", slice(None)), ("history_mean", slice(0, d)),
                       ("query", slice(d, None))):
        for wd in (1e-3, 1e-2, 1e-1):
            p = fit_predict(x_dev[:, cols], y_dev, x_test[:, cols], wd)
            gold = y_test.float() + 1
            result["probes"][f"{name} wd={wd}"] = {
                "mae": float(((p.argmax(-1) + 1).float() - gold).abs().mean()),
                "rmse": float(((p.argmax(-1) + 1).float() - gold).pow(2).mean().sqrt()),
                "mae_expected": float((p @ values - gold).abs().mean()),
            }
    result["classical"] = run_classical(test, methods=["global_mean", "user_mean", "user_item_bias"], seed=0)
    out = REPO / "benchmarks/results/ml100k_probe.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    for k, v in result["probes"].items():
        print(f"{k:<32} mae {v['mae']:.3f} rmse {v['rmse']:.3f} mae_E {v['mae_expected']:.3f}")


if __name__ == "__main__":
    main()
