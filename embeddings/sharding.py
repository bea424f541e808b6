"""Shard the user tower's P_u table with TorchRec: planner, DMP, gather/load of the full table.

DMP wraps the user tower only (the frozen LLM stays outside). The P_u table is placed by the planner under a
``ParameterConstraints`` that names one sharding type; its optimizer is fused into the table's backward
(``apply_optimizer_in_backward``: FBGEMM updates the touched rows while the gradient is computed, so a
(num_users, dim) gradient is never materialized). Dense parameters are *not* wrapped in DDP here: the
caller averages their gradients (``embeddings.replicas.average_grads``), one mechanism for the pooling, the
projector and the bridge LoRA alike. DCP checkpoint directories are ``embeddings.checkpoints``.

Gradient convention: every table gradient arrives *averaged* over ranks, as DDP's do (TorchRec's
``comm_ops`` divide the pooled-embedding gradients by the world size; a ``data_parallel`` table sits in
TorchRec's own DDP). So a rank whose loss is ``W * (its share of the global loss)`` gets, after averaging,
exactly the one-process gradient of the global batch.

    sharding        where the (U, r) table lives                          devices
    table_wise      whole table on one rank                               CPU, GPU
    column_wise     (U, r/k) column slices on k ranks                     CPU, GPU
    data_parallel   replicated; TorchRec's DDP averages its gradient     CPU, GPU
    row_wise        (U/k, r) row ranges on k ranks                        GPU only (FBGEMM)

Row-wise Adagrad keeps one accumulator per row *per shard*: under ``column_wise`` each column slice has its
own, so the update differs from the unsharded table (use ``adagrad`` or ``sgd``, element-wise, to keep
column_wise identical to one process).

Example::

    dmp = shard_user_tower(tower, sharding="column_wise", optimizer="rowwise_adagrad", lr=0.05)
    user_state, context, alpha = dmp(user_kjt, history, q, bank)
    full = gather_user_table(dmp)            # (U, r) on rank 0, None elsewhere
    save_checkpoint(root, step, {"tower": dmp.state_dict(), "table_optim": dmp.fused_optimizer.state_dict()})
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection
from torchrec import optim as trec_optim
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan

# Moved to their own modules (issue 10); re-exported so ``from embeddings.sharding import ...`` keeps working.
from embeddings.checkpoints import (
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from embeddings.replicas import average_grads, broadcast_parameters
from embeddings.user_state import TABLE

__all__ = [
    "CPU_SHARDING", "GPU_SHARDING", "TABLE_OPTIMIZERS", "NoDataParallel", "ShardedUserTower", "average_grads",
    "broadcast_parameters", "checkpoint_dir", "checkpoint_step", "dense_parameters", "gather_user_table",
    "latest_checkpoint", "load_checkpoint", "load_user_table", "plan_user_table", "save_checkpoint",
    "shard_user_tower", "table_constraints", "table_optimizer", "table_state_key",
]

CPU_SHARDING = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
GPU_SHARDING = (*CPU_SHARDING, "row_wise", "table_row_wise")
TABLE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,  # FBGEMM EXACT_ROWWISE_ADAGRAD: one accumulator per row
    "adagrad": trec_optim.Adagrad,  # EXACT_ADAGRAD: one accumulator per element
    "sgd": trec_optim.SGD,  # EXACT_SGD
}
# A data_parallel table is a plain replicated parameter: the same update rules, unfused.
_DENSE_TABLE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


@contextlib.contextmanager
def _quiet():
    """Silence ShardedTensor's deprecation notice (TorchRec's state dicts still hand them out)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        yield


class NoDataParallel(DataParallelWrapper):
    """Leave the tower's dense parameters unwrapped; the training loop averages their gradients (average_grads)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


def _table_weight(module: nn.Module) -> torch.Tensor:
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection) and TABLE in m.embedding_bags:
            return m.embedding_bags[TABLE].weight
    raise ValueError(f"no EmbeddingBagCollection with a {TABLE!r} table in {type(module).__name__}")


def table_constraints(sharding: str, dim: int, world_size: int, device_type: str = "cpu",
                      optimizer: str = "rowwise_adagrad") -> dict[str, ParameterConstraints]:
    """Planner constraints for the P_u table: one sharding type; column shards of width ``dim / world_size``
    (the planner's default minimum width, 128, would keep a narrow table in one shard)."""
    allowed = GPU_SHARDING if device_type == "cuda" else CPU_SHARDING
    if sharding not in allowed:
        raise ValueError(f"sharding {sharding!r} is not available on {device_type}; choose one of {allowed}")
    if optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"table optimizer {optimizer!r} unknown; choose one of {sorted(TABLE_OPTIMIZERS)}")
    min_partition = None
    if sharding in ("column_wise", "table_column_wise"):
        width = dim // world_size
        if dim % world_size or width % 4:
            raise ValueError(f"column_wise needs the row width ({dim}) to split into {world_size} slices "
                             "whose width is a multiple of 4 (with model.warm_start=mf the width is "
                             "model.warm_start_rank + 1)")
        min_partition = width
    return {TABLE: ParameterConstraints(sharding_types=[sharding], min_partition=min_partition)}


