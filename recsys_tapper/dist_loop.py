"""The data-parallel loops of a sharded job: training (Stage 1 and Stage 2) and prediction, over W ranks.

Each global batch is cut into W contiguous slices. Rank r back-propagates ``W * loss_r * n_r / n`` (n_r its
answer tokens, n the batch's): every gradient is averaged over ranks (ours, DDP's, and TorchRec's sparse
all-to-all, which divides by W), and that average is one process's gradient of the global token-mean loss on
the whole batch. So W ranks reproduce one process step for step.

Example::

    losses, resumed_from = dist_train_loop(model, samples, feats, groups, OptimConfig(), ctx, ckpt=ckpt)
    rows = predict_sharded(lambda part: predict_labels(model, feats, part, labels), test_samples, ctx)  # rank 0
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from torchrec.distributed.comm_ops import get_gradient_division

from embeddings.replicas import average_grads
from recsys_tapper.dist_checkpointer import Checkpointer
from recsys_tapper.dist_context import Ctx, DeviceFeatures, global_batches, rank_slice
from recsys_tapper.features import Sample
from recsys_tapper.model import TapperModel, train_module
from recsys_tapper.training import OptimConfig, linear_schedule

log = logging.getLogger(__name__)


def dist_train_loop(
    model: TapperModel,
    samples: list[Sample],
    feats: DeviceFeatures,
    param_groups: list[dict],
    cfg: OptimConfig,
    ctx: Ctx,
    table_opt: torch.optim.Optimizer | None = None,
    ckpt: Checkpointer | None = None,
    step_sleep_s: float = 0.0,
    desc: str = "train",
    averaged: set[int] = frozenset(),
) -> tuple[list[float], int]:
    """``training.train_loop`` over W ranks: returns (per-step global losses, step resumed from).

    ``param_groups`` hold the replicated parameters (AdamW, clipped, gradients averaged here); ``table_opt``
    steps a data-parallel table, whose gradient TorchRec's own DDP averages. A fused table updates itself
    inside ``backward``. ``averaged``: ids of parameters in ``param_groups`` whose gradient arrives averaged
    already (a data_parallel table in TorchRec's DDP): clipped and stepped here, not averaged again.
    """
    params = [p for g in param_groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: every parameter group is empty")
    if not get_gradient_division():
        raise RuntimeError("TorchRec's gradient division is off (comm_ops.set_gradient_division(False)); this "
                           "loop assumes sparse gradients are averaged over ranks like DDP's")
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = global_batches(len(samples), cfg.batch_size, cfg.epochs, ctx.world)
    if not batches:
        raise ValueError(f"{desc}: {len(samples)} samples give no batch for {ctx.world} ranks")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(len(batches), cfg.warmup))
    start, losses = ckpt.restore(opt, sched, table_opt) if ckpt else (0, [])
    train_model = train_module(model)
    model.train()
    for step in range(start, len(batches)):
        lo, hi = batches[step]
        batch = feats.collate(rank_slice(samples[lo:hi], ctx.rank, ctx.world))
        local_loss, (detached, n_targets) = train_model(batch)
        n_local = torch.tensor(float(n_targets), dtype=detached.dtype, device=detached.device)
        tot = torch.stack([n_local, detached * n_local])
        dist.all_reduce(tot)  # (label tokens, summed cross-entropy) over the global batch
        loss = (tot[1] / tot[0]).item()
        if not math.isfinite(loss):  # every rank sees the same value, so all raise together
            raise FloatingPointError(f"{desc}: loss is {loss} at step {step}")
        opt.zero_grad(set_to_none=True)
        if table_opt is not None:
            table_opt.zero_grad(set_to_none=True)
        # W x this rank's share of the global token-mean loss: averaged over ranks (the convention of DDP and of
        # TorchRec's sparse all-to-all), the gradient is one process's on the whole batch. Fused rows update here.
        (local_loss * (n_local * ctx.world / tot[0])).backward()
        average_grads([p for p in params if id(p) not in averaged])
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        if table_opt is not None:
            table_opt.step()
        sched.step()
        losses.append(loss)
        if ctx.rank == 0 and (step + 1) % 10 == 0:
            log.info("%s step %d/%d loss %.4f", desc, step + 1, len(batches), sum(losses[-10:]) / 10)
        if ckpt is not None and ckpt.due(step + 1, len(batches)):
            ckpt.save(opt, sched, table_opt, step + 1, losses)
        if step_sleep_s:
            time.sleep(step_sleep_s)
    model.eval()
    return losses, start


def predict_sharded(predict, samples: list[Sample], ctx: Ctx) -> list[dict] | None:
    """``predict(samples) -> rows`` (``predict_labels``, ``predict_texts``) with each rank on a slice; rows in
    sample order on rank 0, None elsewhere.

    Slices are padded to one length so every rank runs the same number of forwards (each is a collective:
    the sharded table's lookups).
    """
    per = math.ceil(len(samples) / ctx.world)
    mine = samples[ctx.rank * per : (ctx.rank + 1) * per]
    n_mine = len(mine)
    mine = mine + [samples[0]] * (per - n_mine)
    rows = predict(mine)[:n_mine]
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part] if ctx.rank == 0 else None
