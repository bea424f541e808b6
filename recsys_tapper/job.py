"""The training job, written once: load, pick users and samples, Stage 1, Stage 2, evaluate, save.

Two thin entry points run it, each with its executor (``recsys_tapper.executors``)::

    tapper demo [key=value ...]                                   # run_job(cfg, LocalExecutor())
    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train ...   # run_job(cfg, DistExecutor(...))

The stages, in order (every rank runs them all; the executor decides what a step, a reduction and a shard are):

1. splits: the train and test questions, the personalized users and their Stage-2 questions (``pipeline``);
2. features: backbone, record encoder, record bank, feature builder;
3. Stage 1: the task LoRA on other users' (query -> answer) pairs, merged and frozen;
4. the non-personalized model scored on the test questions;
5. Stage 2: P_u rows (sharded by the executor), scorer, lambdas, projection, item slots, bridge LoRA;
6. TAP-PER scored on the test questions;
7. save (main rank): metrics.json, predictions, LaMP outputs, the model directory.

``run_job`` returns the metrics dict (the same on every rank, predictions aside) with ``losses``,
``stage1_losses``, ``rows`` (the trained (U, r) table, main rank) and the executor's own summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from llm_bridge.backbone import fingerprint, load_backbone
from llm_bridge.lora import add_lora, lora_parameters, merge_lora
from llm_bridge.trunk import TrunkCache
from recsys_tapper.build import build_tapper, build_trunk
from recsys_tapper.checkpoint import save_model
from recsys_tapper.config import LAMBDA_INITS, RunConfig, check_table_optimizer
from recsys_tapper.data import LampExample, write_predictions
from recsys_tapper.errors import InputError
from recsys_tapper.evaluation import choose_readout, predict_labels, predict_texts, task_report
from recsys_tapper.executors import Executor, LocalExecutor
from recsys_tapper.features import FeatureBuilder, feature_builder
from recsys_tapper.io import atomic_write_bytes, atomic_write_text
from recsys_tapper.label_scoring import class_report, classify_rows
from recsys_tapper.model import TapperModel, lambda_report, recency_values
from recsys_tapper.pipeline import (
    data_report,
    frozen_digest,
    load_splits,
    mean_histories,
    personal_splits,
    prefill_trunk,
    rating_references,
    seed_everything,
    stage1_samples,
)
from recsys_tapper.recency_prior import init_lambdas, latest_targets, record_answers
from recsys_tapper.runmeta import run_meta
from recsys_tapper.tasks import CLASSIFICATION, RATING, get_task
from recsys_tapper.users import UserIndex
from recsys_tapper.warm_start import fit_mf, init_rows, item_index


def train_stage1(cfg: RunConfig, lm, fb: FeatureBuilder, train: list[LampExample], personalized: set[str],
                 ex: Executor | None = None):
    """Stage 1: a task LoRA on other users' (query -> answer) pairs, no history; merged and frozen. With an
    executor that keeps Stage 1 (``ex.stage1_store``: torchrun), a run of the same training config loads the
    saved LoRA instead of training it again.

    Returns (merged lm, the LoRA's state dict, the samples, seconds, per-step losses, reused)."""
    ex = ex or LocalExecutor()
    t0 = time.perf_counter()
    seed_everything(cfg.trainer.seed)
    s1 = stage1_samples(fb, train, personalized, cfg.trainer.stage1_examples, cfg.trainer.seed)
    lm = add_lora(lm, cfg.model.task_lora)
    lora = lora_parameters(lm)
    store = ex.stage1_store
    lora_file, conf_file = (store / "task_lora.safetensors", store / "config.json") if store else (None, None)
    reuse = ex.agree(bool(store) and lora_file.exists() and conf_file.exists()
                     and conf_file.read_text() == ex.fingerprint)  # rank 0 decides for all
    losses: list[float] = []
    if reuse:
        set_peft_model_state_dict(lm, load_file(lora_file, device=str(ex.device)))
    else:
        ex.broadcast(lora)
        losses, _ = ex.train(TapperModel(lm, None, None), s1, ex.features(fb), [{"params": lora}],
                             cfg.trainer.stage1, desc="stage 1 (task LoRA)")
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(lm).items()}
    if store and not reuse and ex.is_main:
        atomic_write_bytes(lora_file, save_safetensors(state))
        atomic_write_text(conf_file, ex.fingerprint)  # last: marks the LoRA above as complete
    ex.barrier()
    return merge_lora(lm), state, s1, time.perf_counter() - t0, losses, reuse


