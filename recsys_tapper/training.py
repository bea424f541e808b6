"""Training loops for Stage 1 (task LoRA, no history) and Stage 2 (personalization).

Both use AdamW with a linear warm-up/decay schedule and gradient-norm clipping, as in the paper. The loss is
causal-LM cross-entropy on the answer tokens only (the batch's labels are -100 elsewhere).

Example::

    losses = train_loop(model, samples, fb, bank, param_groups, OptimConfig(lr=1e-4), desc="stage 2")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.model import TapperModel


@dataclass
class OptimConfig:
    """Args:
    lr: base learning rate (param groups may carry their own).
    epochs: passes over the samples.
    batch_size: samples per step.
    weight_decay, warmup (fraction of steps), clip (max grad norm): the paper's 0.01, 0.1, 0.3.
    """

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 0.3


def linear_schedule(total: int, warmup_frac: float) -> Callable[[int], float]:
    warm = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def train_loop(
    model: TapperModel,
    samples: Sequence[Sample],
    fb: FeatureBuilder,
    param_groups: list[dict],
    cfg: OptimConfig,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run ``cfg.epochs`` passes; returns the per-step losses. Raises on a non-finite loss."""
    params = [p for g in param_groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: every parameter group is empty")
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, cfg.warmup))
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, leave=False)
    step = 0
    for _ in range(cfg.epochs):
        for i in range(0, len(samples), cfg.batch_size):
            batch = fb.collate(samples[i : i + cfg.batch_size])
            out = model(batch, fb.bank.vectors)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"{desc}: loss is {out.loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses
