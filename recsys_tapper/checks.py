"""Config checks run before any work: a bad value fails in a second with the key named, not after the backbone
has loaded (or deep inside a run with a message that names neither key nor file).

Data files themselves are validated by the loaders (``recsys_tapper.data``); here only their presence::

    check_run_config(cfg)   # InputError: data.dir /data/LaMP_3: missing dev_outputs.json (found: ...)
    check_evaluate_config(cfg)   # InputError: model_dir runs/x/model: no such directory (...)
"""

from __future__ import annotations

from pathlib import Path

from recsys_tapper.errors import InputError

DATA_SOURCES = ("ml100k", "lamp")


def lamp_files(train_split: str, test_split: str, task_trains_on_questions: bool) -> list[str]:
    """The files ``data.source=lamp`` reads from ``data.dir``: both splits' questions and the test golds; the
    train golds too when Stage 1/2 train on questions (LaMP-1/-7), else they are optional."""
    need = [f"{train_split}_questions.json", f"{test_split}_questions.json", f"{test_split}_outputs.json"]
    return need + [f"{train_split}_outputs.json"] if task_trains_on_questions else need


def check_run_config(cfg) -> None:
    """Check ``task.name``, ``data.source`` and, for ``lamp``, that ``data.dir`` holds the files it needs.

    Args:
        cfg: a ``RunConfig`` (or ``DistRunConfig``).

    Raises:
        InputError: naming the key, the directory and the missing files.
    """
    from recsys_tapper.tasks import TASKS

    task = TASKS.get(cfg.task.name)
    if task is None:
        raise InputError(f"task.name {cfg.task.name!r} is not a task; known: {', '.join(sorted(TASKS))}")
    if cfg.data.source not in DATA_SOURCES:
        raise InputError(f"data.source {cfg.data.source!r} is not one of {', '.join(DATA_SOURCES)}")
    from recsys_tapper.config import LAMBDA_INITS, check_table_optimizer

    check_table_optimizer(cfg.trainer.table_optimizer, getattr(getattr(cfg, "dist", None), "sharding", None))
    if cfg.model.lambda_init not in LAMBDA_INITS:
        raise InputError(f"model.lambda_init {cfg.model.lambda_init!r} is not one of null, data")
    latest = cfg.model.lambda_init_latest
    if latest is not None and (latest < 1 or cfg.model.lambda_init != "data"):
        raise InputError(f"model.lambda_init_latest={latest} needs model.lambda_init=data and a count >= 1")
    check_readout(cfg.trainer)
    check_prefix_layer(cfg.model)
    from recsys_tapper.features import check_text_weighting

    check_text_weighting(cfg.model.text_weighting)
    if cfg.data.source == "lamp":
        need = lamp_files(cfg.data.train_split, cfg.data.test_split, task.input_template is None)
        _check_lamp_dir(cfg.data.dir, need, f"data.train_split={cfg.data.train_split}, "
                                            f"data.test_split={cfg.data.test_split}")


def check_readout(trainer) -> None:
    """``trainer.class_readout`` and ``trainer.label_norm`` name a known classification readout."""
    from recsys_tapper.label_scoring import CLASS_READOUTS, LABEL_NORMS

    if trainer.class_readout not in CLASS_READOUTS:
        raise InputError(f"trainer.class_readout {trainer.class_readout!r} is not one of {', '.join(CLASS_READOUTS)}")
    if trainer.label_norm not in LABEL_NORMS:
        raise InputError(f"trainer.label_norm {trainer.label_norm!r} is not one of {', '.join(LABEL_NORMS)}")


def check_prefix_layer(model) -> None:
    """``model.prefix_layer`` names a decoder layer of the backbone (0 .. depth - 1), checked before Stage 1
    rather than when the trunk is built after it."""
    from llm_bridge.backbone import num_layers

    k, name = model.prefix_layer, model.backbone.name_or_path
    n = num_layers(name)
    if k < 0 or (n is not None and k >= n):
        bound = f"0 .. {n - 1}" if n is not None else ">= 0"
        raise InputError(f"model.prefix_layer={k} is not a decoder layer of backbone {name!r} "
                         f"({'depth ' + str(n) if n is not None else 'depth unknown'}: use {bound})")


def _check_lamp_dir(data_dir: str | None, need: list[str], splits: str) -> None:
    """``data.dir`` is set, exists and holds the files ``need`` (named when missing, with what is there)."""
    if not data_dir:
        raise InputError("data.source=lamp needs data.dir, the folder with the LaMP JSON files")
    d = Path(data_dir)
    if not d.is_dir():
        raise InputError(f"data.dir {d}: no such directory")
    missing = [name for name in need if not (d / name).is_file()]
    if missing:
        found = sorted(p.name for p in d.glob("*.json"))
        raise InputError(f"data.dir {d}: missing {', '.join(missing)} ({splits}; .json files there: "
                         f"{', '.join(found) or 'none'})")


def check_benchmark_config(cfg) -> None:
    """``target`` and ``methods``/``rerun`` names, then the run config checks."""
    from recsys_tapper.benchmark import METHOD_NAMES

    if cfg.target != "ml100k":
        raise InputError(f"target {cfg.target!r} is not a benchmark target; available: ml100k, drift")
    unknown = [m for m in [*cfg.methods, *cfg.rerun] if m not in METHOD_NAMES]
    if unknown:
        raise InputError(f"methods/rerun: unknown {', '.join(unknown)}; known: {', '.join(METHOD_NAMES)}")
    check_run_config(cfg)


def check_evaluate_config(cfg) -> None:
    """``tapper evaluate``: ``model_dir`` is a saved model, ``batch_size`` is positive, ``data.source`` is known
    and, for ``lamp``, ``data.dir`` holds the split's questions file (its outputs file is optional).

    Args:
        cfg: an ``EvaluateConfig``.

    Raises:
        InputError: naming the key and the path.
    """
    m = Path(cfg.model_dir)
    if not (m / "manifest.json").is_file():
        what = "no manifest.json; not a recsys-tapper model directory" if m.is_dir() else "no such directory"
        raise InputError(f"model_dir {m}: {what} (a demo saves its model to <out_dir>/model)")
    for key in ("batch_size", "max_new_tokens"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise InputError(f"{key} {getattr(cfg, key)} must be at least 1 (or null: the model's own)")
    if cfg.data.source not in DATA_SOURCES:
        raise InputError(f"data.source {cfg.data.source!r} is not one of {', '.join(DATA_SOURCES)}")
    if cfg.data.source == "lamp":
        split = cfg.data.split or cfg.data.test_split
        _check_lamp_dir(cfg.data.dir, [f"{split}_questions.json"], f"data.split={split}")