def train_stage2(cfg: RunConfig, lm, fb: FeatureBuilder, users: UserIndex, train: list[LampExample],
                 trunk: TrunkCache | None = None, resume: str | Path | None = None, ex: Executor | None = None):
    """Stage 2: P_u rows, scorer, lambdas, projection and a fresh bridge LoRA on the users' own histories
    (plus the item table when ``model.item_dim`` is set; rows warm-started from MF with ``model.warm_start``).

    ``resume``: where the executor keeps its Stage-2 state (a resume file locally, DCP checkpoints under
    torchrun). Returns (model, samples, per-step losses, seconds, trainable groups). ``lm`` gains the bridge
    LoRA layers (peft); call ``model.lm.unload()`` to get the plain backbone back."""
    ex = ex or LocalExecutor()
    t0 = time.perf_counter()
    m, t = cfg.model, cfg.trainer
    seed_everything(t.seed + 1)
    plm = add_lora(lm, m.bridge_lora, first_layer=m.prefix_layer)
    s2 = fb.stage2_samples(train, per_user=t.stage2_per_user, seed=t.seed)
    if not s2:
        raise InputError("Stage 2 has no training examples: no personalized user has a profile record after "
                         "their first (or, for tasks without labelled records, a gold-labelled train question)")
    if m.item_dim is not None:
        fb.items = item_index(s2)
    model = build_tapper(m, plm, len(users), len(fb.items or ()) if m.item_dim is not None else 0, trunk, fb.bank)
    model.item_index = fb.items if m.item_dim is not None else None
    if m.warm_start == "mf":  # every rank fits the same seeded MF before the table is sharded
        mf = fit_mf(train, m.warm_start_rank, t.seed, fb.task.output_field or "score")
        init_rows(model.tower.table.weight, users, mf.users, mf.P, mf.bu)
        if model.items is not None:
            init_rows(model.items.table.weight, fb.items, mf.items, mf.Q, mf.bi)
    for part in (model.tower.pooling, model.projector, model.items):
        if part is not None:
            ex.place(part)
    if m.projector.standardize_context:
        model.projector.fit_context(mean_histories(fb.bank.vectors, s2).to(ex.device))
    pool = model.tower.pooling
    if m.lambda_init not in LAMBDA_INITS:
        raise InputError(f"model.lambda_init {m.lambda_init!r} is not one of {LAMBDA_INITS}")
    if m.lambda_init == "data":  # every rank fits the same prior from the same samples
        init_lambdas(pool, latest_targets(s2, m.lambda_init_latest), record_answers(train, fb), fb.task)
    model.lambda_start = recency_values(pool)
    if m.pooling.content_beta is not None:  # the content term's centers: the training questions, the bank
        pool.set_centers(fb.encoder.encode([s.question for s in s2]), fb.bank.vectors)
    prefill_trunk(trunk, fb, s2, with_labels=True)
    lambdas = pool.recency_parameters()
    dense = [p for p in pool.parameters() if t.lr_lambda is None or all(p is not q for q in lambdas)]
    dense += list(model.projector.parameters())
    dense += list(model.items.up.parameters()) if model.items else []
    item_rows = list(model.items.table.parameters()) if model.items else []
    row_groups, table_opt = ex.shard_rows(model, t)  # the P_u table: the executor's to place and step
    if item_rows:  # the item table: a replicated parameter, trained like the rows under adamw
        row_groups = [{"params": [*(p for g in row_groups for p in g["params"]), *item_rows], "lr": t.lr_user,
                       "weight_decay": t.wd_user}]
    groups = [
        *row_groups,
        {"params": dense, "lr": t.lr_dense},
        *([{"params": lambdas, "lr": t.lr_lambda, "weight_decay": 0.0}] if t.lr_lambda is not None else []),
        {"params": lora_parameters(plm), "lr": t.lr_bridge},
    ]
    ex.broadcast([p for g in groups for p in g["params"]])
    tag = json.dumps([OmegaConf.to_container(OmegaConf.structured(m)), OmegaConf.to_container(OmegaConf.structured(t)),
                      fingerprint(lm), frozen_digest(lm), fb.bank.keys[:3], len(fb.bank)], default=str)
    losses, _ = ex.train(model, s2, ex.features(fb), groups, t.stage2, desc="stage 2 (personalization)",
                         table_opt=table_opt, resume=resume, resume_tag=tag)
    return model, s2, losses, time.perf_counter() - t0, groups