def plan_user_table(module: nn.Module, sharding: str, device: torch.device, pg: dist.ProcessGroup | None = None,
                    optimizer: str = "rowwise_adagrad", reserve: float = 0.15) -> ShardingPlan:
    """Run TorchRec's planner on rank 0 under :func:`table_constraints` and broadcast the plan.

    ``reserve`` is the fraction of each device's memory kept out of the plan (dense parameters, activations).
    """
    pg = pg or dist.GroupMember.WORLD
    world = dist.get_world_size(pg)
    dim = _table_weight(module).shape[1]
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world))),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=table_constraints(sharding, dim, world, device.type, optimizer),
        storage_reservation=FixedPercentageStorageReservation(reserve),
    )
    return planner.collective_plan(module, [EmbeddingBagCollectionSharder()], pg)


def shard_user_tower(
    tower: nn.Module,
    sharding: str = "table_wise",
    optimizer: str = "rowwise_adagrad",
    lr: float = 0.01,
    eps: float = 1e-8,
    device: torch.device | None = None,
    pg: dist.ProcessGroup | None = None,
    reserve: float = 0.15,
) -> DistributedModelParallel:
    """Wrap ``tower`` (any module holding the ``user_state`` EBC) in DMP.

    The table keeps the rows it had before sharding (DMP would re-initialize each shard; we copy the
    unsharded rows back), so every world size starts from the same table. A table built on the ``meta``
    device is never allocated in full: each rank initializes only its shards (FBGEMM's default init). For every sharding type except
    ``data_parallel`` the table optimizer runs fused in the backward. A ``data_parallel`` table is a
    replicated parameter (returned by :func:`dense_parameters`) whose lookup TorchRec wraps in its own DDP,
    so its gradient arrives *averaged* over ranks; the caller steps it with :func:`table_optimizer`.

    Args:
        tower: module with the unsharded P_u table (e.g. ``UserTower`` or ``UserStateTable``).
        sharding: a ShardingType value; see :data:`CPU_SHARDING` and :data:`GPU_SHARDING`.
        optimizer: key of :data:`TABLE_OPTIMIZERS`.
        lr, eps: the table optimizer's learning rate and epsilon.
        device: compute device (default cpu); the process group must match (gloo for cpu, nccl for cuda).
        reserve: fraction of each device's memory the planner leaves to the rest (the LLM replica, activations).
    """
    device = device or torch.device("cpu")
    weight = _table_weight(tower)
    full = None if weight.is_meta else weight.detach()  # keeps the unsharded rows alive for the copy below
    if sharding != "data_parallel":
        kwargs = {"lr": lr} if optimizer == "sgd" else {"lr": lr, "eps": eps}
        apply_optimizer_in_backward(TABLE_OPTIMIZERS[optimizer], [weight], kwargs)
    plan = plan_user_table(tower, sharding, device, pg, optimizer, reserve)
    env = ShardingEnv.from_process_group(pg or dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(tower, env=env, device=device, plan=plan,
                                   sharders=[EmbeddingBagCollectionSharder()], data_parallel_wrapper=NoDataParallel())
    if full is not None:
        load_user_table(dmp, full)
    return dmp


class ShardedUserTower(nn.Module):
    """A DMP-wrapped tower that still reads like the plain one: ``tower.pooling``, ``tower.table`` (its
    ``ebc`` sharded), ``tower.bank``, ``tower.fused_optimizer``; calls go through DMP. These four are explicit properties; no
other attribute is forwarded to the wrapped tower.

    Example::

        model.tower = ShardedUserTower(shard_user_tower(model.tower, "column_wise"))
        model.tower.pooling.scorer        # the replicated scorer, as in a single process
    """

    def __init__(self, dmp: DistributedModelParallel) -> None:
        super().__init__()
        self.dmp = dmp

    def forward(self, *args, **kwargs):
        return self.dmp(*args, **kwargs)

    @property
    def fused_optimizer(self):
        return self.dmp.fused_optimizer

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The DMP's state dict under the plain tower's names (``table.ebc...``, ``pooling...``)."""
        out = destination if destination is not None else {}
        for k, v in self.dmp.state_dict(keep_vars=keep_vars).items():  # DMP doubles a prefix it is given
            out[prefix + k] = v
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.dmp.load_state_dict(state_dict, strict=strict)

    @property
    def pooling(self) -> nn.Module:
        """The tower's replicated time-aware pooling (the same module DMP runs)."""
        return self.dmp.module.pooling

    @property
    def table(self) -> nn.Module:
        """The tower's P_u table module, its ``ebc`` sharded by DMP."""
        return self.dmp.module.table

    @property
    def bank(self):
        """The tower's record bank (``UserTower.bank``)."""
        return self.dmp.module.bank


def table_optimizer(dmp: nn.Module, optimizer: str, lr: float, eps: float) -> torch.optim.Optimizer | None:
    """The non-fused optimizer of a ``data_parallel`` table (None for the fused sharding types)."""
    w = _table_param(dmp)
    if w is None:
        return None
    return dense_table_optimizer([w], optimizer, lr, eps)


def dense_table_optimizer(params: list[torch.Tensor], optimizer: str, lr: float, eps: float) -> torch.optim.Optimizer:
    """The non-fused twin of FBGEMM's fused update ``optimizer`` (rowwise_adagrad | adagrad | sgd) over
    ``params``: a data_parallel table's optimizer, and a single-process table's."""
    if optimizer not in _DENSE_TABLE_OPTIMIZERS:
        raise ValueError(f"no dense table optimizer {optimizer!r}; use one of {sorted(_DENSE_TABLE_OPTIMIZERS)}")
    kwargs = {"lr": lr} if optimizer == "sgd" else {"lr": lr, "eps": eps}
    return _DENSE_TABLE_OPTIMIZERS[optimizer](params, **kwargs)


def _dmp_of(module: nn.Module) -> DistributedModelParallel:
    """The DMP inside ``module`` (its own state_dict and named_parameters use the same names)."""
    for m in module.modules():
        if isinstance(m, DistributedModelParallel):
            return m
    raise ValueError(f"no DistributedModelParallel inside {type(module).__name__}")


def _table_param(module: nn.Module) -> nn.Parameter | None:
    """The replicated table parameter of a data_parallel plan, else None."""
    dmp = _dmp_of(module)
    key = table_state_key(dmp)
    if isinstance(dmp.state_dict()[key], ShardedTensor):
        return None
    return dict(dmp.named_parameters())[key]


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that every rank holds in full: all but the sharded table (a ``data_parallel`` table
    is one of them). The same list, in the same order, on every rank."""
    sharded: set[int] = set()
    for m in module.modules():
        if isinstance(m, DistributedModelParallel):
            state = m.state_dict(keep_vars=True)
            sharded |= {id(p) for n, p in m.named_parameters() if isinstance(state.get(n), ShardedTensor)}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in sharded]


def table_state_key(module: nn.Module) -> str:
    """The state_dict key of the P_u table (``...embedding_bags.user_state.weight``)."""
    suffix = f"embedding_bags.{TABLE}.weight"
    keys = [k for k in module.state_dict(keep_vars=True) if k.endswith(suffix)]
    if len(keys) != 1:
        raise ValueError(f"expected one {suffix!r} in the state dict, found {keys}")
    return keys[0]


def _local_shards(value: torch.Tensor) -> list[tuple[tuple[slice, slice], torch.Tensor]]:
    """[(slices into the full table, local tensor)] for a ShardedTensor or a replicated tensor."""
    if isinstance(value, ShardedTensor):
        out = []
        for s in value.local_shards():
            (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
            out.append(((slice(r0, r0 + nr), slice(c0, c0 + nc)), s.tensor))
        return out
    return [((slice(None), slice(None)), value)]


def gather_user_table(model: nn.Module, dst: int = 0) -> torch.Tensor | None:
    """Assemble the full (num_users, dim) P_u table on rank ``dst`` (CPU float tensor); None on other ranks.

    A collective: every rank must call it. Works for every sharding type and for an unsharded module
    (which needs no process group).
    """
    value = model.state_dict()[table_state_key(model)]
    if not isinstance(value, ShardedTensor):
        if dist.is_initialized() and dist.get_rank() != dst:
            return None
        return value.detach().cpu().clone()
    with _quiet():
        rows, cols = value.size()
        shards = value.local_shards()
        device = shards[0].tensor.device if shards else torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        out = torch.empty(rows, cols, dtype=value.dtype, device=device) if dist.get_rank() == dst else None
        value.gather(dst=dst, out=out)
    return None if out is None else out.cpu()


@torch.no_grad()
def load_user_table(model: nn.Module, full) -> None:
    """Copy a full (num_users, dim) table into this rank's shards; every rank passes the same table.

    ``full`` is a tensor or a safetensors slice (``safe_open(path, "pt").get_slice(name)``): with a slice each
    rank reads only its own rows and columns from the file.
    """
    key = table_state_key(model)
    value = model.state_dict()[key]
    shape = tuple(full.shape) if isinstance(full, torch.Tensor) else tuple(full.get_shape())
    with _quiet():
        size = tuple(value.size())
    if size != shape:
        raise ValueError(f"table is {size}, got rows of shape {shape}")
    for (rs, cs), local in _local_shards(value):
        local.copy_(full[rs, cs])
    model.load_state_dict({key: value}, strict=False)
