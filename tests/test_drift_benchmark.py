"""``tapper benchmark drift`` end to end on the tiny model: rows, report files, resume."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from embeddings.record_bank import RecordBank
from recsys_tapper import drift_benchmark
from recsys_tapper.drift_benchmark import drift_config, estimate_seconds, row_key
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

SMALL = ["model=tiny", "trainer=smoke", "n_users=3", "n_records=6", "n_test=1", "stage1_users=2", "per_user=2",
         "trainer.stage1_examples=4", "trainer.stage1.batch_size=4", "trainer.stage2.batch_size=4",
         "trainer.eval_max_new_tokens=4", "~task_overrides"]  # the tiny model has 2 layers, not 20+


def test_drift_benchmark_writes_rows_report_and_plot_and_resumes(tmp_path, monkeypatch, capsys):
    cfg = drift_config([*SMALL, "tasks=[tagging,headline]", "fractions=[0.5,0.2]",
                        "methods=[non_personalized,tapper]", f"results_dir={tmp_path}"])
    assert cfg.model.lambda_init == "data" and cfg.trainer.lr_lambda == 0.05 and cfg.trainer.class_readout == "label_set"
    result = drift_benchmark.benchmark_drift(cfg, command="test")
    # the cost model is SmolLM2's: the tiny model gets no estimate, printed or written
    assert "no wall-time estimate for backbone 'tiny-random-llama'" in capsys.readouterr().out
    assert result["estimate_s"] == {} and "Estimated SmolLM2" not in (tmp_path / "drift.md").read_text()
    expected = {row_key(t, f, m) for t in ("tagging", "headline") for f in (0.5, 0.2)
                for m in ("non_personalized", "tapper")}
    on_disk = json.loads((tmp_path / "drift.json").read_text())
    assert set(on_disk["rows"]) == expected == set(result["rows"])
    for row in on_disk["rows"].values():
        assert row["n_users"] == 3 and row["n_queries"] == 3
        assert row["machine"] == on_disk["machine"] == on_disk["runs"][0]["machine"]  # each row says where it ran
        assert row["drift_at"] == {0.5: 3, 0.2: 5}[row["drift_frac"]]  # 6 records: the last 3, the last 1
        if row["task"] == "tagging":
            assert row["metric"] == "accuracy" and row["out_of_label_set_frac"] == 0.0 and row["readout"] == "label_set"
            assert 0.0 <= row["accuracy"] <= 1.0
        else:
            assert row["metric"] == "rougeL" and {"rouge1", "rougeL"} <= set(row)
        if row["method"] == "tapper":
            assert row["time_bias"] and row["order_bias"] and row["n_stage2_examples"] == 6
            assert row["lambda_t"] != row["lambda_t_start"] and row["lambda_o"] != row["lambda_o_start"]
        else:
            assert "lambda_t" not in row
    assert set(on_disk["stage1"]) == {"tagging", "headline"} and on_disk["settings"]["n_users"] == 3
    md = (tmp_path / "drift.md").read_text()
    assert md.count("| method | f = 0.2 | f = 0.5 |") == 2
    cells = re.compile(r"^\| tapper \| [0-9.]+ \([0-9.]+\) \| [0-9.]+ \([0-9.]+\) \|$", re.MULTILINE)  # metric (2nd)
    assert len(cells.findall(md)) == 2 and md.count("| tapper | 0.2 | ") == 2  # + one lambda row per task and f
    assert "## tagging (SYNTHETIC LaMP-2M): accuracy" in md and "## headline (SYNTHETIC LaMP-4): ROUGE-L" in md
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "drift_tagging_stage1_lora.safetensors").exists()

    # resume: every row is reused (nothing trains or scores), one more run is listed
    def boom(*a, **k):
        raise AssertionError("a reused row was recomputed")

    for name in ("train_stage1", "train_stage2", "score"):
        monkeypatch.setattr(drift_benchmark, name, boom)
    again = drift_benchmark.benchmark_drift(cfg, command="test again")
    assert again["rows"] == on_disk["rows"] and [r["command"] for r in again["runs"]] == ["test", "test again"]

    # a table from headline generator version 1: its Stage-1 LoRA and rows are redone, tagging's are kept
    monkeypatch.undo()
    old = json.loads((tmp_path / "drift.json").read_text())
    assert old["stage1"]["headline"].pop("generator_version") == 2 and "generator_version" not in old["stage1"]["tagging"]
    for row in old["rows"].values():
        row["settings"].pop("generator_version", None)
    (tmp_path / "drift.json").write_text(json.dumps(old))
    calls = []
    real = drift_benchmark.train_stage1
    monkeypatch.setattr(drift_benchmark, "train_stage1", lambda *a, **k: calls.append(1) or real(*a, **k))
    third = drift_benchmark.benchmark_drift(cfg, command="test 3")
    assert len(calls) == 1 and third["stage1"]["headline"]["generator_version"] == 2
    for key, row in third["rows"].items():
        if key.startswith("tagging"):
            assert row == old["rows"][key]
        else:
            assert row["settings"]["generator_version"] == 2 and row["date"] != old["rows"][key]["date"]


def test_a_changed_stage2_setting_reruns_only_the_tapper_rows(tmp_path, monkeypatch):
    cfg = drift_config([*SMALL, "tasks=[rating]", "fractions=[0.5]", "methods=[rag_recency_k4,tapper_no_time]",
                        f"results_dir={tmp_path}"])
    first = drift_benchmark.benchmark_drift(cfg, command="first")
    rows = first["rows"]
    assert set(rows) == {"rating|0.5|rag_recency_k4", "rating|0.5|tapper_no_time"}
    assert rows["rating|0.5|tapper_no_time"]["time_bias"] is False and "mae" in rows["rating|0.5|rag_recency_k4"]
    calls = []
    real = drift_benchmark.train_stage2
    monkeypatch.setattr(drift_benchmark, "train_stage2", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg.trainer.lr_dense = 1e-2
    second = drift_benchmark.benchmark_drift(cfg, command="second")
    assert calls == [1]  # Stage 1 came from its cache, RAG's row was kept
    assert second["rows"]["rating|0.5|rag_recency_k4"] == rows["rating|0.5|rag_recency_k4"]
    assert second["rows"]["rating|0.5|tapper_no_time"]["settings"]["lr_dense"] == 1e-2


def test_estimate_adds_up_the_measured_costs():
    cfg = drift_config(["tasks=[rating]", "fractions=[0.5]", "methods=[non_personalized]", "n_users=10",
                        "n_test=1", "trainer.stage1_examples=40"])
    # Stage 1: 40 x 0.24 s x 25/40 tokens; scoring 10 test + 10 dev queries at 0.06 s x 24/40
    assert estimate_seconds(cfg) == {"rating": pytest.approx(40 * 0.24 * 25 / 40 + 20 * 0.06 * 24 / 40)}


def test_per_user_null_trains_on_every_profile_record_after_the_first():
    cfg = drift_config(["tasks=[tagging]", "fractions=[0.5]", "methods=[tapper]", "n_users=10", "n_records=20",
                        "per_user=null", "trainer.stage2.epochs=1"])
    train, _ = drift_benchmark.drift_splits(cfg, "tagging", 0.5)

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

    class Enc:
        def encode(self, texts, progress=False):
            return torch.ones(len(texts), 2)

    fb = FeatureBuilder(Tok(), Enc(), get_task("LaMP-2M"), RecordBank(2), UserIndex([]), 64)
    fb.register(train)
    s2 = fb.stage2_samples(train, per_user=drift_benchmark.task_config(cfg, "tagging").trainer.stage2_per_user)
    # the train question's profile holds records 0..18; records 1..18 are targets, each after its own history
    assert len(s2) == 10 * 18 == 10 * drift_benchmark.targets_per_user(cfg)
    assert sorted({len(s.history_rows) for s in s2}) == list(range(1, 19))
    assert drift_benchmark.targets_per_user(drift_config(["per_user=5"])) == 5
    with_5 = estimate_seconds(drift_config(["tasks=[tagging]", "per_user=5"]))["tagging"]
    full = estimate_seconds(drift_config(["tasks=[tagging]", "per_user=null"]))["tagging"]
    assert estimate_seconds(drift_config(["tasks=[tagging]", "per_user=18"]))["tagging"] == pytest.approx(full)
    assert full > with_5


def test_estimate_follows_the_prefix_layer():
    """Stage 2 runs the layers above the prefix layer: layer 20 costs 10 layers' time, layer 28 two."""
    def stage2_s(layer: int) -> float:
        base = ["tasks=[rating]", "fractions=[0.5]", f"+task_overrides.rating.model.prefix_layer={layer}"]
        with_tapper = estimate_seconds(drift_config([*base, "methods=[tapper]"]))["rating"]
        return with_tapper - estimate_seconds(drift_config([*base, "methods=[non_personalized]"]))["rating"]

    # the tapper row's own cost: prefill + dev/test scoring (the same at every layer) + Stage 2 (10 vs 2 layers)
    prompt, answer = drift_benchmark.TOKENS["rating"][:2]  # 24 + 1 tokens
    cost = drift_benchmark.COST_S
    assert stage2_s(20) - stage2_s(28) == pytest.approx(
        100 * 5 * 3 * (cost["train_layer"] + cost["train_layer_token"] * (prompt + answer)) * (10 - 2))