def score(ex: Executor, model: TapperModel, fb: FeatureBuilder, samples, task, cfg: RunConfig, desc: str,
          dev=()):
    """(report, rows, seconds) on the main rank ((None, None, seconds) elsewhere): rating tasks read the label
    distribution in one forward pass; classification and generation decode greedily.

    ``dev``: rating tasks' dev questions (answers never trained on): the headline MAE and RMSE readouts are the
    ones that score best there (``choose_readout``), reported with their dev metrics; without: argmax."""
    t0 = time.perf_counter()
    feats, bs, new = ex.features(fb), cfg.trainer.eval_batch_size, cfg.trainer.eval_max_new_tokens
    if task.kind == RATING:
        def fn(part):
            return predict_labels(model, feats, part, task.labels, batch_size=bs, desc=desc)
    elif task.kind == CLASSIFICATION:  # label-set scoring (+ greedy decoding beside it, trainer.class_readout)
        def fn(part):
            return classify_rows(model, feats, part, task, cfg.trainer.class_readout, bs, desc, new,
                                 cfg.trainer.label_norm)
    else:
        def fn(part):
            return predict_texts(model, feats, part, cfg.trainer.eval_max_new_tokens, batch_size=bs, desc=desc)
    rows = ex.predict(fn, samples)
    seconds = time.perf_counter() - t0
    dev_rows = ex.predict(fn, list(dev)) if dev else None
    if rows is None:
        return None, None, seconds
    if task.kind == CLASSIFICATION:
        return class_report(task, rows, cfg.trainer.class_readout), rows, seconds
    readout, rmse_readout, dev_metrics = choose_readout(dev_rows) if dev_rows else ("argmax", "argmax", {})
    rep = task_report(task, rows, (readout, rmse_readout))
    return {**rep, **{f"dev_{k}": v for k, v in dev_metrics.items()}, "n_dev": len(dev)}, rows, seconds


