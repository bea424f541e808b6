"""Training loops for Stage 1 (task LoRA, no history) and Stage 2 (personalization).

Both use AdamW with a linear warm-up/decay schedule and gradient-norm clipping, as in the paper. The loss is
causal-LM cross-entropy on the answer tokens only (the batch's labels are -100 elsewhere), owned by the train
wrapper ``model.TapperTrain`` that the loop steps.

Example::

    losses = train_loop(model, samples, fb, param_groups, OptimConfig(lr=1e-4), desc="stage 2")
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.io import atomic_write_bytes
from recsys_tapper.model import TapperModel, train_module


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
    model: TapperModel | torch.nn.Module,
    samples: Sequence[Sample],
    fb: FeatureBuilder,
    param_groups: list[dict],
    cfg: OptimConfig,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
    resume: str | Path | None = None,
    save_every: int = 200,
    resume_tag: str = "",
    table_opt: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Run ``cfg.epochs`` passes; returns the per-step losses. Raises on a non-finite loss.

    With ``resume`` (a safetensors path) the trainable parameters, AdamW moments, step, losses and RNG state are
    saved there every ``save_every`` steps (atomically); a later call with the same samples and settings picks
    up after the last saved step and gives the same result as an uninterrupted run. The file is removed when
    the loop finishes. ``resume_tag`` adds what else the file must match (e.g. the run config and the frozen
    backbone's fingerprint). ``table_opt``: a second optimizer (the P_u rows' own, see ``executors``), stepped
    after AdamW with its constant learning rate; its parameters are not in ``param_groups`` nor clipped."""
    params = [p for g in param_groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: every parameter group is empty")
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, cfg.warmup))
    train_model = train_module(model)
    model.train()
    losses: list[float] = []
    saved = params + ([p for g in table_opt.param_groups for p in g["params"]] if table_opt is not None else [])
    opts = [opt] if table_opt is None else [opt, table_opt]
    key = _resume_key(samples, saved, cfg, resume_tag)
    start = _load_resume(resume, key, saved, opts, sched, losses) if resume is not None else 0
    bar = tqdm(total=total, initial=start, desc=desc, leave=False)
    step = 0
    for _ in range(cfg.epochs):
        for i in range(0, len(samples), cfg.batch_size):
            if step < start:
                step += 1
                continue
            batch = fb.collate(samples[i : i + cfg.batch_size])
            loss, _ = train_model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            if table_opt is not None:
                table_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            if table_opt is not None:
                table_opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if resume is not None and step % save_every == 0 and step < total:
                _save_resume(resume, key, step, saved, opts, losses)
            if on_step is not None:
                on_step(step - 1, losses[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    if resume is not None and Path(resume).exists():
        Path(resume).unlink()
    return losses


def _resume_key(samples: Sequence[Sample], params: list, cfg: OptimConfig, tag: str) -> str:
    """What a resume file must match: the samples in order, the parameter shapes, the optimizer settings, tag."""
    h = hashlib.sha256(json.dumps([asdict(cfg), [list(p.shape) for p in params], tag]).encode())
    for s in samples:
        h.update(f"{s.id}\x00{s.user}\x00{s.answer}\x00".encode())
    return h.hexdigest()


def _owner(opts: list, p) -> torch.optim.Optimizer:
    """The optimizer of ``opts`` that steps ``p``."""
    return next(o for o in opts if any(q is p for g in o.param_groups for q in g["params"]))


def _save_resume(path, key: str, step: int, params: list, opts: list, losses: list[float]) -> None:
    tensors = {f"p{i}": p.detach().contiguous() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for name, v in _owner(opts, p).state.get(p, {}).items():
            tensors[f"s{i}.{name}"] = torch.as_tensor(v).detach().contiguous()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    tensors["rng"] = torch.get_rng_state()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), save(tensors, metadata={"key": key, "step": str(step)}))


def _load_resume(path, key: str, params: list, opts: list, sched, losses: list[float]) -> int:
    """Restore a resume file into params/opt/sched/losses; returns the step to continue from (0: none)."""
    path = Path(path)
    if not path.exists():
        return 0
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            raise ValueError(f"{path}: a resume file of other samples or settings; remove it to start afresh")
        names = set(f.keys())
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(f.get_tensor(f"p{i}"))
                state = {n.split(".", 1)[1]: f.get_tensor(n) for n in names if n.startswith(f"s{i}.")}
                if state:
                    _owner(opts, p).state[p] = state
        losses += f.get_tensor("losses").tolist()
        torch.set_rng_state(f.get_tensor("rng"))
        step = int(meta["step"])
    with warnings.catch_warnings():  # replay the schedule (no optimizer step is due)
        warnings.simplefilter("ignore")
        for _ in range(step):
            sched.step()
    return step
