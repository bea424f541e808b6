"""How the job's stages run: the executor interface and the local (single-process) executor.

The job (``recsys_tapper.job``) is written once against :class:`Executor`; the executors differ only in how they
step, reduce and shard:

    what                 LocalExecutor (tapper demo)            DistExecutor (torchrun, dist_executor.py)
    rank / world         0 / 1                                  torchrun's, gloo or nccl
    train                training.train_loop (whole batch)      dist_loop.dist_train_loop (batch slices, all-reduce)
    P_u table            a plain parameter                      sharded by TorchRec DMP (planner, fused optimizer)
    predict              every sample                           a slice per rank, gathered on rank 0
    checkpoint           a resume file (Stage 2)                DCP checkpoints (Stage 2)

The P_u rows' optimizer is ``trainer.table_optimizer``, the same in both:

- ``adamw``: the rows sit in the job's AdamW (``lr_user``, ``wd_user``, the linear schedule, clipped with the
  dense parameters). Under torchrun this needs a ``data_parallel`` table (the rows are then a replicated
  parameter); table_wise/column_wise tables train with a fused optimizer.
- ``rowwise_adagrad`` | ``adagrad`` | ``sgd``: FBGEMM's fused update under torchrun; locally the same update
  (torchrec's RowWiseAdagrad, torch's Adagrad/SGD): constant ``table_lr``, no weight decay, no clipping.

Example::

    result = run_job(cfg, LocalExecutor())                       # == tapper demo
    result = run_job(cfg, DistExecutor(ctx, cfg.dist, out_dir))  # == torchrun -m recsys_tapper.dist_train
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from embeddings.sharding import dense_table_optimizer
from recsys_tapper.config import TrainerConfig
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.model import TapperModel
from recsys_tapper.training import OptimConfig, train_loop


def table_lr(t: TrainerConfig) -> float:
    return t.table_lr if t.table_lr is not None else t.lr_user


class Executor(Protocol):
    """What the job needs from where it runs. ``predict`` returns rows on the main rank, None elsewhere."""

    rank: int
    world: int
    device: torch.device
    stage1_store: Path | None  # where a finished Stage 1 is kept for a resumed run (None: not kept)
    fingerprint: str  # what a resumed run must share with what it resumes
    sharding: str | None  # the P_u table's TorchRec sharding type (None: not sharded)

    @property
    def is_main(self) -> bool: ...

    def encoder_view(self, lm): ...

    def place(self, module: torch.nn.Module) -> torch.nn.Module: ...

    def features(self, fb: FeatureBuilder): ...

    def broadcast(self, params: list[torch.Tensor]) -> None: ...

    def shard_rows(self, model: TapperModel, t: TrainerConfig) -> tuple[list[dict], torch.optim.Optimizer | None]: ...

    def train(self, model: TapperModel, samples: list[Sample], feats, groups: list[dict], cfg: OptimConfig,
              desc: str, table_opt: torch.optim.Optimizer | None = None, resume: Path | None = None,
              resume_tag: str = "") -> tuple[list[float], int]: ...

    def predict(self, fn, samples: list[Sample]) -> list[dict] | None: ...

    def gather_rows(self, model: TapperModel) -> torch.Tensor | None: ...

    def unsharded(self, model: TapperModel, rows: torch.Tensor) -> TapperModel: ...

    def agree(self, value): ...

    def barrier(self) -> None: ...

    def summary(self, groups: list[dict]) -> dict: ...


class LocalExecutor:
    """One process, every sample, a plain P_u table."""

    rank, world, device = 0, 1, torch.device("cpu")
    is_main = True
    stage1_store, fingerprint, sharding = None, "", None

    def encoder_view(self, lm):
        return lm

    def place(self, module):
        return module

    def features(self, fb: FeatureBuilder) -> FeatureBuilder:
        return fb

    def broadcast(self, params) -> None:
        pass

    def shard_rows(self, model: TapperModel, t: TrainerConfig) -> tuple[list[dict], torch.optim.Optimizer | None]:
        """(param groups for the job's AdamW, the rows' own optimizer or None)."""
        rows = list(model.tower.table.parameters())
        if t.table_optimizer == "adamw":
            return [{"params": rows, "lr": t.lr_user, "weight_decay": t.wd_user}], None
        return [], dense_table_optimizer(rows, t.table_optimizer, table_lr(t), t.table_eps)

    def train(self, model, samples, feats, groups, cfg, desc, table_opt=None, resume=None, resume_tag=""):
        return train_loop(model, samples, feats, groups, cfg, desc=desc, table_opt=table_opt, resume=resume,
                          resume_tag=resume_tag), 0

    def predict(self, fn, samples):
        return fn(samples)

    def gather_rows(self, model: TapperModel) -> torch.Tensor:
        return model.tower.table.weight.detach().clone()

    def unsharded(self, model: TapperModel, rows: torch.Tensor) -> TapperModel:
        return model

    def agree(self, value):
        return value

    def barrier(self) -> None:
        pass

    def summary(self, groups) -> dict:
        return {"executor": "local", "world_size": 1}
