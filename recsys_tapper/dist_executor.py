"""The job's executor under torchrun (``recsys_tapper.executors.Executor``): DMP for the P_u table, the
data-parallel loops of ``dist_loop``, DCP checkpoints of ``dist_checkpointer``; the process group and the
per-rank view (``Ctx``, batch slices, device shims) are ``dist_context``.

Example::

    ctx, created = init_distributed()
    result = run_job(cfg, DistExecutor(ctx, cfg.dist, out_dir, training_fingerprint(cfg)))
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from embeddings.replicas import broadcast_parameters
from embeddings.sharding import (
    ShardedUserTower,
    _table_param,
    gather_user_table,
    shard_user_tower,
    table_optimizer,
)
from embeddings.tower import UserTower
from embeddings.user_state import UserStateConfig, UserStateTable
from recsys_tapper.dist_checkpointer import Checkpointer
from recsys_tapper.dist_context import CpuEmbeddings, Ctx, DeviceFeatures, init_distributed, replica_drift
from recsys_tapper.dist_loop import dist_train_loop, predict_sharded
from recsys_tapper.executors import table_lr
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.model import TapperModel

__all__ = ["DistExecutor", "init_distributed", "unsharded_model"]


class DistExecutor:
    """The job's executor under torchrun (``recsys_tapper.executors.Executor``): every rank walks the same
    global batches and takes its slice; the P_u table goes into DMP; dense parts are replicas whose gradients
    are averaged; rank 0 writes.

    ``dist_cfg``: ``dist_train.DistConfig`` (sharding, backend, checkpoints); ``out``: the run directory;
    ``fingerprint``: what a resumed run must share with its checkpoints and its saved Stage-1 LoRA."""

    def __init__(self, ctx: Ctx, dist_cfg, out, fingerprint: str) -> None:
        self.ctx, self.cfg, self.out, self.fingerprint = ctx, dist_cfg, out, fingerprint
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        self.sharding = dist_cfg.sharding
        self.resumed_from = 0
        self.stage1_store = out / "stage1"
        self._feats: dict[int, DeviceFeatures] = {}
        self._sharded = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def encoder_view(self, lm):
        return CpuEmbeddings(lm)

    def place(self, module):
        return module.to(self.device)

    def features(self, fb: FeatureBuilder) -> DeviceFeatures:
        if id(fb) not in self._feats:  # one device view per builder: the bank is copied once
            self._feats[id(fb)] = DeviceFeatures(fb, self.device)
        return self._feats[id(fb)]

    def broadcast(self, params) -> None:
        broadcast_parameters(params)

    def shard_rows(self, model, t):
        """The tower into DMP: a fused table optimizer updates the rows inside backward (table_wise,
        column_wise); a data_parallel table is a replicated parameter, in the job's AdamW (adamw) or its own."""
        fused = t.table_optimizer if t.table_optimizer != "adamw" else "sgd"  # adamw: the DP table is stepped here
        model.tower = ShardedUserTower(shard_user_tower(model.tower, self.cfg.sharding, fused, lr=table_lr(t),
                                                        eps=t.table_eps, device=self.device))
        self._sharded = model
        if t.table_optimizer == "adamw":
            w = _dp_table(model.tower)
            return [{"params": [w], "lr": t.lr_user, "weight_decay": t.wd_user}], None
        return [], table_optimizer(model.tower, t.table_optimizer, table_lr(t), t.table_eps)

    def train(self, model, samples, feats, groups, cfg, desc, table_opt=None, resume=None, resume_tag=""):
        """``dist_train_loop``; Stage 2 (``resume`` given) checkpoints under ``out/checkpoints``."""
        ckpt = None
        if resume is not None:
            ckpt = Checkpointer(self.out / "checkpoints", self.cfg.checkpoint_every, self.cfg.keep_checkpoints,
                                model, self.ctx, fingerprint=self.fingerprint)
        # a data_parallel table in the job's AdamW: TorchRec's DDP has averaged its gradient already
        averaged = {id(_dp_table(model.tower))} if self._sharded is model else set()
        losses, start = dist_train_loop(model, samples, feats, groups, cfg, self.ctx, table_opt=table_opt,
                                        ckpt=ckpt, step_sleep_s=self.cfg.step_sleep_s if ckpt else 0.0, desc=desc,
                                        averaged=averaged)
        if ckpt is not None:
            self.resumed_from = start
        return losses, start

    def predict(self, fn, samples):
        return predict_sharded(fn, samples, self.ctx)

    def gather_rows(self, model):
        return gather_user_table(model.tower)

    def unsharded(self, model, rows):
        return unsharded_model(model, rows)

    def agree(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def summary(self, groups) -> dict:
        return {"executor": "torchrun", "world_size": self.world, "backend": dist.get_backend(),
                "sharding": self.cfg.sharding, "resumed_from_step": self.resumed_from,
                "replica_max_diff": replica_drift([p for g in groups for p in g["params"]])}


def _dp_table(tower):
    """The replicated P_u parameter of a data_parallel tower (None for the fused sharding types)."""
    return _table_param(tower)


def unsharded_model(model, table: torch.Tensor):
    """A single-process TapperModel with the gathered (U, r) table and the trained dense parts."""
    user_table = UserStateTable(UserStateConfig(num_users=table.shape[0], dim=table.shape[1]))
    with torch.no_grad():
        user_table.weight.copy_(table)
    tower = UserTower(user_table, model.tower.pooling, model.tower.bank)
    out = TapperModel(model.lm, tower, model.projector, model.prefix_layer, model.trunk, model.items)
    out.item_index = model.item_index
    return out
