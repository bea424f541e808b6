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


def test_readouts_are_chosen_on_dev_rows_per_metric():
    from recsys_tapper.evaluation import choose_readout

    dev = [{"gold": "4", "pred": "5", "median": "4", "expected": 4.4},
           {"gold": "2", "pred": "3", "median": "3", "expected": 2.5}]
    readout, rmse_readout, dev_metrics = choose_readout(dev)
    assert {k: v for k, v in dev_metrics.items() if k.startswith("mae_")} == {
        "mae_argmax": 1.0, "mae_median": 0.5, "mae_expected": pytest.approx(0.45)}
    assert dev_metrics["rmse_expected"] == pytest.approx(((0.16 + 0.25) / 2) ** 0.5)
    assert (readout, rmse_readout) == ("expected", "expected")
    # MAE favours the median, RMSE the expectation: each metric gets its own readout
    dev = [{"gold": "5", "pred": "4", "median": "5", "expected": 3.8},
           {"gold": "5", "pred": "4", "median": "5", "expected": 3.8},
           {"gold": "1", "pred": "4", "median": "5", "expected": 3.8}]
    readout, rmse_readout, dev_metrics = choose_readout(dev)
    assert dev_metrics["mae_median"] == pytest.approx(4 / 3) and dev_metrics["mae_expected"] == pytest.approx(1.733, abs=1e-3)
    assert dev_metrics["rmse_median"] == pytest.approx((16 / 3) ** 0.5)
    assert dev_metrics["rmse_expected"] == pytest.approx(((1.2**2 * 2 + 2.8**2) / 3) ** 0.5)
    assert (readout, rmse_readout) == ("median", "expected")
    tie = [{"gold": "4", "pred": "4", "median": "4", "expected": 4.0}]
    assert choose_readout(tie)[:2] == ("argmax", "argmax")


def test_rating_report_takes_a_readout_per_metric():
    from recsys_tapper.evaluation import rating_report

    rows = [{"gold": "5", "pred": "4", "median": "5", "expected": 3.5}]
    rep = rating_report(rows, "median", "expected")
    assert (rep["mae"], rep["rmse"], rep["readout"], rep["rmse_readout"]) == (0.0, 1.5, "median", "expected")
    assert rating_report(rows, "argmax")["rmse_readout"] == "argmax"


def test_concurrent_invocations_merge_rows():
    """Two invocations of one table: each write keeps the other's rows, never overwrites them, and ignores a
    table that another run started (resume=false)."""
    from recsys_tapper.benchmark import merge_rows

    run_a, run_b = {"command": "a"}, {"command": "b"}
    disk = {"table_started": "t0", "stage1_s": 99.0, "runs": [run_a],
            "methods": {"tapper": {"mae": 0.8}, "user_mean": {"mae": 0.9},
                        "tapper_refit": {"mae": 0.75}}}  # a method this code no longer has (now refit=true)
    mine = {"tapper_no_time", "user_mean"}
    result = {"table_started": "t0", "runs": [run_a, run_b],
              "methods": {"user_mean": {"mae": 0.95}, "tapper_no_time": {"mae": 0.85}}}
    merge_rows(result, disk, mine)
    assert result["methods"] == {"user_mean": {"mae": 0.95}, "tapper": {"mae": 0.8}, "tapper_no_time": {"mae": 0.85}}
    assert list(result["methods"]) == ["user_mean", "tapper", "tapper_no_time"]  # METHOD_NAMES order
    assert result["runs"] == [run_a, run_b] and result["stage1_s"] == 99.0
    other = {"table_started": "t1", "methods": {"oppu": {"mae": 1.1}}, "runs": [{"command": "c"}]}
    merge_rows(result, other, mine)
    assert "oppu" not in result["methods"] and result["runs"] == [run_a, run_b]


