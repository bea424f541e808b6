"""Stage-2 training state of a sharded run <-> ``out_dir/checkpoints/step_N`` (DCP, every rank its shards).

A checkpoint holds the tower (its table shards), projector, bridge LoRA, the dense AdamW state, the table
optimizer's state (fused, or the data-parallel table's), the schedule, each rank's RNG and the loss history.
A run resumes only from a checkpoint of the same world size and the same :func:`training_fingerprint`.

Example::

    ckpt = Checkpointer(out / "checkpoints", every=20, keep=2, model=model, ctx=ctx, fingerprint=fp)
    start, losses = ckpt.restore(opt, sched, table_opt)          # (0, []) without a checkpoint
    if ckpt.due(step, total):
        ckpt.save(opt, sched, table_opt, step, losses)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from embeddings.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from recsys_tapper.dist_context import Ctx
from recsys_tapper.model import TapperModel

log = logging.getLogger(__name__)


def _init_adamw_state(opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's lazily created state so a checkpoint can be loaded into it in place."""
    for g in opt.param_groups:
        for p in g["params"]:
            if not opt.state.get(p):
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}


def _optim_tensors(opt: torch.optim.Optimizer | None, names: dict[int, str]) -> dict[str, torch.Tensor]:
    if opt is None:
        return {}
    return {f"{names[id(p)]}/{k}": v for g in opt.param_groups for p in g["params"]
            for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}


class Checkpointer:
    """Stage-2 training state <-> ``out_dir/checkpoints/step_N`` (DCP)."""

    def __init__(self, root: Path, every: int, keep: int, model: TapperModel, ctx: Ctx, fingerprint: str = "") -> None:
        """``fingerprint``: what a resumed run must share with the saved one (the training config)."""
        self.root, self.every, self.keep, self.model, self.ctx = root, every, keep, model, ctx
        self.fingerprint = fingerprint
        self.names = {id(p): n for n, p in model.named_parameters()}

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    def _state(self, opt, sched, table_opt, step: int, losses: list[float]) -> dict:
        m = self.model
        state = {
            "tower": m.tower.state_dict(),
            "projector": m.projector.state_dict(),
            **({"items": m.items.state_dict()} if m.items is not None else {}),
            "bridge_lora": {n: p.detach() for n, p in m.lm.named_parameters() if "lora_" in n},
            "dense_optim": _optim_tensors(opt, self.names),
            "table_optim_dp": _optim_tensors(table_opt, self.names),
            "sched": sched.state_dict(),
            "progress": {"step": step, "losses": list(losses), "world": self.ctx.world, "config": self.fingerprint},
            f"rng_rank{self.ctx.rank}": torch.get_rng_state(),
        }
        if self.ctx.device.type == "cuda":
            state[f"cuda_rng_rank{self.ctx.rank}"] = torch.cuda.get_rng_state(self.ctx.device)
        fused = m.tower.fused_optimizer.state_dict()
        if fused.get("state"):  # a rank without a shard of the table has none (table_wise)
            state["table_optim"] = fused
        return state

    def save(self, opt, sched, table_opt, step: int, losses: list[float]) -> Path:
        path = save_checkpoint(self.root, step, self._state(opt, sched, table_opt, step, losses), self.keep)
        if self.ctx.rank == 0:
            log.info("checkpoint step %d -> %s", step, path)
        return path

    def restore(self, opt, sched, table_opt) -> tuple[int, list[float]]:
        """Load the newest complete checkpoint, if any; returns (steps done, their losses)."""
        path = latest_checkpoint(self.root)
        found = [str(path) if path else ""]
        dist.broadcast_object_list(found, src=0)  # every rank loads the checkpoint rank 0 saw
        if not found[0]:
            return 0, []
        path = Path(found[0])
        progress = load_checkpoint(path, {"progress": {"step": 0, "losses": [], "world": 0, "config": ""}})["progress"]
        if progress["world"] != self.ctx.world or progress["config"] != self.fingerprint:
            raise ValueError(f"{path} was saved by a run with another world size ({progress['world']}) or training "
                             f"config; resume with the same ones, or use another out_dir")
        _init_adamw_state(opt)
        state = load_checkpoint(path, self._state(opt, sched, table_opt, 0, []))
        m = self.model
        m.tower.load_state_dict(state["tower"])
        m.projector.load_state_dict(state["projector"])
        if m.items is not None:
            m.items.load_state_dict(state["items"])
        if "table_optim" in state:
            m.tower.fused_optimizer.load_state_dict(state["table_optim"])
        sched.load_state_dict(state["sched"])
        for g, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
            g["lr"] = lr
        torch.set_rng_state(state[f"rng_rank{self.ctx.rank}"])
        if self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"cuda_rng_rank{self.ctx.rank}"], self.ctx.device)
        step, losses = state["progress"]["step"], state["progress"]["losses"]
        if self.ctx.rank == 0:
            log.info("resumed from %s (step %d)", path, step)
        return step, list(losses)


def training_fingerprint(cfg) -> str:
    """The ``DistRunConfig`` a resumed run must share with the checkpoint's (not out_dir, eval, save or pacing knobs)."""
    conf = OmegaConf.to_container(OmegaConf.structured(cfg))
    conf.pop("out_dir", None)
    for k in ("resume", "evaluate", "save_model", "step_sleep_s", "keep_checkpoints", "checkpoint_every", "backend"):
        conf["dist"].pop(k, None)
    conf["trainer"].pop("eval_batch_size", None)
    conf["trainer"].pop("threads", None)
    return json.dumps(conf, sort_keys=True, default=str)
