"""The process group and the per-rank view of a sharded job: who am I, which device, which slice of a batch.

- ``init_distributed`` joins torchrun's group, or creates a group of one for plain ``python -m``.
- ``DeviceFeatures`` is the FeatureBuilder seen from a rank's device: collated batches and the bank live there.
- ``CpuEmbeddings`` lets the record encoder stay on CPU while the backbone sits on an accelerator.
- ``global_batches`` / ``rank_slice`` cut the samples: every rank walks the same global batches and takes
  its own contiguous slice of each.

Example::

    ctx, created = init_distributed()                 # Ctx(rank, world, device)
    for lo, hi in global_batches(len(samples), 16, epochs=1, world=ctx.world):
        batch = feats.collate(rank_slice(samples[lo:hi], ctx.rank, ctx.world))
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from embeddings.record_bank import RecordBank
from recsys_tapper.features import Batch, FeatureBuilder


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> tuple[Ctx, bool]:
    """Join (or, without torchrun's env, create a one-process) group; returns (ctx, created_here)."""
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m ...`: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        created = True
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Ctx(dist.get_rank(), dist.get_world_size(), device), created


class DeviceFeatures:
    """The FeatureBuilder seen from ``device``: same collate, batches (``Batch.to``) and bank moved there."""

    def __init__(self, fb: FeatureBuilder, device: torch.device) -> None:
        self.fb, self.device, self.tok = fb, device, fb.tok
        self.bank = RecordBank(fb.bank.d)
        self.bank.vectors = fb.bank.vectors.to(device)

    def collate(self, samples, with_labels: bool = True) -> Batch:
        batch = self.fb.collate(samples, with_labels)
        return batch if self.device.type == "cpu" else batch.to(self.device)


class CpuEmbeddings:
    """Lets TextEncoder run on CPU (it builds CPU token ids) while the backbone sits on an accelerator."""

    def __init__(self, lm) -> None:
        self.embed = copy.deepcopy(lm.get_input_embeddings()).cpu()

    def get_input_embeddings(self):
        return self.embed


def global_batches(n: int, batch_size: int, epochs: int, world: int) -> list[tuple[int, int]]:
    """(start, end) of every global batch; a last batch smaller than the world size is dropped."""
    one = [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    return [b for b in one if b[1] - b[0] >= world] * epochs


def rank_slice(items: list, rank: int, world: int) -> list:
    """Contiguous slice ``rank`` of ``world``; sizes differ by at most one."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


@torch.no_grad()
def replica_drift(params: list[torch.Tensor]) -> float:
    """Largest |rank r - rank 0| over the replicated parameters (0.0 when the replicas agree bit for bit)."""
    flat = torch._utils._flatten_dense_tensors([p.detach() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    drift = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return drift.item()


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
        from embeddings.replicas import broadcast_parameters

        broadcast_parameters(params)

    def shard_rows(self, model, t):
        """The tower into DMP: a fused table optimizer updates the rows inside backward (table_wise,
        column_wise); a data_parallel table is a replicated parameter, in the job's AdamW (adamw) or its own."""
        from embeddings.sharding import ShardedUserTower, shard_user_tower, table_optimizer
        from recsys_tapper.executors import table_lr

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
        from recsys_tapper.dist_checkpointer import Checkpointer
        from recsys_tapper.dist_loop import dist_train_loop

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
        from recsys_tapper.dist_loop import predict_sharded

        return predict_sharded(fn, samples, self.ctx)

    def gather_rows(self, model):
        from embeddings.sharding import gather_user_table

        return gather_user_table(model.tower)

    def unsharded(self, model, rows):
        from recsys_tapper.dist_train import unsharded_model

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
    from embeddings.sharding import _table_param

    return _table_param(tower)