def test_merge_with_a_concurrent_invocation_drops_rows_resume_would_drop():
    """The merge with a concurrent invocation takes only the disk rows that resume would reuse: under
    same_code=true a row of another code version is stale, and under any setting a row of other settings or
    without settings is; a row the other invocation computed on this code and these settings stays."""
    from recsys_tapper.benchmark import merge_from_disk

    cfg, other = _cfg(), _cfg(lr_user=0.05)
    cfg.same_code = True
    disk = {"table_started": "t0", "runs": [],
            "methods": {"tapper": {"mae": 0.8, "code_hash": "old", "settings": method_settings(cfg, "tapper")},
                        "user_mean": {"mae": 0.9, "code_hash": "new", "settings": method_settings(cfg, "user_mean")},
                        "tapper_pq_only": {"mae": 0.7, "code_hash": "new",
                                           "settings": method_settings(other, "tapper_pq_only")},
                        "oppu": {"mae": 1.1}}}  # a row written before rows recorded their settings and code
    mine = {"tapper_no_time"}
    result = {"table_started": "t0", "runs": [], "methods": {"tapper_no_time": {"mae": 0.85, "code_hash": "new"}}}
    merge_from_disk(result, disk, mine, cfg, "new")
    assert set(result["methods"]) == {"user_mean", "tapper_no_time"}
    assert disk["methods"]["tapper"]["mae"] == 0.8  # the disk table itself is left as it was
    cfg.same_code = False  # another code version is no longer stale; other settings still are
    merge_from_disk(result, disk, mine, cfg, "new")
    assert set(result["methods"]) == {"user_mean", "tapper", "tapper_no_time"}


def test_late_prefix_settings_decide_reuse():
    cfg, other = _cfg(), _cfg()
    other.model.prefix_layer = 28
    assert method_settings(cfg, "tapper") != method_settings(other, "tapper")
    other = _cfg()
    other.paper_per_user = 4
    assert method_settings(cfg, "tapper_paper") != method_settings(other, "tapper_paper")
    assert method_settings(cfg, "tapper") == method_settings(other, "tapper")


