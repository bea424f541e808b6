import json
import time

from recsys_tapper.config import RunConfig
from recsys_tapper.pipeline import run
from recsys_tapper.synthetic import synthetic_rating_task


def test_tiny_pipeline_end_to_end_under_60s(tmp_path):
    cfg = RunConfig()
    cfg.model.backbone.name_or_path = "tiny-random-llama"
    cfg.model.projector.slots = 4
    cfg.data.n_users = 4
    cfg.trainer.stage1_examples = 16
    cfg.trainer.stage1.batch_size = 8
    cfg.trainer.stage2_per_user = 4
    cfg.trainer.stage2.batch_size = 8
    cfg.out_dir = str(tmp_path / "run")
    t0 = time.perf_counter()
    result = run(cfg, splits=synthetic_rating_task(n_users=6, n_records=12, seed=1))
    assert time.perf_counter() - t0 < 60
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["methods"]) == {"non_personalized", "tapper"}
    for m in saved["methods"].values():
        assert {"mae", "rmse", "params_per_user", "wall_s"} <= set(m)
        assert 0.0 <= m["mae"] <= 4.0 and m["rmse"] >= m["mae"]
    assert saved["n_users"] == 4 and saved["n_test_queries"] == 12
    assert saved["methods"]["tapper"]["params_per_user"] == 4 * 32
    assert result["n_stage2_examples"] == 16
