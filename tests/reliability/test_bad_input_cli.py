"""Bad input through the CLI: a few plain lines on stderr, exit code 2, no traceback, the out dir as it was.

Every case runs in-process (``recsys_tapper.cli.main``) twice: into an out dir that does not exist (it must
not exist afterwards) and into one that holds an earlier run's files (they must be byte-identical
afterwards). Two subprocess runs check the real entry points (``python -m recsys_tapper``, torchrun's module).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recsys_tapper.cli import main
from recsys_tapper.errors import EXIT_BAD_INPUT, InputError
from recsys_tapper.runner import execute
from tests.conftest import copy_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny", "trainer=smoke", "data=lamp", "task=lamp3", "data.n_users=2", "trainer.stage1_examples=4"]


def _rec(uid: str, i: int, **kw) -> dict:
    return {"id": f"{uid}_{i}", "text": f"review {i} of {uid}", "score": str(1 + i % 5),
            "date": f"2014-05-{10 + i:02d}", **kw}


def _question(uid: str, n: int = 3, **kw) -> dict:
    return {"id": uid, "input": f"review: what {uid} thinks", "date": "2014-06-01",
            "profile": [_rec(uid, i) for i in range(n)], **kw}


def _lamp_dir(d: Path, dev: list[dict], train: list[dict] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """train_* and dev_* files of LaMP-3 (configs/data/lamp.yaml: train_split=train, test_split=dev)."""
    d.mkdir(parents=True, exist_ok=True)
    train = train if train is not None else [_question("t1"), _question("t2")]
    for split, qs in (("train", train), ("dev", dev)):
        files = {f"{split}_questions.json": qs,
                 f"{split}_outputs.json": {"task": "LaMP_3", "golds": [{"id": q["id"], "output": "4"} for q in qs]}}
        for name, obj in files.items():
            if name not in skip:
                (d / name).write_text(json.dumps(obj))
    return d


def _good_dev() -> list[dict]:
    return [_question("u1"), _question("u2")]


def _snapshot(d: Path) -> dict[str, bytes] | None:
    if not d.exists():
        return None
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# (id, dev questions or a callable(tmp_path) -> data dir, extra overrides, expected message after the file name)
def _dev_case(dev, skip=()):
    return lambda tmp: _lamp_dir(tmp / "data", dev, skip=skip)


DEMO_CASES = {
    "missing_field": (_dev_case([_question("u1", profile=[_rec("u1", 0), {"id": "u1_1", "text": "t"}])]), [],
                      "dev_questions.json: question 'u1' profile record 'u1_1': field 'score' missing"),
    "bad_date": (_dev_case([_question("u1", date="31/12/2014")]), [],
                 ("dev_questions.json: question 'u1': field 'date' cannot parse date '31/12/2014': month must be "
                 "in 1..12")),
    "after_query": (_dev_case([_question("u1", profile=[_rec("u1", 0), _rec("u1", 1, date="2014-07-01")])]), [],
                    ("dev_questions.json: question 'u1' profile record 'u1_1': field 'date' 2014-07-01T00:00:00 is "
                    "dated after the query (2014-06-01T00:00:00)")),
    "future_undated": (_dev_case([{**_question("u1", profile=[_rec("u1", 0), _rec("u1", 1, date="2999-01-01")]),
                                   "date": None}]), [],
                       ("dev_questions.json: question 'u1' profile record 'u1_1': field 'date' 2999-01-01T00:00:00 "
                       "is in the future (now ")),
    "short_profile": (_dev_case([_question("u1", n=1)]), [],
                      ("dev_questions.json: question 'u1': field 'profile' has 1 usable record(s); Stage 2 of "
                      "LaMP-3 needs at least 2 (a target record after a record of history)")),
    "bad_gold": (lambda tmp: _bad_gold(tmp), [],
                 "dev_outputs.json: gold 'u1': field 'output' value '9' is not in the LaMP-3 label set"),
    "missing_files": (_dev_case(_good_dev(), skip=("dev_outputs.json",)), [],
                      ("missing dev_outputs.json (data.train_split=train, data.test_split=dev; .json files there: "
                      "dev_questions.json, train_outputs.json, train_questions.json)")),
    "no_such_dir": (lambda tmp: tmp / "nowhere", [], "nowhere: no such directory"),
    "mistyped_key": (_dev_case(_good_dev()), ["trainer.stage2_per_usr=3"],
                     "Key 'stage2_per_usr' not in 'TrainerConfig'"),
    "wrong_type": (_dev_case(_good_dev()), ["data.n_users=many"], "data.n_users"),
    "unknown_task": (_dev_case(_good_dev()), ["task.name=LaMP-9"], "task.name 'LaMP-9' is not a task; known: "),
    "unknown_group_option": (_dev_case(_good_dev()), ["model=huge"], "Could not find 'model/huge'"),
    "unknown_table_optimizer": (_dev_case(_good_dev()), ["trainer.table_optimizer=adam"],
                                "trainer.table_optimizer 'adam' is not one of adamw, rowwise_adagrad, adagrad, sgd"),
    "unknown_label_norm": (_dev_case(_good_dev()), ["trainer.label_norm=max"],
                           "trainer.label_norm 'max' is not one of mean, sum"),
    "prefix_layer_past_depth": (_dev_case(_good_dev()), ["model.prefix_layer=2"],
                                ("model.prefix_layer=2 is not a decoder layer of backbone 'tiny-random-llama' "
                                 "(depth 2: use 0 .. 1)")),
}


def _bad_gold(tmp: Path) -> Path:
    d = _lamp_dir(tmp / "data", _good_dev())
    (d / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "u1", "output": "9"},
                                                                                {"id": "u2", "output": "4"}]}))
    return d


def _earlier_run(out: Path) -> None:
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("earlier: run\n")
    (out / ".hydra" / "overrides.yaml").write_text("- earlier=run\n")
    (out / "metrics.json").write_text('{"earlier": true}')


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("existing", [False, True], ids=["new_out_dir", "earlier_run"])
@pytest.mark.parametrize("case", DEMO_CASES)
def test_demo_bad_input_exits_2_plainly_and_leaves_the_out_dir(tmp_path, capsys, monkeypatch, case, existing):
    make_data, extra, message = DEMO_CASES[case]
    monkeypatch.delenv("TAPPER_DEBUG", raising=False)
    data = make_data(tmp_path)
    out = tmp_path / "runs" / "demo"
    if existing:
        _earlier_run(out)
    before = _snapshot(out)
    code, _, err = _run_main(["demo", *TINY, f"data.dir={data}", f"out_dir={out}", *extra], capsys)
    assert code == EXIT_BAD_INPUT
    assert "Traceback" not in err and "Error executing job" not in err
    assert err.startswith("tapper demo: error: ")
    assert message in err
    assert err.rstrip().endswith("(run with --debug or TAPPER_DEBUG=1 for the traceback)")
    assert len(err.strip().splitlines()) <= 6  # a few plain lines
    assert _snapshot(out) == before
    assert (tmp_path / "runs").exists() == existing  # not even the parent is left behind


def test_data_lamp_without_data_dir_names_the_key(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run_main(["demo", "model=tiny", "data=lamp", f"out_dir={out}"], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert "tapper demo: error: data.source=lamp needs data.dir, the folder with the LaMP JSON files" in err
    assert not out.exists()


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    data = _lamp_dir(tmp_path / "data", [_question("u1", n=1)])
    out = tmp_path / "out"
    argv = ["demo", *TINY, f"data.dir={data}", f"out_dir={out}"]
    with pytest.raises(InputError, match="has 1 usable record"):
        main([*argv, "--debug"])
    assert not out.exists()  # undone before re-raising
    monkeypatch.setenv("TAPPER_DEBUG", "1")
    with pytest.raises(InputError, match="has 1 usable record"):
        main(argv)
    monkeypatch.setenv("TAPPER_DEBUG", "0")
    assert _run_main(argv, capsys)[0] == EXIT_BAD_INPUT


def test_unexpected_errors_keep_their_traceback_and_run_files(tmp_path):
    out = tmp_path / "out"

    def boom(cfg):
        raise RuntimeError("a bug, not bad input")

    from recsys_tapper.config import register

    with pytest.raises(RuntimeError, match="a bug, not bad input"):
        execute("tapper demo", "demo", ["model=tiny", f"out_dir={out}", "data.n_users=3"], boom, register=register)
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    assert (out / ".hydra" / "overrides.yaml").read_text() == f"- model=tiny\n- out_dir={out}\n- data.n_users=3\n"


def test_a_good_run_writes_its_run_files(tmp_path, capsys):
    out = tmp_path / "out"
    seen = {}

    def task(cfg):
        seen["files"] = sorted(p.name for p in (out / ".hydra").iterdir())
        seen["n_users"] = cfg.data.n_users

    from recsys_tapper.config import register

    assert execute("tapper demo", "demo", ["model=tiny", f"out_dir={out}", "data.n_users=3"], task,
                   register=register, log_level=logging.WARNING) == 0
    assert seen == {"files": ["config.yaml", "overrides.yaml"], "n_users": 3}  # written before the task runs
    assert "n_users: 3" in (out / ".hydra" / "config.yaml").read_text()


def test_update_with_events_already_in_the_model(model_dir, tmp_path, capsys):
    mdir = copy_model(model_dir, tmp_path)
    events = tmp_path / "again.parquet"
    pd.DataFrame([("syn0", "syn0_3", "film | drama", "5", 86400.0 * 100)],
                 columns=["user_id", "record_id", "text", "label", "timestamp"]).to_parquet(events)
    before = _snapshot(mdir)
    code, _, err = _run_main(["update", f"model_dir={mdir}", f"events={events}", "now=20000.0"], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert (f"tapper update: error: {events}: row 0: record ('syn0', 'syn0_3') is already in the model "
            "(records are immutable)") in err
    assert _snapshot(mdir) == before


def test_export_and_import_of_something_that_is_not_a_model(tmp_path, capsys):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    code, _, err = _run_main(["export", f"model_dir={nothing}", f"out={tmp_path / 'exp'}"], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert f"{nothing}: no manifest.json; not a recsys-tapper model directory" in err
    assert not (tmp_path / "exp").exists()
    code, _, err = _run_main(["import", f"export_dir={nothing}", f"model_dir={nothing}"], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err  # CheckpointError or embeddings' ExportError
    assert str(nothing) in err
    assert _snapshot(nothing) == {}


def test_unknown_command_and_option(capsys):
    assert _run_main(["trian"], capsys)[0] == EXIT_BAD_INPUT
    code, _, err = _run_main(["demo", "--cfg", "job"], capsys)
    assert code == EXIT_BAD_INPUT and "unknown option '--cfg'" in err


def test_benchmark_checks_names_before_any_work(tmp_path, capsys):
    out = tmp_path / "bench"
    code, _, err = _run_main(["benchmark", "ml1m", f"out_dir={out}", f"results_dir={out}/results"], capsys)
    assert code == EXIT_BAD_INPUT and "target 'ml1m' is not a benchmark target; available: ml100k" in err
    code, _, err = _run_main(["benchmark", "ml100k", "methods=[tapper,nope]", f"out_dir={out}"], capsys)
    assert code == EXIT_BAD_INPUT and "methods/rerun: unknown nope; known: global_mean" in err
    assert not out.exists()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TAPPER_DEBUG")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@pytest.mark.parametrize("module", ["recsys_tapper", "recsys_tapper.dist_train"])
def test_entry_points_in_a_subprocess(tmp_path, module):
    data = _lamp_dir(tmp_path / "data", [_question("u1", profile=[_rec("u1", 0), {"id": "u1_1", "text": "t"}])])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", module, *(["demo"] if module == "recsys_tapper" else []), *TINY,
           f"data.dir={data}", f"out_dir={out}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    assert f"{data / 'dev_questions.json'}: question 'u1' profile record 'u1_1': field 'score' missing" in proc.stderr
    assert not out.exists()


def test_torchrun_entry_refuses_adamw_on_a_sharded_table(tmp_path):
    """adamw needs a data_parallel table under torchrun: named before any work, nothing left behind."""
    data = _lamp_dir(tmp_path / "data", _good_dev())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "recsys_tapper.dist_train", *TINY, f"data.dir={data}", f"out_dir={out}",
           "trainer.table_optimizer=adamw", "dist.sharding=column_wise"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert ("trainer.table_optimizer=adamw trains the P_u rows as a dense parameter: use dist.sharding=data_parallel, "
            "or a fused optimizer (rowwise_adagrad, adagrad, sgd) with dist.sharding=column_wise") in proc.stderr
    assert not out.exists()


def test_top_level_help_imports_nothing_heavy():
    code = ("import sys; sys.argv = ['tapper', '--help']\n"
            "from recsys_tapper.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'torchrec', 'transformers', 'hydra', 'omegaconf') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "commands: demo, evaluate, export, import, update, benchmark, serve, explain, params" in proc.stdout


def test_command_help_shows_only_that_commands_options(capsys):
    code, out, _ = _run_main(["export", "--help"], capsys)
    assert code == 0
    assert "usage: tapper export" in out and "model_dir: runs/demo/model\nout: exports/demo\ndtype: fp32" in out
    assert "config groups" not in out and "trainer" not in out and "stage2" not in out
    code, out, _ = _run_main(["demo", "-h"], capsys)
    assert code == 0 and "  trainer: demo, smoke" in out and "stage2_per_user: 15" in out


def test_run_files_undo_restores_an_out_dir_without_run_files(tmp_path):
    from recsys_tapper.runner import RunFiles

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    files = RunFiles(out, {".hydra/config.yaml": "a: 1\n", ".hydra/overrides.yaml": "[]\n"})
    files.write()
    assert (out / ".hydra" / "config.yaml").read_text() == "a: 1\n"
    files.undo()
    assert _snapshot(out) == {"notes.txt": b"mine"} and not (out / ".hydra").exists()
