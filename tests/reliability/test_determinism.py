"""Same config + seed on CPU -> identical metrics and predictions."""

import json

from conftest import tiny_config

from recsys_tapper.job import run
from recsys_tapper.synthetic import synthetic_rating_task


def _cfg(out):
    cfg = tiny_config(out, stage2_per_user=3)
    cfg.trainer.stage2.batch_size = 4
    return cfg


def test_same_seed_same_metrics(tmp_path):
    splits = synthetic_rating_task(n_users=4, n_records=10, seed=3)
    a = run(_cfg(tmp_path / "a"), splits=splits)
    b = run(_cfg(tmp_path / "b"), splits=splits)
    for name in ("non_personalized", "tapper"):
        for k in ("mae", "rmse", "mae_expected", "rmse_expected"):
            assert a["methods"][name][k] == b["methods"][name][k]
    assert a["stage2_final_loss"] == b["stage2_final_loss"]
    pa = json.loads((tmp_path / "a" / "predictions.json").read_text())
    pb = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert pa == pb
