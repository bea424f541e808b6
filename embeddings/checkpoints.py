"""DCP checkpoints of a sharded training run, written atomically and found again on resume.

Layout under ``root``: ``step_00000012/`` (complete: its ``.metadata`` is written last) and
``.tmp_step_00000012/`` (a save in progress, or one a crash interrupted; never read). Every rank writes its own
shards (``torch.distributed.checkpoint``); rank 0 renames the temp directory and keeps the newest ``keep``.

Example::

    save_checkpoint(root, step, {"tower": dmp.state_dict(), "table_optim": dmp.fused_optimizer.state_dict()})
    path = latest_checkpoint(root)                  # None before the first complete save
    state = load_checkpoint(path, template_state)   # filled in place; checkpoint_step(path) == step
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from embeddings.atomic import fsync_dir as _fsync_dir

_CKPT_PREFIX = "step_"


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The directory of the complete checkpoint of ``step``: ``root/step_00000012``."""
    return Path(root) / f"{_CKPT_PREFIX}{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temp dirs of an interrupted save are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX)
                  and (p / ".metadata").exists())
    return done[-1] if done else None


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint directory holds (``step_00000012`` -> 12)."""
    return int(Path(path).name[len(_CKPT_PREFIX):])


def save_checkpoint(root: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save ``state`` (ShardedTensors, tensors, plain objects) with DCP, atomically.

    Every rank writes its shards into ``.tmp_step_N``; after a barrier rank 0 renames it to ``step_N`` (a
    crash before the rename leaves the previous checkpoint as the latest) and keeps the ``keep`` newest.
    A collective: every rank must call it with the same ``root`` and ``step``.
    """
    root = Path(root)
    final, tmp = checkpoint_dir(root, step), root / f".tmp_{_CKPT_PREFIX}{step:08d}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)  # FileSystemWriter fsyncs each file; .metadata is written last
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX))
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, state: dict) -> dict:
    """Load a DCP checkpoint into ``state`` in place (tensors and shards are filled; objects replaced)."""
    dcp.load(state, checkpoint_id=Path(path))
    return state
