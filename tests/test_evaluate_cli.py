"""``tapper evaluate`` on the tiny model: a saved demo model scored again on LaMP-format files, no training.

One tiny demo per module: 4 synthetic users (syn0..syn3) written as LaMP files, the 3 with the longest
histories personalized (syn3 ties and loses on its id: no row, its records never encoded).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from recsys_tapper.cli import main
from recsys_tapper.data import write_lamp
from recsys_tapper.errors import EXIT_BAD_INPUT
from recsys_tapper.evaluate_saved import EvaluateConfig, EvaluateDataConfig, evaluate_saved
from recsys_tapper.synthetic import synthetic_rating_task
from tests.conftest import tiny_config

TIMINGS = {"train_s", "eval_s", "wall_s"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo out_dir, LaMP data dir with dev_* and test_*, test questions) of one tiny demo run on files."""
    from recsys_tapper.job import run

    root = tmp_path_factory.mktemp("evaluate")
    train, test = synthetic_rating_task(n_users=4, n_records=8, seed=2)
    data = root / "lamp"
    write_lamp(train, data / "dev_questions.json", data / "dev_outputs.json", task="movielens")
    write_lamp(test, data / "test_questions.json", data / "test_outputs.json", task="movielens")
    cfg = tiny_config(root / "demo", n_users=3)
    cfg.data.source, cfg.data.dir, cfg.data.train_split, cfg.data.test_split = "lamp", str(data), "dev", "test"
    run(cfg)
    return root / "demo", data, test


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _snapshot(d: Path) -> dict[str, bytes] | None:
    if not d.exists():
        return None
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_evaluate_on_the_demo_test_split_reproduces_the_demo_metrics(demo, tmp_path, capsys):
    run_dir, data, _ = demo
    out = tmp_path / "eval"
    main(["evaluate", f"model_dir={run_dir / 'model'}", "data=lamp", f"data.dir={data}", "data.split=test",
          "data.n_users=3", f"out_dir={out}"])  # returns on success, exits 2 on bad input
    printed = capsys.readouterr().out
    assert "served by a trained row: 9 queries, cold (P_u = 0): 0" in printed

    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((run_dir / "metrics.json").read_text())
    g, w = got["methods"]["tapper"], want["methods"]["tapper"]
    # the same metrics under the readouts the demo chose on its dev questions (saved with the model); the dev
    # metrics and where Stage 2 started the lambdas are the training run's (evaluate scores one split)
    dev = {k for k in w if k.startswith("dev_") or k == "n_dev" or k.endswith("_start")}
    assert {k: v for k, v in g.items() if k not in TIMINGS} == {k: v for k, v in w.items() if k not in TIMINGS | dev}
    assert (g["readout"], g["rmse_readout"]) == (w["readout"], w["rmse_readout"])
    assert g["train_s"] == 0.0 and g["params_per_user"] == 2 * 32
    assert got["references"] == want["references"]
    assert (got["n_test_queries"], got["n_users"], got["n_trained_users"]) == (9, 3, 3)
    assert got["served_by"] == {"row": 9, "cold": 0} and got["n_new_records"] == 0
    assert got["data"]["questions"] == str(data / "test_questions.json")
    assert len(got["run_meta"]["git_sha"] or "") in (0, 40) and got["run_meta"]["command"].startswith(
        "tapper evaluate model_dir=")
    # the same predictions, row for row (ids, answers, readouts), in LaMP's layout too
    assert (out / "tapper_outputs.json").read_bytes() == (run_dir / "tapper_outputs.json").read_bytes()
    rows = json.loads((out / "predictions.json").read_text())["tapper"]
    demo_rows = json.loads((run_dir / "predictions.json").read_text())["tapper"]
    assert rows == demo_rows
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]


def _new_users_questions() -> list:
    """Two users the model never saw (a different synthetic draw, renamed new0/new1), 3 questions each."""
    _, other = synthetic_rating_task(n_users=2, n_records=8, seed=7)
    out = []
    for ex in other:
        user = ex.user_id.replace("syn", "new")
        profile = tuple(replace(r, id=r.id.replace("syn", "new")) for r in ex.profile)
        out.append(replace(ex, id=ex.id.replace("syn", "new"), user_id=user, profile=profile))
    return out


