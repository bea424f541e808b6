"""The process group and the per-rank view of a sharded job: who am I, which device, which slice of a batch.
(The executor that runs the job over them is ``dist_executor.DistExecutor``.)

- ``init_distributed`` joins torchrun's group, or creates a group of one for plain ``python -m``.
- ``DeviceFeatures`` is the FeatureBuilder seen from a rank's device: collated batches live there.
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
    """The FeatureBuilder seen from ``device``: same collate, batches moved there (``Batch.to``). The record
    bank is the tower's, which moves its vectors to its own device."""

    def __init__(self, fb: FeatureBuilder, device: torch.device) -> None:
        self.fb, self.device, self.tok = fb, device, fb.tok

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