def test_unknown_names_fail_before_any_work(tmp_path):
    from recsys_tapper.errors import InputError

    cfg = drift_config([f"results_dir={tmp_path}", "methods=[tapperr]"])
    with pytest.raises(InputError, match="method 'tapperr'"):
        drift_benchmark.benchmark_drift(cfg)
    assert not (tmp_path / "drift.json").exists()


def test_cli_dispatches_drift_to_its_own_config(capsys):
    from recsys_tapper.cli import main

    with pytest.raises(SystemExit) as e:
        main(["benchmark", "drift", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: tapper benchmark drift" in out and "configs/benchmark_drift.yaml" in out
    assert "fractions:" in out and "lambda_init: data" in out and "lr_lambda: 0.05" in out


def test_optional_ablations_undo_one_drift_default_each():
    from recsys_tapper.drift_benchmark import row_settings, variant

    cfg = drift_config([])
    assert cfg.model.record_label_weight == 1.0 and cfg.model.lambda_init == "data"
    assert variant(cfg, "tapper_no_label_weight").model.record_label_weight == 0.0
    assert variant(cfg, "tapper_random_lambda").model.lambda_init is None
    assert variant(cfg, "tapper_no_time").model.pooling.time_bias is False
    assert variant(cfg, "tapper").model.lambda_init == "data"
    base = row_settings(cfg, "tapper")
    assert base["lambda_init"] == "data" and base["record_label_weight"] == 1.0 and base["lr_lambda"] == 0.05
    assert row_settings(cfg, "tapper_random_lambda") == {**base, "overrides": {"model": {"lambda_init": None}}}
    pq_only = variant(cfg, "tapper_pq_only").model.projector
    assert pq_only.use_user_state is False and pq_only.use_history is True
    assert cfg.model.projector.use_user_state is True


def test_task_overrides_set_one_tasks_stage2_budget_and_refuse_what_rows_share():
    from recsys_tapper.drift_benchmark import check_drift_config, row_settings, task_config
    from recsys_tapper.errors import InputError

    cfg = drift_config(["task_overrides.rating.per_user=5", "+task_overrides.rating.trainer.stage2.epochs=5",
                        "per_user=null"])
    rating, tagging = task_config(cfg, "rating"), task_config(cfg, "tagging")
    assert (rating.per_user, rating.trainer.stage2_per_user, rating.trainer.stage2.epochs) == (5, 5, 5)
    assert (tagging.per_user, tagging.trainer.stage2_per_user) == (None, None)
    # the defaults (configs/benchmark_drift.yaml): tagging at prefix layer 20, the rest at 28
    assert (tagging.model.prefix_layer, rating.model.prefix_layer, cfg.model.prefix_layer) == (20, 28, 28)
    assert tagging.trainer.stage2.epochs == cfg.trainer.stage2.epochs == 3
    # tagging's soft window over the 5 latest records and the content term (SIF vectors, beta 10), as rating's
    assert (tagging.model.pooling.window, tagging.model.text_weighting, tagging.model.pooling.content_beta) \
        == (5, "sif", 10.0)
    assert (cfg.model.pooling.window, cfg.model.text_weighting, cfg.model.pooling.content_beta) == (None, "mean", None)
    assert row_settings(tagging, "tapper", "tagging") != row_settings(cfg, "tapper", "tagging")
    assert (rating.task.name, tagging.task.name) == ("movielens", "LaMP-2M")
    # the rating rows record the task's budget, so changing it reruns them and nothing else
    assert row_settings(rating, "tapper", "rating")["per_user"] == 5
    assert row_settings(tagging, "tapper", "tagging")["per_user"] is None
    # the estimate follows the override: 100 users x 18 targets x 3 epochs against 100 x 5 x 5
    plain = estimate_seconds(drift_config(["tasks=[rating]", "per_user=null", "task_overrides.rating.per_user=null"]))
    assert estimate_seconds(drift_config(["tasks=[rating]", "task_overrides.rating.per_user=5",
                                          "+task_overrides.rating.trainer.stage2.epochs=5",
                                          "per_user=null"]))["rating"] < plain["rating"]
    for bad, message in [("+task_overrides.rate.per_user=5", r"unknown task\(s\) \['rate'\]"),
                         ("task_overrides.rating.per_user=0", "per_user .* must be >= 1"),
                         ("+task_overrides.rating.trainer.stage1_examples=5",
                          r"Stage-2 settings only, not \['stage1_examples'\]"),
                         ("+task_overrides.rating.bogus=1", "task_overrides.rating: Key 'bogus' not in"),
                         # before Stage 1, not when the trunk is built: the tiny model has 2 decoder layers
                         ("model=tiny", (r"task_overrides.tagging: model.prefix_layer=20 is not a decoder layer of "
                                         r"backbone 'tiny-random-llama' \(depth 2: use 0 .. 1\)"))]:
        with pytest.raises(InputError, match=message):
            check_drift_config(drift_config([bad]))


def test_a_generator_version_past_1_is_part_of_that_tasks_row_settings():
    from recsys_tapper.drift_benchmark import GENERATOR_VERSION, row_settings

    cfg = drift_config([])
    assert GENERATOR_VERSION["headline"] == 2
    assert row_settings(cfg, "tapper", "headline") == {**row_settings(cfg, "tapper"), "generator_version": 2}
    assert row_settings(cfg, "non_personalized", "headline") == {"generator_version": 2}
    assert row_settings(cfg, "tapper", "tagging") == row_settings(cfg, "tapper")


def test_rating_defaults_turn_on_the_content_term_and_tapper_no_content_trains_on_plain_means(tmp_path, monkeypatch):
    """configs/benchmark_drift.yaml: rating and tagging rows use SIF vectors and the pooling's content term,
    headline the paper's; ``tapper_no_content`` trains on its own plain-mean bank with the DIN score alone."""
    from recsys_tapper.drift_benchmark import row_settings, task_config, variant

    cfg = drift_config([])
    rating, headline = task_config(cfg, "rating"), task_config(cfg, "headline")
    assert (rating.model.text_weighting, rating.model.pooling.content_beta) == ("sif", 10.0)
    assert (headline.model.text_weighting, headline.model.pooling.content_beta) == ("mean", None)
    off = variant(rating, "tapper_no_content").model
    assert (off.text_weighting, off.pooling.content_beta) == ("mean", None)
    s = row_settings(rating, "tapper", "rating")
    assert s["text_weighting"] == "sif" and s["pooling"]["content_beta"] == 10.0
    assert "text_weighting" not in row_settings(headline, "tapper", "headline")
    assert "content_beta" not in row_settings(headline, "tapper", "headline")["pooling"]

    small = drift_config([*SMALL, "tasks=[rating]", "fractions=[0.5]",
                          "methods=[tapper,tapper_no_content,tapper_no_label_weight]",
                          f"results_dir={tmp_path}", "+task_overrides.rating.model.text_weighting=sif",
                          "+task_overrides.rating.model.pooling.content_beta=10"])
    seen = {}
    real = drift_benchmark.train_stage2

    def spy(vcfg, lm, fb, *a, **k):
        out = real(vcfg, lm, fb, *a, **k)
        seen[vcfg.model.text_weighting, fb.label_weight] = (fb.bank.token_weights, fb.encoder.token_weights,
                                                             out[0].tower.pooling, fb.bank)
        return out

    monkeypatch.setattr(drift_benchmark, "train_stage2", spy)
    rows = drift_benchmark.benchmark_drift(small, command="test")["rows"]
    # the drift defaults' label weight (1) for tapper and tapper_no_content, none for tapper_no_label_weight
    assert set(seen) == {("sif", 1.0), ("mean", 1.0), ("sif", 0.0)}
    w, enc_w, pool, bank = seen["sif", 1.0]
    assert w is enc_w and w is not None and float(w.min()) < 0.5
    assert pool.cfg.content_beta == 10.0 and float(pool.query_center.norm()) > 0
    off = seen["mean", 1.0]
    assert off[0] is None and off[1] is None and off[2].cfg.content_beta is None
    # tapper_no_label_weight's record vectors are the text's alone: its own bank, the same rows
    no_label = seen["sif", 0.0][3]
    assert no_label is not bank and no_label.keys == bank.keys
    assert not torch.allclose(no_label.vectors, bank.vectors)
    assert rows["rating|0.5|tapper"]["beta_start"] == 10.0 and "beta" not in rows["rating|0.5|tapper_no_content"]
    md = (tmp_path / "drift.md").read_text()
    assert md.count("content β 10.000 → ") == 2 and "| tapper_no_content | 0.5 | " in md  # not in no_content's


def test_the_soft_window_is_in_tappers_row_settings_and_not_in_no_times():
    """``model.pooling.window`` applies with the order bias only, so ``tapper_no_time`` (both biases off) keeps
    the settings, and so the rows, it had without the window; ``tapper``'s settings change with it."""
    from recsys_tapper.drift_benchmark import row_settings, task_config

    plain = task_config(drift_config(["~task_overrides.tagging.model.pooling.window"]), "tagging")
    win = task_config(drift_config([]), "tagging")  # the default (configs/benchmark_drift.yaml)
    assert win.model.pooling.window == 5.0 and plain.model.pooling.window is None
    assert row_settings(win, "tapper_no_time", "tagging") == row_settings(plain, "tapper_no_time", "tagging")
    assert row_settings(win, "tapper", "tagging")["pooling"]["window"] == 5.0
    assert "window" not in row_settings(plain, "tapper", "tagging")["pooling"]
    # likewise the targets the recency prior is fitted on (model.lambda_init_latest)
    latest = task_config(drift_config(["+task_overrides.tagging.model.lambda_init_latest=3"]), "tagging")
    assert row_settings(latest, "tapper_no_time", "tagging") == row_settings(win, "tapper_no_time", "tagging")
    assert row_settings(latest, "tapper", "tagging")["lambda_init_latest"] == 3
    assert "lambda_init_latest" not in row_settings(win, "tapper", "tagging")
    # and a fixed window (model.pooling.learn_window=false): recorded only when the window applies and is fixed
    fixed = task_config(drift_config(["+task_overrides.tagging.model.pooling.learn_window=false"]), "tagging")
    assert row_settings(fixed, "tapper_no_time", "tagging") == row_settings(win, "tapper_no_time", "tagging")
    assert row_settings(fixed, "tapper", "tagging")["pooling"]["learn_window"] is False
    assert "learn_window" not in row_settings(win, "tapper", "tagging")["pooling"]


def test_every_panel_of_the_drift_plot_has_a_legend_of_its_own_methods():
    """The tasks' methods differ (rating has tapper_no_content), so one legend in the first panel hides some."""
    import matplotlib.pyplot as plt

    from recsys_tapper.drift_report import drift_figure

    def row(task, method, frac, metric, value):
        return {"task": task, "method": method, "drift_frac": frac, "metric": metric, "higher_is_better": metric != "mae",
                metric: value}

    rows = [row("tagging", m, f, "accuracy", 0.5) for m in ("tapper", "tapper_no_time") for f in (0.1, 0.5)]
    rows += [row("rating", m, f, "mae", 1.0) for m in ("tapper", "tapper_no_content") for f in (0.1, 0.5)]
    fig = drift_figure({"rows": {str(i): r for i, r in enumerate(rows)}, "tasks": ["tagging", "rating"]})
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    plt.close(fig)
    assert legends == [["tapper", "tapper_no_time"], ["tapper", "tapper_no_content"]]


def test_drift_md_names_each_commits_rows_when_a_resumed_table_mixes_commits(tmp_path):
    from recsys_tapper.drift_report import write_drift_markdown

    def row(method, frac, sha):
        return {"task": "tagging", "layout": "LaMP-2M", "method": method, "drift_frac": frac, "metric": "accuracy",
                "higher_is_better": True, "accuracy": 0.5, "git_sha": sha, "dirty": False}

    rows = [row("rag_recency_k4", f, "a" * 40) for f in (0.1, 0.5)] + [row("tapper", f, "b" * 40) for f in (0.5, 0.1)]
    table = {"rows": {str(i): r for i, r in enumerate(rows)}, "command": "c2", "git_sha": "b" * 40,
             "runs": [{"command": "c1", "date": "d1"}, {"command": "c2", "date": "d2"}]}
    write_drift_markdown(table, tmp_path / "drift.md")
    md = (tmp_path / "drift.md").read_text()
    assert "Last saved by: `c2`" in md
    assert ("Rows by commit: git `aaaaaaa`: tagging rag_recency_k4 (f = 0.1/0.5); "
            "git `bbbbbbb`: tagging tapper (f = 0.1/0.5).") in md
    table["rows"] = {"0": rows[0]}
    table["runs"] = table["runs"][:1]
    write_drift_markdown(table, tmp_path / "drift.md")
    md = (tmp_path / "drift.md").read_text()
    assert "Rows by commit" not in md and "Command: `c2`" in md


def test_a_drift_table_of_other_settings_is_not_overwritten(tmp_path):
    """The drift table resumes through the same check as ml100k's: another run's table on disk stops the run
    before any work, and the file is left as it was; with resume=false nothing is read back."""
    from recsys_tapper.drift_benchmark import _settings
    from recsys_tapper.io import load_resumable

    cfg = drift_config([*SMALL, "tasks=[tagging]", f"results_dir={tmp_path}"])
    path = tmp_path / "drift.json"
    text = json.dumps({"settings": {**_settings(cfg), "n_users": 99}, "rows": {"x": {}}})
    path.write_text(text)
    with pytest.raises(ValueError, match="holds a run with settings"):
        drift_benchmark.benchmark_drift(cfg)
    assert path.read_text() == text
    assert load_resumable(path, _settings(cfg), resume=False) is None
    path.write_text(json.dumps({"settings": _settings(cfg), "rows": {"x": {}}}))
    assert load_resumable(path, _settings(cfg), resume=True)["rows"] == {"x": {}}


def test_two_invocations_of_one_task_train_its_stage1_once(tmp_path, monkeypatch):
    """A second invocation of the same task, started while the first trains its Stage 1, waits for it and loads
    the LoRA the first wrote; both fractions' rows end in the one table."""
    base = [*SMALL, "tasks=[rating]", "methods=[non_personalized]", f"results_dir={tmp_path}"]
    entered, go, calls = threading.Event(), threading.Event(), []
    real = drift_benchmark.train_stage1

    def slow(*a, **k):
        calls.append(1)
        entered.set()
        go.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(drift_benchmark, "train_stage1", slow)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(drift_benchmark.benchmark_drift, drift_config([*base, "fractions=[0.5]"]), "first")
        assert entered.wait(60)  # the first is inside Stage 1, its table (table_started) on disk
        second = pool.submit(drift_benchmark.benchmark_drift, drift_config([*base, "fractions=[0.2]"]), "second")
        time.sleep(1.0)  # the second reaches the Stage-1 lock meanwhile
        go.set()
        first.result(), second.result()
    assert calls == [1]
    table = json.loads((tmp_path / "drift.json").read_text())
    assert set(table["rows"]) == {"rating|0.5|non_personalized", "rating|0.2|non_personalized"}
    assert [r["command"] for r in table["runs"]] == ["first", "second"]


def test_concurrent_invocations_of_one_drift_table_merge_each_others_rows():
    """Two invocations split by task fill one table: each save takes the other's rows and Stage-1 entry from
    disk, keeps its own, drops a disk row resume would not reuse, and takes nothing from another table."""
    row = lambda task, m, v, s="ok": {"task": task, "method": m, "accuracy": v, "settings": s}
    settings = {"n_test": 3}
    disk = {"table_started": "t0", "settings": settings, "tasks": ["rating", "headline"],
            "runs": [{"command": "a"}], "stage1": {"rating": {"seconds": 1.0}, "tagging": {"seconds": 9.0}},
            "rows": {"rating|0.1|tapper": row("rating", "tapper", 0.5),
                     "rating|0.1|tapper_no_time": row("rating", "tapper_no_time", 0.4, s="stale"),
                     "tagging|0.1|tapper": row("tagging", "tapper", 0.1)}}  # an older value of mine
    result = {"table_started": "t0", "settings": settings, "tasks": ["tagging"],
              "runs": [{"command": "a"}, {"command": "b"}], "stage1": {"tagging": {"seconds": 2.0}},
              "rows": {"tagging|0.1|tapper": row("tagging", "tapper", 0.9)}}
    mine = {"stage1|tagging", "tagging|0.1|tapper"}
    drift_benchmark.merge_drift(result, disk, mine, lambda r: r["settings"] == "ok")
    assert result["rows"] == {"rating|0.1|tapper": row("rating", "tapper", 0.5),
                              "tagging|0.1|tapper": row("tagging", "tapper", 0.9)}
    assert result["stage1"] == {"rating": {"seconds": 1.0}, "tagging": {"seconds": 2.0}}
    assert result["runs"] == [{"command": "a"}, {"command": "b"}]
    assert result["tasks"] == ["tagging", "rating", "headline"]
    before = json.loads(json.dumps(result))
    for other in ({**disk, "table_started": "t1"}, {**disk, "settings": {"n_test": 1}}):
        drift_benchmark.merge_drift(result, other, mine, lambda r: True)
        assert result == before  # a replaced table or one of other settings gives nothing


def test_attention_after_is_the_mean_share_of_attention_on_records_from_the_drift_day_on():
    """By hand: alphas (0.2, 0.3, 0.5) over days (0, 3, 6) and (0.4, 0.6) over (0, 9), drift day 6: shares 0.5
    and 0.6; a sample without history is left out of the mean."""
    from types import SimpleNamespace

    from recsys_tapper.drift_benchmark import attention_after
    from recsys_tapper.features import Sample

    samples = [Sample("a", "u", [0, 1, 2], [0.0, 3.0, 6.0], 9.0, "q", "x"),
               Sample("e", "u", [], [], 9.0, "q", "x"),
               Sample("b", "v", [3, 4], [0.0, 9.0], 12.0, "q", "x")]
    fb = SimpleNamespace(collate=lambda part, with_labels: SimpleNamespace(
        users=None, history=[s.id for s in part], q=None, extra_records=None))
    alphas = {("a", "b"): torch.tensor([0.2, 0.3, 0.5, 0.4, 0.6])}
    model = SimpleNamespace(tower=lambda users, history, q, extra: (None, None, alphas[tuple(history)]))
    assert attention_after(model, fb, samples, day=6.0) == pytest.approx(0.55)


def test_tagging_errors_sort_each_answer_by_what_the_question_and_profile_say():
    """benchmarks/drift_tagging_errors.py by hand: a profile of comedy, comedy, action before the drift point
    (record 3) and sci-fi, romance, sci-fi after it; a question cueing sci-fi (gold), comedy and fantasy."""
    from benchmarks.drift_tagging_errors import sort_answers
    from recsys_tapper.data import LampExample, ProfileRecord
    from recsys_tapper.synthetic import TAG_CUES

    tags = ["comedy", "comedy", "action", "sci-fi", "romance", "sci-fi"]
    profile = tuple(ProfileRecord(f"u_{i}", {"description": "d", "tag": t}, 3.0 * i) for i, t in enumerate(tags))
    question = f"tags: [...] description: A film about {TAG_CUES['sci-fi']}, {TAG_CUES['comedy']} and " \
               f"{TAG_CUES['fantasy']}."
    preds = ["sci-fi", "comedy", "fantasy", "romance", "violence"]
    test = [LampExample(f"q{i}", "u", question, profile, 18.0, "sci-fi", {}) for i in range(len(preds))]
    rows = [{"id": f"q{i}", "gold": "sci-fi", "pred": p} for i, p in enumerate(preds)]
    out = sort_answers(rows, test, at=3)
    assert [out[k] for k in ("right", "old_tag", "other_cued", "not_cued_recent", "not_cued_other")] == [0.2] * 5
    assert out["accuracy_gold_in_last5"] == 0.2 and out["queries_gold_not_in_last5"] == 0
    assert out["top3_are_the_cues"] is None  # no label scores in these rows