def run_job(cfg: RunConfig, ex: Executor, splits: tuple[list[LampExample], list[LampExample]] | None = None,
            evaluate: bool = True, save_model_dir: bool = True) -> dict:
    """Train Stage 1 and Stage 2, evaluate both models on the test questions, write metrics.json (main rank)."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    check_table_optimizer(cfg.trainer.table_optimizer, ex.sharding)
    seed_everything(cfg.trainer.seed)
    task = get_task(cfg.task.name)
    t_start = time.perf_counter()
    reports: list = []
    train, test = splits if splits is not None else load_splits(cfg, reports)
    chosen, test, trainees, train_chosen = personal_splits(train, test, cfg.data.n_users, task)
    out = Path(ex.agree(cfg.out_dir))  # one run directory per job, whatever each rank resolved

    lm, tok = load_backbone(cfg.model.backbone)
    view = ex.encoder_view(lm)  # taken before the backbone is placed
    lm = ex.place(lm)
    users = UserIndex(trainees)
    fb = feature_builder(cfg.model, lm, tok, task, users, train_chosen + test, encoder_lm=view, progress=ex.is_main)
    test_samples = fb.question_samples(test)
    test_ids = {ex.id for ex in test}
    dev_samples = fb.question_samples([q for q in train_chosen if q.output is not None and q.id not in test_ids]) if (
        task.kind == RATING and task.input_template is not None) else []  # Stage 2 never trains on their answers

    lm, task_lora_state, s1, stage1_s, stage1_losses, stage1_reused = train_stage1(
        cfg, lm, fb, train, set(trainees) | set(chosen), ex)
    np_rep, np_rows, np_eval_s = (score(ex, TapperModel(lm, None, None), fb, test_samples, task, cfg,
                                        "eval non-personalized", dev_samples) if evaluate else (None, None, 0.0))
    trunk = build_trunk(cfg.model, lm, task_lora_state)
    model, s2, losses, stage2_s, groups = train_stage2(cfg, lm, fb, users, train_chosen, trunk,
                                                       resume=out / "stage2_resume.safetensors", ex=ex)
    tp_rep, tp_rows, tp_eval_s = (None, None, 0.0)
    if evaluate:
        prefill_trunk(trunk, fb, test_samples + dev_samples, with_labels=False, desc="trunk cache, test prompts")
        tp_rep, tp_rows, tp_eval_s = score(ex, model, fb, test_samples, task, cfg, "eval TAP-PER", dev_samples)
        if tp_rep and "rmse_readout" in tp_rep:  # the readouts chosen on dev questions travel with the model
            cfg.model.readout, cfg.model.rmse_readout = tp_rep["readout"], tp_rep["rmse_readout"]
    rows = ex.gather_rows(model)  # a collective under torchrun: every rank calls it

    user_dim = rows.shape[1] if rows is not None else model.tower.table.cfg.dim
    result = {
        **run_meta(),
        "task": task.name,
        "n_users": len(chosen),
        "n_trained_users": len(users),
        "n_cold_test_queries": sum(r["cold"] for r in tp_rows) if tp_rows is not None else None,
        "n_test_queries": len(test_samples),
        "n_stage1_examples": 0 if stage1_reused else len(s1),
        "stage1_reused": stage1_reused,
        "n_stage2_examples": len(s2),
        "n_stage2_steps": len(losses),
        "stage2_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        **lambda_report(model),
        "table_optimizer": cfg.trainer.table_optimizer,
        **ex.summary(groups),
        "methods": {
            "non_personalized": {**(np_rep or {}), "params_per_user": 0, "train_s": stage1_s, "eval_s": np_eval_s,
                                 "wall_s": stage1_s + np_eval_s},
            "tapper": {**(tp_rep or {}), "params_per_user": user_dim, "train_s": stage2_s, "eval_s": tp_eval_s,
                       "wall_s": stage1_s + stage2_s + tp_eval_s, **lambda_report(model)},
        },
        "stage1_losses": stage1_losses,
        "losses": losses,
        "total_wall_s": time.perf_counter() - t_start,
        "data_report": data_report(reports, fb.encoder),
        "references": rating_references(test, task.output_field) if task.kind == RATING else {},
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)) if not isinstance(cfg, dict) else cfg,
    }
    if ex.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
        if save_model_dir:
            plain = RunConfig(model=cfg.model, data=cfg.data, task=cfg.task, trainer=cfg.trainer, out_dir=str(out))
            save_model(out / "model", ex.unsharded(model, rows), task_lora_state, users, fb.bank, plain,
                       histories=train_chosen + test)  # the single-process format, whichever executor trained
        if evaluate:
            for name, pred in (("non_personalized", np_rows), ("tapper", tp_rows)):  # LaMP's outputs layout
                write_predictions({r["id"]: r["pred"] for r in pred}, out / f"{name}_outputs.json", task.name)
            atomic_write_text(out / "predictions.json", json.dumps({"non_personalized": np_rows, "tapper": tp_rows}))
    ex.barrier()
    return {**result, "rows": rows, "predictions": {"non_personalized": np_rows, "tapper": tp_rows}}


def run(cfg: RunConfig, splits: tuple[list[LampExample], list[LampExample]] | None = None) -> dict:
    """``tapper demo``: the job in this process (``LocalExecutor``)."""
    return run_job(cfg, LocalExecutor(), splits)