def test_unseen_users_are_served_cold_and_counted(demo, tmp_path):
    from recsys_tapper.serve import Query, Server

    run_dir, _, test = demo
    new = _new_users_questions()
    data = tmp_path / "lamp"
    # every test question (syn3 has no row) and the new users' questions, in one file
    write_lamp(test + new, data / "dev_questions.json", data / "dev_outputs.json", task="movielens")
    cfg = EvaluateConfig(str(run_dir / "model"), EvaluateDataConfig("lamp", str(data), n_users=None, split="dev"),
                         str(tmp_path / "eval"))
    result = evaluate_saved(cfg)

    assert result["served_by"] == {"row": 9, "cold": 3 + 6} and result["n_cold_test_queries"] == 9
    assert (result["n_users"], result["n_trained_users"], result["n_test_queries"]) == (6, 3, 18)
    assert result["n_new_records"] == 8 * 3  # syn3's and the new users' profiles, encoded here
    assert result["methods"]["tapper"]["n"] == 18
    rows = json.loads((tmp_path / "eval" / "predictions.json").read_text())["tapper"]
    assert {r["user"] for r in rows if r["cold"]} == {"syn3", "new0", "new1"}
    # users with a row: the demo's answers and readouts
    demo_rows = {r["id"]: r for r in json.loads((run_dir / "predictions.json").read_text())["tapper"]}
    warm = [r for r in rows if not r["cold"]]
    assert [r["pred"] for r in warm] == [demo_rows[r["id"]]["pred"] for r in warm]
    torch.testing.assert_close(torch.tensor([r["expected"] for r in warm]),
                               torch.tensor([demo_rows[r["id"]]["expected"] for r in warm]))
    # cold users: what the server's cold-start path (P_u = 0, P_q from the same history) answers
    server = Server(run_dir / "model", cold_start="zero")
    by_id = {ex.id: ex for ex in test + new}
    cold = [r for r in rows if r["cold"]]
    served = server.predict_many([Query(r["user"], by_id[r["id"]].input, list(by_id[r["id"]].profile),
                                        by_id[r["id"]].date) for r in cold])
    assert {s["served_by"] for s in served} == {"pq_only(zero)"}
    assert [s["pred"] for s in served] == [r["pred"] for r in cold]
    torch.testing.assert_close(torch.tensor([s["expected"] for s in served]),
                               torch.tensor([r["expected"] for r in cold]))
    outputs = json.loads((tmp_path / "eval" / "tapper_outputs.json").read_text())
    assert outputs["task"] == "movielens" and [g["id"] for g in outputs["golds"]] == [ex.id for ex in test + new]


def test_without_golds_predictions_are_written_and_metrics_need_golds(demo, tmp_path):
    run_dir = demo[0]
    new = _new_users_questions()
    data = tmp_path / "lamp"
    write_lamp(new, data / "dev_questions.json", None, task="movielens")
    cfg = EvaluateConfig(str(run_dir / "model"), EvaluateDataConfig("lamp", str(data), n_users=None, split="dev"),
                         str(tmp_path / "eval"))
    result = evaluate_saved(cfg)
    assert result["methods"] == {} and result["references"] == {}
    assert result["metrics_note"] == (f"no gold outputs ({data / 'dev_outputs.json'} does not exist): predictions "
                                      "written; metrics need golds")
    assert result["served_by"] == {"row": 0, "cold": 6}
    outputs = json.loads((tmp_path / "eval" / "tapper_outputs.json").read_text())["golds"]
    assert [g["id"] for g in outputs] == [ex.id for ex in new]
    assert {g["output"] for g in outputs} <= {"1", "2", "3", "4", "5"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics_note"] == result["metrics_note"]


# id -> (overrides for (demo out_dir, data dir, tmp_path), expected message, formatted with the same)
BAD_CASES = {
    "missing_model_dir": (lambda run, data, tmp: [f"model_dir={tmp / 'nope'}", f"data.dir={data}"],
                          "model_dir {tmp}/nope: no such directory"),
    "not_a_model_dir": (lambda run, data, tmp: [f"model_dir={run}", f"data.dir={data}"],
                        "model_dir {run}: no manifest.json; not a recsys-tapper model directory"),
    "missing_split": (lambda run, data, tmp: [f"model_dir={run / 'model'}", f"data.dir={data}", "data.split=valid"],
                      ("data.dir {data}: missing valid_questions.json (data.split=valid; .json files there: "
                       "dev_outputs.json, dev_questions.json, test_outputs.json, test_questions.json)")),
    "wrong_task": (lambda run, data, tmp: [f"model_dir={run / 'model'}", f"data.dir={_relabel(data, tmp)}"],
                   ("{tmp}/lamp3/dev_outputs.json: field 'task' is 'LaMP_3', but the model in {run}/model was "
                    "trained for movielens (its config.json task.name); score files of that task")),
}


def _relabel(data: Path, tmp: Path) -> Path:
    """The demo's test split as ``dev_*`` files whose outputs file says LaMP_3."""
    d = tmp / "lamp3"
    d.mkdir(exist_ok=True)
    (d / "dev_questions.json").write_bytes((data / "test_questions.json").read_bytes())
    golds = json.loads((data / "test_outputs.json").read_text())
    (d / "dev_outputs.json").write_text(json.dumps({**golds, "task": "LaMP_3"}))
    return d


@pytest.mark.parametrize("existing", [False, True], ids=["new_out_dir", "earlier_run"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_evaluate_bad_input_exits_2_plainly_and_leaves_the_out_dir(demo, tmp_path, capsys, monkeypatch, case,
                                                                   existing):
    run_dir, data, _ = demo
    monkeypatch.delenv("TAPPER_DEBUG", raising=False)
    args, message = BAD_CASES[case]
    out = tmp_path / "runs" / "eval"
    if existing:
        (out / ".hydra").mkdir(parents=True)
        (out / ".hydra" / "config.yaml").write_text("earlier: run\n")
        (out / "metrics.json").write_text('{"earlier": true}')
    before = _snapshot(out)
    code, _, err = _run_main(["evaluate", "data=lamp", *args(run_dir, data, tmp_path), f"out_dir={out}"], capsys)
    assert code == EXIT_BAD_INPUT
    assert "Traceback" not in err
    assert err.startswith("tapper evaluate: error: ")
    assert message.format(tmp=tmp_path, run=run_dir, data=data) in err
    assert len(err.strip().splitlines()) <= 4
    assert _snapshot(out) == before
    assert (tmp_path / "runs").exists() == existing
