"""Distributed TAP-PER training: the P_u table sharded by TorchRec (DMP), the frozen LLM replicated per rank.

Two ranks on CPU (gloo), one process (world size 1), and the same with a column-wise table::

    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train model=tiny trainer=smoke data.n_users=8 out_dir=runs/dist
    python -m recsys_tapper.dist_train model=tiny trainer=smoke data.n_users=8 out_dir=runs/dist1
    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train dist.sharding=column_wise dist.checkpoint_every=20

Running the same command again into the same ``out_dir`` resumes from the newest complete checkpoint.

How the work is divided (world size W, global batch B = ``trainer.stage2.batch_size``):

- Every rank holds the frozen backbone, the record bank and the feature builder (deterministic, identical).
- ``DistributedModelParallel`` wraps the user tower only. The planner places the P_u table
  (``dist.sharding``); its optimizer (``dist.table_optimizer``, row-wise Adagrad by default) is fused into
  the backward, with a constant learning rate and no weight decay or clipping.
- Dense trainables (scorer, lambdas, projector, bridge LoRA) are replicas: broadcast from rank 0 once, then
  after each backward their gradients are averaged over ranks in one flat all-reduce (no DDP), clipped, and
  stepped by AdamW with the paper's linear schedule. (A ``data_parallel`` table is the exception: TorchRec
  wraps its lookup in its own DDP; the table optimizer steps it after that.)
- Each global batch is cut into W contiguous slices. Rank r back-propagates ``W * loss_r * n_r / n`` (n_r its
  answer tokens, n the batch's): every gradient is averaged over ranks (ours, DDP's, and TorchRec's sparse
  all-to-all, which divides by W), and that average is one process's gradient of the global token-mean loss
  on the whole batch. So W ranks reproduce one process step for step.
- Stage 1 (task LoRA) runs through the same data-parallel loop; rank 0 saves the task LoRA, and a resumed
  run loads it instead of training again.
- Checkpoints: ``out_dir/checkpoints/step_N`` (torch.distributed.checkpoint, every rank writes its shards,
  written to a temp dir and renamed), with the dense optimizer, schedule, per-rank RNG and loss history.
- Only rank 0 writes Hydra's files, logs, ``metrics.json`` and ``model/`` (the table gathered and saved in
  the single-process format, loadable with ``recsys_tapper.checkpoint.load_model``).

``train_distributed(cfg)`` is importable; tests call it under ``elastic_launch``. This module is the job and
its entry point; the parts live beside it: ``dist_executor`` (process group, device shims, batch slices),
``dist_loop`` (the data-parallel training and prediction loops), ``dist_checkpointer`` (resume state).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from embeddings.checkpoints import latest_checkpoint
from embeddings.pooling import TimeAwarePooling
from embeddings.record_bank import RecordBank
from embeddings.replicas import broadcast_parameters
from embeddings.sharding import (
    ShardedUserTower,
    dense_parameters,
    gather_user_table,
    shard_user_tower,
    table_optimizer,
)
from embeddings.tower import UserTower
from embeddings.user_state import UserStateConfig, UserStateTable
from llm_bridge.backbone import load_backbone
from llm_bridge.encoder import TextEncoder
from llm_bridge.lora import add_lora, lora_parameters, merge_lora
from recsys_tapper.build import build_trunk
from recsys_tapper.checkpoint import save_model
from recsys_tapper.config import RunConfig
from recsys_tapper.dist_checkpointer import Checkpointer, training_fingerprint
from recsys_tapper.dist_executor import CpuEmbeddings, Ctx, DeviceFeatures, init_distributed, replica_drift
from recsys_tapper.dist_loop import dist_train_loop, predict_sharded
from recsys_tapper.evaluation import rating_report
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.io import atomic_write_bytes, atomic_write_text
from recsys_tapper.model import TapperModel
from recsys_tapper.pipeline import (
    build_tapper,
    load_splits,
    mean_histories,
    personal_splits,
    seed_everything,
    stage1_samples,
)
from recsys_tapper.tasks import RATING, get_task
from recsys_tapper.users import UserIndex
from recsys_tapper.warm_start import fit_mf, init_rows, item_index

log = logging.getLogger(__name__)


@dataclass
class DistConfig:
    """Args:
    sharding: the P_u table's sharding type: table_wise | column_wise | data_parallel (row_wise on CUDA).
    table_optimizer: rowwise_adagrad | adagrad | sgd, fused into the table's backward.
    table_lr: its learning rate (None = trainer.lr_user); table_eps: its epsilon.
    backend: process-group backend; None = nccl with CUDA, gloo without.
    stage1: run Stage 1 (task LoRA) first; False = Stage 2 on the raw backbone.
    checkpoint_every: DCP checkpoint every K Stage-2 steps and at the end (0 = never); keep the newest N.
    resume: continue from the newest complete checkpoint under out_dir/checkpoints.
    evaluate: score the test questions after training (every rank takes a slice).
    save_model: rank 0 gathers the table and writes out_dir/model in the single-process format.
    step_sleep_s: sleep after every step; only to give crash tests a window to kill a run mid-training.
    """

    sharding: str = "table_wise"
    table_optimizer: str = "rowwise_adagrad"
    table_lr: float | None = None
    table_eps: float = 1e-8
    backend: str | None = None
    stage1: bool = True
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    evaluate: bool = True
    save_model: bool = True
    step_sleep_s: float = 0.0


@dataclass
class DistRunConfig(RunConfig):
    dist: DistConfig = field(default_factory=DistConfig)
    out_dir: str = "runs/dist"


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dist_schema", node=DistRunConfig)


def unsharded_model(model: TapperModel, table: torch.Tensor) -> TapperModel:
    """A single-process TapperModel with the gathered (U, r) table and the trained dense parts."""
    pooling: TimeAwarePooling = model.tower.pooling
    ucfg = UserStateConfig(num_users=table.shape[0], dim=table.shape[1])
    user_table = UserStateTable(ucfg)
    with torch.no_grad():
        user_table.weight.copy_(table)
    out = TapperModel(model.lm, UserTower(user_table, pooling), model.projector, model.prefix_layer, model.trunk,
                      model.items)
    out.item_index = model.item_index
    return out


# ---- the job ----


def train_distributed(cfg: DistRunConfig, splits=None) -> dict:
    """Stage 1 + sharded Stage 2 (+ sharded eval); every rank returns the same summary dict.

    Rank 0 writes ``metrics.json`` (and ``model/``) into ``cfg.out_dir``. The summary's ``losses`` are the
    global per-step Stage-2 losses; ``table`` (rank 0 only, else None) is the gathered (U, r) table.
    """
    ctx, created = init_distributed(cfg.dist.backend)
    try:
        return _train(cfg, ctx, splits)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: DistRunConfig, ctx: Ctx, splits) -> dict:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    out_box = [cfg.out_dir]
    dist.broadcast_object_list(out_box, src=0)  # one run directory per job, whatever each rank resolved
    out = Path(out_box[0])
    if not cfg.dist.resume and (latest_checkpoint(out / "checkpoints") or (out / "stage1").exists()):
        raise FileExistsError(f"{out} holds checkpoints of an earlier run and dist.resume=false: "
                              "pick another out_dir or delete them")
    seed_everything(cfg.trainer.seed)
    task = get_task(cfg.task.name)
    if task.kind != RATING:
        raise NotImplementedError(f"distributed training scores rating tasks; {task.name} is {task.kind}")
    t_start = time.perf_counter()
    train, test = splits if splits is not None else load_splits(cfg)
    chosen, test, _, train_chosen = personal_splits(train, test, cfg.data.n_users, task)  # as `tapper demo`
    chosen_set = set(chosen)

    lm, tok = load_backbone(cfg.model.backbone)
    encoder = TextEncoder(CpuEmbeddings(lm), tok, cfg.model.max_record_tokens)
    lm = lm.to(ctx.device)
    users = UserIndex(chosen)
    fb = FeatureBuilder(tok, encoder, task, RecordBank(lm.config.hidden_size), users,
                        cfg.model.max_prompt_tokens, cfg.model.max_history)
    fb.register(train_chosen + test)
    feats = DeviceFeatures(fb, ctx.device)

    # Stage 1: task LoRA, data-parallel; saved once so a resumed run does not train it again.
    lm = add_lora(lm, cfg.model.task_lora)
    stage1_file, stage1_conf = out / "stage1" / "task_lora.safetensors", out / "stage1" / "config.json"
    fingerprint = training_fingerprint(cfg)
    stage1_losses: list[float] = []
    n_stage1 = 0
    reuse = [stage1_file.exists() and stage1_conf.exists() and stage1_conf.read_text() == fingerprint]
    dist.broadcast_object_list(reuse, src=0)  # rank 0 decides for all
    if cfg.dist.stage1:
        seed_everything(cfg.trainer.seed)
        if reuse[0]:  # a resumed run: the same config already trained and saved Stage 1
            set_peft_model_state_dict(lm, load_file(stage1_file, device=str(ctx.device)))
        else:
            s1 = stage1_samples(fb, train, chosen_set, cfg.trainer.stage1_examples, cfg.trainer.seed)
            n_stage1 = len(s1)
            lora = lora_parameters(lm)
            broadcast_parameters(lora)
            stage1_losses, _ = dist_train_loop(TapperModel(lm, None, None), s1, feats, [{"params": lora}],
                                               cfg.trainer.stage1, ctx, desc="stage 1 (task LoRA)")
            if ctx.rank == 0:
                state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(lm).items()}
                atomic_write_bytes(stage1_file, save_safetensors(state))
                atomic_write_text(stage1_conf, fingerprint)  # last: marks the LoRA above as complete
            dist.barrier()
    task_lora_state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(lm).items()}
    lm = merge_lora(lm)

    # Stage 2: the tower goes into DMP; everything else is replicated.
    seed_everything(cfg.trainer.seed + 1)
    trunk = build_trunk(cfg.model, lm, task_lora_state)
    lm = add_lora(lm, cfg.model.bridge_lora, first_layer=cfg.model.prefix_layer)
    s2 = fb.profile_samples(train_chosen, per_user=cfg.trainer.stage2_per_user, seed=cfg.trainer.seed)
    if cfg.model.item_dim is not None:  # the item table is replicated (a dense module), its gradients all-reduced
        fb.items = item_index(s2)
    model = build_tapper(cfg.model, lm, len(users), len(fb.items or ()) if cfg.model.item_dim else 0, trunk)
    model.item_index = fb.items if cfg.model.item_dim is not None else None
    if cfg.model.warm_start == "mf":  # every rank fits the same seeded MF before the table is sharded
        mf = fit_mf(train_chosen, cfg.model.warm_start_rank, cfg.trainer.seed, task.output_field or "score")
        init_rows(model.tower.table.weight, users, mf.users, mf.P, mf.bu)
        if model.items is not None:
            init_rows(model.items.table.weight, fb.items, mf.items, mf.Q, mf.bi)
    if model.items is not None:
        model.items.to(ctx.device)
    model.projector.to(ctx.device)
    model.tower.pooling.to(ctx.device)
    table_lr = cfg.dist.table_lr if cfg.dist.table_lr is not None else cfg.trainer.lr_user
    model.tower = ShardedUserTower(shard_user_tower(model.tower, cfg.dist.sharding, cfg.dist.table_optimizer,
                                                    lr=table_lr, eps=cfg.dist.table_eps, device=ctx.device))
    table_opt = table_optimizer(model.tower, cfg.dist.table_optimizer, table_lr, cfg.dist.table_eps)
    table_param = {id(p) for g in (table_opt.param_groups if table_opt else []) for p in g["params"]}
    tower_dense = [p for p in dense_parameters(model.tower) if id(p) not in table_param]
    item_up = list(model.items.up.parameters()) if model.items is not None else []
    groups = [
        {"params": tower_dense + list(model.projector.parameters()) + item_up, "lr": cfg.trainer.lr_dense},
        {"params": lora_parameters(lm), "lr": cfg.trainer.lr_bridge},
    ]
    if model.items is not None:  # item rows as the single-process job trains them (user rows: the fused optimizer)
        groups.append({"params": list(model.items.table.parameters()), "lr": cfg.trainer.lr_user,
                       "weight_decay": cfg.trainer.wd_user})
    broadcast_parameters([p for g in groups for p in g["params"]])
    if cfg.model.projector.standardize_context:  # every rank holds all samples: the same statistics everywhere
        model.projector.fit_context(mean_histories(fb.bank.vectors, s2).to(ctx.device))
    ckpt = Checkpointer(out / "checkpoints", cfg.dist.checkpoint_every, cfg.dist.keep_checkpoints, model, ctx,
                        fingerprint=fingerprint)
    t0 = time.perf_counter()
    losses, resumed_from = dist_train_loop(model, s2, feats, groups, cfg.trainer.stage2, ctx, table_opt=table_opt,
                                           ckpt=ckpt, step_sleep_s=cfg.dist.step_sleep_s,
                                           desc="stage 2 (personalization)")
    stage2_s = time.perf_counter() - t0

    report, rows = {}, None
    if cfg.dist.evaluate:
        rows = predict_sharded(model, feats, fb.question_samples(test), task.labels, cfg.trainer.eval_batch_size, ctx)
        report = rating_report(rows) if ctx.rank == 0 else {}
    table = gather_user_table(model.tower)
    summary = {
        "replica_max_diff": replica_drift([p for g in groups for p in g["params"]]),
        "task": task.name,
        "world_size": ctx.world,
        "backend": dist.get_backend(),
        "sharding": cfg.dist.sharding,
        "table_optimizer": cfg.dist.table_optimizer,
        "n_users": len(chosen),
        "n_stage1_examples": n_stage1,
        "stage1_reused": bool(cfg.dist.stage1 and reuse[0]),
        "n_stage2_examples": len(s2),
        "n_stage2_steps": len(losses),
        "resumed_from_step": resumed_from,
        "stage1_losses": stage1_losses,
        "losses": losses,
        "stage2_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "tapper": report,
        "stage2_s": stage2_s,
        "total_wall_s": time.perf_counter() - t_start,
    }
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        conf = OmegaConf.to_container(OmegaConf.structured(cfg)) if not isinstance(cfg, dict) else cfg
        atomic_write_text(out / "metrics.json", json.dumps({**summary, "config": conf}, indent=2, default=str))
        if rows is not None:
            atomic_write_text(out / "predictions.json", json.dumps({"tapper": rows}))
        if cfg.dist.save_model:
            plain = RunConfig(model=cfg.model, data=cfg.data, task=cfg.task, trainer=cfg.trainer, out_dir=str(out))
            save_model(out / "model", unsharded_model(model, table), task_lora_state, users, fb.bank, plain,
                       histories=train_chosen + test)
        log.info("stage 2: %d steps, final loss %.4f; wrote %s", len(losses), summary["stage2_final_loss"],
                 out / "metrics.json")
    dist.barrier()
    return {**summary, "predictions": rows, "table": table}


# ---- Hydra entry point ----


def _main(cfg) -> None:
    run_cfg: DistRunConfig = OmegaConf.to_object(cfg)
    result = train_distributed(run_cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stage 2: {result['n_stage2_steps']} steps on {result['world_size']} rank(s), "
              f"final loss {result['stage2_final_loss']:.4f}; wrote {Path(run_cfg.out_dir) / 'metrics.json'}")


def main(argv: list[str] | None = None) -> None:
    """``python -m recsys_tapper.dist_train [key=value ...] [--debug]``; bad input exits 2 on every rank, with
    a few plain lines on stderr (prefixed ``rank r`` when there are several), as ``tapper`` does."""
    from recsys_tapper.checks import check_run_config
    from recsys_tapper.errors import debug_requested
    from recsys_tapper.runner import execute

    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    prog = "recsys_tapper.dist_train" + (f" (rank {rank})" if world > 1 else "")
    sys.argv = ["recsys_tapper.dist_train", *args]
    code = execute(prog, "dist", args, _main, register=register, check=check_run_config, debug=debug,
                   write_run_files=rank == 0,  # one run directory, written by rank 0 only
                   log_level=logging.INFO if rank == 0 else logging.WARNING)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
