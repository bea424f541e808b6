"""``tapper evaluate``: score a saved model on LaMP-format files, without training.

    tapper evaluate model_dir=runs/demo/model data=lamp data.dir=/data/LaMP_3 [data.split=dev] [out_dir=runs/eval]
    tapper evaluate model_dir=runs/demo/model data=ml100k          # the demo's MovieLens test split and 100 users

The task is the saved model's (its ``config.json``); an outputs file of another task is refused by name. Each
question is answered with its own profile as the visible history. A user with a trained row is served by
``P_u + P_q``; any other user is served cold (``P_u = 0``, P_q from the profile: the paper's rule, the demo's
and ``tapper serve``'s default), and ``served_by`` counts the questions of each kind. Profile records the
record bank lacks are encoded into it in memory (a record is known by user and record id; the model directory
is never changed). Scoring is the demo's: same feature builder, same batch size, same prediction functions, so
on the demo's own test split (``data.n_users`` as in the demo) the metrics equal the demo's TAP-PER metrics.

Writes into ``out_dir``: ``tapper_outputs.json`` (LaMP's outputs layout), ``predictions.json``
(``{"tapper": rows}``, as the demo's) and ``metrics.json``. Without ``{split}_outputs.json`` the predictions
are written and ``metrics.json`` says that metrics need golds.

Example::

    result = evaluate_saved(EvaluateConfig("runs/demo/model", EvaluateDataConfig("lamp", "data/LaMP_3"), "runs/ev"))
    result["methods"]["tapper"]["mae"], result["served_by"]            # 0.87, {"row": 480, "cold": 20}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from recsys_tapper.checkpoint import CheckpointError, load_model
from recsys_tapper.checks import check_evaluate_config
from recsys_tapper.config import DataConfig
from recsys_tapper.data import build_movielens_lamp, canonical_task, load_lamp, write_predictions
from recsys_tapper.errors import InputError
from recsys_tapper.evaluation import predict_labels, predict_texts, task_report
from recsys_tapper.features import saved_feature_builder
from recsys_tapper.io import atomic_write_text
from recsys_tapper.model import lambda_report
from recsys_tapper.pipeline import data_report, format_table, prefill_trunk, rating_references, select_users
from recsys_tapper.runmeta import run_meta
from recsys_tapper.tasks import RATING, get_task

LAMP2 = {"LaMP-2", "LaMP-2M", "LaMP-2N"}  # one family: the loader accepts any of them for another
NO_GOLDS = "no gold outputs ({}): predictions written; metrics need golds"


@dataclass
class EvaluateDataConfig(DataConfig):
    """The files to score (``source``, ``dir``, ``strict``, ``max_text_chars`` as in ``DataConfig``).

    Args:
        split: ``{dir}/{split}_questions.json`` is scored, with ``{split}_outputs.json`` when it exists
            (None: ``test_split``, i.e. ``dev`` for ``data=lamp``, ``test`` for ``data=ml100k``).
        n_users: score only the questions of the N users with the longest profiles (the demo's choice;
            None = every question). ``train_split`` is not read.
    """

    split: str | None = None


@dataclass
class EvaluateConfig:
    """Args:
    model_dir: a saved model directory (``<demo out_dir>/model``); its task and backbone are used.
    data: the files to score (``configs/data/*.yaml`` + ``split``).
    out_dir: where metrics.json, tapper_outputs.json, predictions.json go.
    batch_size / max_new_tokens: None = the model's ``trainer.eval_batch_size`` / ``eval_max_new_tokens``.
    allow_fingerprint_mismatch: load a model directory trained on another backbone.
    """

    model_dir: str = "runs/demo/model"
    data: EvaluateDataConfig = field(default_factory=EvaluateDataConfig)
    out_dir: str = "runs/evaluate"
    batch_size: int | None = None
    max_new_tokens: int | None = None
    allow_fingerprint_mismatch: bool = False


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def split_files(data: EvaluateDataConfig) -> tuple[Path, Path]:
    """(questions, outputs) paths of the split to score; the outputs file may not exist."""
    split = data.split or data.test_split
    if data.source == "ml100k":
        paths = build_movielens_lamp()
        if split not in paths:
            raise InputError(f"data.split {split!r}: ml100k has the splits {', '.join(paths)}")
        return tuple(Path(p) for p in paths[split])
    d = Path(data.dir)
    return d / f"{split}_questions.json", d / f"{split}_outputs.json"


def saved_task(model_dir: str | Path) -> str:
    """The task a saved model was trained for (``config.json``'s ``task.name``), read without loading it."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())["task"]["name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the model's task.name ({type(e).__name__}: {e})") from None


def check_task(outputs: Path, task: str, model_dir: str | Path) -> None:
    """An outputs file whose ``task`` is another than the model's is refused (the LaMP-2 family is one task,
    as for the loader). A file that cannot be read is left to the loader, which names what is wrong."""
    try:
        file_task = json.loads(outputs.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        return
    canon = canonical_task(file_task) if isinstance(file_task, str) else None
    if canon is not None and canon != task and not {canon, task} <= LAMP2:
        raise InputError(f"{outputs}: field 'task' is {file_task!r}, but the model in {model_dir} was trained "
                         f"for {task} (its config.json task.name); score files of that task")


def evaluate_saved(cfg: EvaluateConfig, command: str | None = None) -> dict:
    """Score ``cfg.model_dir`` on one split's questions; write and return the metrics (layout: module doc).

    Args:
        cfg: what to score, where to write.
        command: the command line recorded in ``run_meta`` (None: this process's).
    """
    t_start = time.perf_counter()
    check_evaluate_config(cfg)
    task = get_task(saved_task(cfg.model_dir))
    questions, outputs = split_files(cfg.data)
    has_golds = outputs.is_file()
    if has_golds:
        check_task(outputs, task.name, cfg.model_dir)
    examples, report = load_lamp(questions, outputs if has_golds else None, task=task.name, strict=cfg.data.strict,
                                 max_text_chars=cfg.data.max_text_chars)
    chosen = set(select_users(examples, cfg.data.n_users))
    examples = [ex for ex in examples if ex.user_id in chosen]
    if not examples:
        raise InputError(f"{questions}: no question to score")

    model, tok, users, bank, saved = load_model(cfg.model_dir, cfg.allow_fingerprint_mismatch)
    fb = saved_feature_builder(saved.model, model, tok, task, bank, users)
    n_new_records = fb.register(examples, progress=True)  # unseen users' (and new) records, in memory only
    samples = fb.question_samples(examples)
    batch_size = cfg.batch_size or saved.trainer.eval_batch_size
    prefill_trunk(model.trunk, fb, samples, with_labels=False, desc="trunk cache, prompts")
    t0 = time.perf_counter()
    if task.kind == RATING:  # as job.score, which the demo scores with
        rows = predict_labels(model, fb, samples, task.labels, batch_size=batch_size, desc="evaluate")
    else:
        rows = predict_texts(model, fb, samples, cfg.max_new_tokens or saved.trainer.eval_max_new_tokens,
                             batch_size=batch_size, desc="evaluate")
    eval_s = time.perf_counter() - t0

    served = {"row": sum(not r["cold"] for r in rows), "cold": sum(r["cold"] for r in rows)}
    methods = {}
    if has_golds:
        readouts = (saved.model.readout, saved.model.rmse_readout)  # as the training run chose on dev questions
        methods["tapper"] = {**task_report(task, rows, readouts), "params_per_user": model.tower.table.cfg.dim,
                             "train_s": 0.0, "eval_s": eval_s, "wall_s": eval_s, **lambda_report(model)}
    result = {
        "task": task.name,
        "model_dir": str(cfg.model_dir),
        "data": {"source": cfg.data.source, "split": cfg.data.split or cfg.data.test_split,
                 "questions": str(questions), "outputs": str(outputs) if has_golds else None},
        "n_users": len(chosen),
        "n_trained_users": sum(users.row(u) is not None for u in chosen),
        "n_test_queries": len(samples),
        "n_cold_test_queries": served["cold"],
        "served_by": served,
        "cold_start": "zero",
        "n_new_records": n_new_records,
        "methods": methods,
        "metrics_note": None if has_golds else NO_GOLDS.format(f"{outputs} does not exist"),
        "total_wall_s": time.perf_counter() - t_start,
        "data_report": data_report([report], fb.encoder),
        "references": rating_references(examples, task.output_field) if has_golds and task.kind == RATING else {},
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "run_meta": run_meta(command),
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions({r["id"]: r["pred"] for r in rows}, out / "tapper_outputs.json", task.name)
    atomic_write_text(out / "predictions.json", json.dumps({"tapper": rows}))
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    return result


def summary(result: dict) -> str:
    """The demo's table (or the no-golds note) and the served_by counts."""
    head = format_table(result) if result["methods"] else result["metrics_note"]
    s = result["served_by"]
    return f"{head}\nserved by a trained row: {s['row']} queries, cold (P_u = 0): {s['cold']}"
