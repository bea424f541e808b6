"""The benchmark's resume rule: a row is reused only when every setting it depends on is unchanged."""

import pytest
from omegaconf import OmegaConf

from recsys_tapper.benchmark import ABLATIONS, BenchmarkConfig, method_settings, reusable_rows


def _cfg(**trainer) -> BenchmarkConfig:
    cfg = OmegaConf.to_object(OmegaConf.structured(BenchmarkConfig))
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    return cfg


def _rows(cfg: BenchmarkConfig, names) -> dict:
    return {n: {"mae": 1.0, "settings": method_settings(cfg, n)} for n in names}


def test_stage2_change_reruns_tapper_rows_only():
    old_cfg, new_cfg = _cfg(), _cfg(lr_user=0.05)
    names = ["user_mean", "non_personalized", "rag_recency_k4", "oppu", *ABLATIONS]
    kept = reusable_rows(_rows(old_cfg, names), new_cfg)
    assert sorted(kept) == sorted(["user_mean", "non_personalized", "rag_recency_k4", "oppu"])
    assert sorted(reusable_rows(_rows(old_cfg, names), old_cfg)) == sorted(names)


def test_rows_without_settings_or_unknown_names_are_not_reused():
    cfg = _cfg()
    rows = {"tapper": {"mae": 1.0}, "renamed_method": {"mae": 1.0, "settings": {}}}
    assert reusable_rows(rows, cfg) == {}


def test_rag_budget_and_ablation_are_part_of_the_settings():
    cfg = _cfg()
    other = _cfg()
    other.rag_max_prompt_tokens = 96
    assert method_settings(cfg, "rag_bm25_k4") != method_settings(other, "rag_bm25_k4")
    assert method_settings(cfg, "tapper") != method_settings(cfg, "tapper_no_time")


def test_unknown_method_names_fail_before_any_work(tmp_path):
    import pytest

    from recsys_tapper.benchmark import benchmark

    cfg = _cfg()
    cfg.results_dir = str(tmp_path)
    cfg.rerun = ["tapperr"]
    with pytest.raises(ValueError, match=r"unknown methods \['tapperr'\]"):
        benchmark(cfg)
    assert not (tmp_path / "ml100k.json").exists()


def test_a_table_of_other_settings_is_not_overwritten(tmp_path):
    import json

    import pytest

    from recsys_tapper.benchmark import _settings, benchmark

    cfg = _cfg()
    cfg.results_dir = str(tmp_path)
    table = {"settings": {**_settings(cfg), "per_user": 99}, "methods": {"tapper": {"mae": 0.5}}}
    (tmp_path / "ml100k.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match="holds a run with settings"):
        benchmark(cfg)
    assert json.loads((tmp_path / "ml100k.json").read_text()) == table


def test_model_and_prompt_settings_decide_reuse_too():
    from recsys_tapper.benchmark import _settings

    cfg, other = _cfg(), _cfg()
    other.model.projector.standardize_context = True
    other.model.pooling.interaction_rank = 32
    assert method_settings(cfg, "tapper") != method_settings(other, "tapper")
    assert method_settings(cfg, "rag_bm25_k4") == method_settings(other, "rag_bm25_k4")
    longer = _cfg()
    longer.model.max_prompt_tokens = 128
    assert _settings(cfg) != _settings(longer)  # every LLM row depends on the prompt budget


def test_readout_is_chosen_on_dev_rows_by_mae():
    from recsys_tapper.benchmark import choose_readout

    dev = [{"gold": "4", "pred": "5", "median": "4", "expected": 4.4},
           {"gold": "2", "pred": "3", "median": "3", "expected": 2.5}]
    readout, maes = choose_readout(dev)
    assert maes == {"argmax": 1.0, "median": 0.5, "expected": pytest.approx(0.45)}
    assert readout == "expected"
    tie = [{"gold": "4", "pred": "4", "median": "4", "expected": 4.0}]
    assert choose_readout(tie)[0] == "argmax"


def test_late_prefix_settings_decide_reuse():
    cfg, other = _cfg(), _cfg()
    other.model.prefix_layer = 28
    assert method_settings(cfg, "tapper") != method_settings(other, "tapper")
    other = _cfg()
    other.paper_per_user = 4
    assert method_settings(cfg, "tapper_paper") != method_settings(other, "tapper_paper")
    assert method_settings(cfg, "tapper") == method_settings(other, "tapper")