def _tiny_movielens(users: tuple[int, ...]) -> tuple[list, list]:
    """(dev, test) questions of the MovieLens split over 13 ratings per user: 3 training ratings, 5 dev, 5 test."""
    import pandas as pd

    from recsys_tapper.data.movielens import split_movielens

    ratings = pd.DataFrame([(u, i, 1 + (u * i) % 5, 1000 * i + u) for u in users for i in range(1, 14)],
                           columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame([(i, f"Film {i}", 1990, "Drama") for i in range(1, 14)],
                         columns=["item_id", "title", "year", "genres"])
    split = split_movielens(ratings, items, n_test=5, n_val=5)
    return split["dev"], split["test"]


def test_refit_rows_train_on_every_rating_before_the_test_period_and_never_on_a_test_gold():
    from recsys_tapper.benchmark import REFIT_READOUTS, benchmark_config, refits, stage2_examples

    dev, test = _tiny_movielens(users=(1, 2))
    dev_ids, test_ids = {ex.id for ex in dev}, {ex.id for ex in test}
    plain, refit = _cfg(), _cfg()
    refit.refit = True
    seen = {r: {rec.id for ex in stage2_examples(c, "tapper", dev, test) for rec in ex.profile}
            for r, c in (("plain", plain), ("refit", refit))}
    assert seen["plain"] == {f"{u}_{i}" for u in (1, 2) for i in (1, 2, 3)}  # the training ratings only
    assert seen["refit"] == seen["plain"] | dev_ids  # + the dev ratings, as the classical rows are fit
    assert not seen["refit"] & test_ids and not seen["plain"] & dev_ids
    # every TAP-PER row refits, ablations and the paper's configuration included; OPPU and the rest do not
    assert all(refits(refit, n) for n in ABLATIONS) and not any(refits(plain, n) for n in ABLATIONS)
    assert not any(refits(refit, n) for n in ("oppu", "rag_bm25_k4", "non_personalized", "biased_mf"))
    # a refit row is never reused as a dev-chosen one, and states its fixed readouts; other rows keep theirs
    assert method_settings(refit, "tapper") != method_settings(plain, "tapper")
    assert method_settings(refit, "tapper_no_time")["readouts"] == list(REFIT_READOUTS) == ["median", "expected"]
    assert method_settings(refit, "oppu") == method_settings(plain, "oppu")
    assert benchmark_config([]).refit and not benchmark_config(["refit=false"]).refit  # configs/benchmark.yaml


def test_a_refit_row_reads_its_fixed_readouts_and_skips_the_dev_queries(tmp_path, monkeypatch):
    """``refit=true`` on the tiny model: the row's Stage 2 gets the test questions (their profiles hold the dev
    ratings), it never predicts the dev queries, and it reports the median and the expectation, marked fixed."""
    import json

    from recsys_tapper import benchmark as bm

    dev, test = _tiny_movielens(users=(1, 2))
    monkeypatch.setattr(bm, "load_splits", lambda cfg: (dev, test))
    seen = {"stage2": [], "predict": []}
    real_stage2, real_predict = bm.train_stage2, bm.predict_labels

    def stage2(vcfg, lm, fb, users, examples, *a, **k):
        seen["stage2"].append(examples)
        return real_stage2(vcfg, lm, fb, users, examples, *a, **k)

    def predict(*a, desc="", **k):
        seen["predict"].append(desc)
        return real_predict(*a, desc=desc, **k)

    monkeypatch.setattr(bm, "train_stage2", stage2)
    monkeypatch.setattr(bm, "predict_labels", predict)
    cfg = bm.benchmark_config(["model=tiny", "trainer=smoke", "methods=[tapper]", f"results_dir={tmp_path}"])
    assert cfg.refit
    bm.benchmark(cfg)
    assert seen["stage2"] == [test] and seen["predict"] == ["tapper"]  # no "tapper dev"
    row = json.loads((tmp_path / "ml100k.json").read_text())["methods"]["tapper"]
    assert (row["readout"], row["rmse_readout"], row["readout_chosen_on"]) == ("median", "expected", "fixed")
    assert (row["mae"], row["rmse"]) == (row["mae_median"], row["rmse_expected"])
    assert not any(k.startswith("dev_") for k in row) and row["n"] == len(test)
    assert "| median / expected, fixed |" in (tmp_path / "ml100k.md").read_text()


def test_rows_and_runs_record_their_machine(tmp_path, monkeypatch):
    """A table resumed on another machine keeps each row's own: every row and every run records where it ran."""
    import json

    from recsys_tapper import benchmark as bm

    splits = _tiny_movielens(users=(1, 2, 3))
    monkeypatch.setattr(bm, "load_splits", lambda cfg: splits)
    cfg = _cfg()
    cfg.results_dir, cfg.methods = str(tmp_path), ["global_mean", "user_mean"]
    bm.benchmark(cfg, command="first")
    monkeypatch.setattr(bm, "run_meta", lambda command: {**real_meta(command), "machine": {"cpu": "elsewhere"}})
    cfg.methods, cfg.rerun = ["user_mean"], ["user_mean"]
    bm.benchmark(cfg, command="second")
    table = json.loads((tmp_path / "ml100k.json").read_text())
    assert table["methods"]["global_mean"]["machine"] == table["runs"][0]["machine"] != {"cpu": "elsewhere"}
    assert table["methods"]["user_mean"]["machine"] == table["runs"][1]["machine"] == {"cpu": "elsewhere"}


def real_meta(command: str) -> dict:
    from recsys_tapper.runmeta import run_meta

    return run_meta(command)


def test_same_code_reuses_only_the_rows_that_ran_this_code(tmp_path, monkeypatch):
    """same_code=true: a table resumed across sessions keeps a row only when its code hash is this code's; rows
    older than the hash, or of other code, are recomputed. Off (the default), settings alone decide."""
    import json

    from recsys_tapper import benchmark as bm

    splits = _tiny_movielens(users=(1, 2, 3))
    monkeypatch.setattr(bm, "load_splits", lambda cfg: splits)
    cfg = _cfg()
    cfg.results_dir, cfg.methods = str(tmp_path), ["global_mean", "user_mean", "item_mean"]
    monkeypatch.setattr(bm, "code_hash", lambda: "a" * 64)
    bm.benchmark(cfg, command="first")
    path = tmp_path / "ml100k.json"
    table = json.loads(path.read_text())
    assert {m["code_hash"] for m in table["methods"].values()} == {"a" * 64} == {table["runs"][0]["code_hash"]}
    del table["methods"]["item_mean"]["code_hash"]  # a row written before rows recorded the hash
    table["methods"]["item_mean"]["date"] = "old"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(bm, "code_hash", lambda: "b" * 64)
    bm.benchmark(cfg, command="other code, settings only")  # the default: nothing is recomputed
    table = json.loads(path.read_text())
    assert table["methods"]["item_mean"]["date"] == "old" and table["methods"]["user_mean"]["code_hash"] == "a" * 64
    table["methods"]["user_mean"]["code_hash"] = "b" * 64  # as if user_mean had run this code in another session
    table["methods"]["user_mean"]["date"] = "kept"
    path.write_text(json.dumps(table))
    cfg.same_code = True
    bm.benchmark(cfg, command="same code")
    table = json.loads(path.read_text())
    assert {n: m["code_hash"] for n, m in table["methods"].items()} == {n: "b" * 64 for n in cfg.methods}
    assert table["methods"]["user_mean"]["date"] == "kept"  # reused: it ran this code
    assert table["methods"]["item_mean"]["date"] != "old"  # recomputed: no hash
    md = (tmp_path / "ml100k.md").read_text()
    assert "Every row ran one code version (code hash" in md and f"`{'b' * 12}`: global_mean, user_mean, item_mean" in md
