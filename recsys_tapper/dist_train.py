"""Distributed TAP-PER training: the P_u table sharded by TorchRec (DMP), the frozen LLM replicated per rank.

Two ranks on CPU (gloo), one process (world size 1), and the same with a column-wise table::

    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train model=tiny trainer=smoke data.n_users=8 out_dir=runs/dist
    python -m recsys_tapper.dist_train model=tiny trainer=smoke data.n_users=8 out_dir=runs/dist1
    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train dist.sharding=column_wise dist.checkpoint_every=20

Running the same command again into the same ``out_dir`` resumes from the newest complete checkpoint.

How the work is divided (world size W, global batch B = ``trainer.stage2.batch_size``):

- Every rank holds the frozen backbone, the record bank and the feature builder (deterministic, identical).
- ``DistributedModelParallel`` wraps the user tower only. The planner places the P_u table
  (``dist.sharding``); its optimizer is ``trainer.table_optimizer``, as in a single process: a fused FBGEMM
  update inside the backward (rowwise_adagrad, this config's default; adagrad; sgd: constant learning rate,
  no weight decay or clipping), or AdamW with a ``data_parallel`` table (the single-process default).
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

``train_distributed(cfg)`` is importable; tests call it under ``elastic_launch``. This module is only the entry
point: the job is ``recsys_tapper.job.run_job`` (the same stages ``tapper demo`` runs), with
``dist_executor.DistExecutor`` (process group, DMP, batch slices), ``dist_loop`` (the data-parallel training
and prediction loops) and ``dist_checkpointer`` (resume state).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from embeddings.checkpoints import latest_checkpoint
from recsys_tapper.config import RunConfig
from recsys_tapper.dist_checkpointer import training_fingerprint
from recsys_tapper.dist_executor import DistExecutor, init_distributed
from recsys_tapper.job import run_job

log = logging.getLogger(__name__)


@dataclass
class DistConfig:
    """Args:
    sharding: the P_u table's sharding type: table_wise | column_wise | data_parallel (row_wise on CUDA).
        The table's optimizer is ``trainer.table_optimizer`` (adamw needs data_parallel).
    backend: process-group backend; None = nccl with CUDA, gloo without.
    checkpoint_every: DCP checkpoint every K Stage-2 steps and at the end (0 = never); keep the newest N.
    resume: continue from the newest complete checkpoint under out_dir/checkpoints.
    evaluate: score the test questions after training (every rank takes a slice).
    save_model: rank 0 gathers the table and writes out_dir/model in the single-process format.
    step_sleep_s: sleep after every step; only to give crash tests a window to kill a run mid-training.
    """

    sharding: str = "table_wise"
    backend: str | None = None
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


def train_distributed(cfg: DistRunConfig, splits=None) -> dict:
    """``run_job`` under torchrun: Stage 1 + sharded Stage 2 (+ sharded eval); every rank returns the summary.

    Rank 0 writes ``metrics.json`` (and ``model/``) into ``cfg.out_dir``. The summary's ``losses`` are the
    global per-step Stage-2 losses; ``table`` (rank 0 only, else None) is the gathered (U, r) table and
    ``predictions`` TAP-PER's prediction rows (rank 0 only).
    """
    ctx, created = init_distributed(cfg.dist.backend)
    try:
        box = [cfg.out_dir]
        dist.broadcast_object_list(box, src=0)  # one run directory per job, whatever each rank resolved
        out = Path(box[0])
        if not cfg.dist.resume and (latest_checkpoint(out / "checkpoints") or (out / "stage1").exists()):
            raise FileExistsError(f"{out} holds checkpoints of an earlier run and dist.resume=false: "
                                  "pick another out_dir or delete them")
        ex = DistExecutor(ctx, cfg.dist, out, training_fingerprint(cfg))
        result = run_job(cfg, ex, splits, evaluate=cfg.dist.evaluate, save_model_dir=cfg.dist.save_model)
        if ctx.rank == 0:
            log.info("stage 2: %d steps, final loss %.4f; wrote %s", result["n_stage2_steps"],
                     result["stage2_final_loss"], out / "metrics.json")
        return {**result, "table": result["rows"], "predictions": result["predictions"]["tapper"]}
    finally:
        if created:
            dist.destroy_process_group()


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
