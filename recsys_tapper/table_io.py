"""A saved model's P_u table in and out of an export directory (``embeddings.export``'s format).

    tapper export model_dir=runs/demo/model out=exports/demo dtype=fp32        # or fp16 / int8
    tapper import export_dir=exports/demo model_dir=runs/demo/model

``export_model`` / ``import_model`` work on a model directory (checksums verified, the manifest rewritten);
``import_into_table`` / ``import_into_module`` on an in-memory table, unsharded or DMP-sharded.

Example::

    manifest = export_model("runs/demo/model", "exports/demo", dtype="int8")
    report = import_model("exports/demo", "runs/other/model", new_users="skip")   # {"replaced", "added", "skipped"}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from embeddings.export import export_user_table, import_user_table
from embeddings.user_state import UserStateConfig, UserStateTable
from recsys_tapper.checkpoint import read_histories, rewrite_model_files, verify
from recsys_tapper.data import ProfileRecord
from recsys_tapper.errors import InputError
from recsys_tapper.users import UserIndex

TOWER_KEY = "table.ebc.embedding_bags.user_state.weight"  # the P_u table inside tower.safetensors


@dataclass
class ExportConfig:
    """Args: model_dir: a saved model directory. out: the export directory. dtype: fp32 | fp16 | int8."""

    model_dir: str = "runs/demo/model"
    out: str = "exports/demo"
    dtype: str = "fp32"


@dataclass
class ImportConfig:
    """Args:
    export_dir / model_dir: where the export is, which model directory's tower receives it.
    allow_fingerprint_mismatch: import an export made on another backbone (warns).
    new_users: an exported user the model lacks: ``add`` (table grows), ``skip`` or ``error``.
    """

    export_dir: str = "exports/demo"
    model_dir: str = "runs/demo/model"
    allow_fingerprint_mismatch: bool = False
    new_users: str = "add"



def history_stats(histories: dict[str, list[ProfileRecord]], user_ids: Sequence[str]) -> pd.DataFrame:
    """DataFrame(user_id, last_event_time [days], event_count) for the users that have a history."""
    rows = []
    for u in user_ids:
        recs = histories.get(u, [])
        dates = [r.date for r in recs if r.date is not None]
        rows.append({"user_id": u, "last_event_time": max(dates) if dates else float("nan"),
                     "event_count": len(recs)})
    return pd.DataFrame(rows, columns=["user_id", "last_event_time", "event_count"])


def export_model(model_dir: str | Path, out: str | Path, dtype: str = "fp32") -> dict:
    """Export the P_u table of a model directory (checksums verified first); returns the export manifest."""
    model_dir = Path(model_dir)
    manifest = verify(model_dir)
    weight = load_file(model_dir / "tower.safetensors")[TOWER_KEY]  # (N, D)
    ids = json.loads((model_dir / "users.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "bank.safetensors"), framework="pt") as f:
        d = f.get_slice("vectors").get_shape()[1]
    meta = {"L": cfg["model"]["projector"]["slots"], "d": d, "backbone": manifest.get("backbone"),
            "backbone_fingerprint": manifest["backbone_fingerprint"], "config": cfg,
            "source_model_manifest": manifest["files"]}
    stats = history_stats(read_histories(model_dir / "histories.parquet"), ids)
    return export_user_table(weight, ids, stats, out, meta, dtype=dtype)


def _merge_rows(
    base: torch.Tensor, ids: list[str], weight: torch.Tensor, export_ids: list[str], new_users: str, where: str
) -> tuple[torch.Tensor, list[str], dict]:
    """Exported rows replace the rows of the same users in ``base``; unknown users per ``new_users``."""
    if new_users not in ("add", "skip", "error"):
        raise InputError(f"new_users {new_users!r} must be add, skip or error")
    if weight.shape[1] != base.shape[1]:
        raise InputError(f"{where}: export rows are {weight.shape[1]} wide, the table's are {base.shape[1]}")
    index = {u: i for i, u in enumerate(ids)}
    unknown = [u for u in export_ids if u not in index]
    if unknown and new_users == "error":
        raise InputError(f"{where}: {len(unknown)} exported users are not in the model, e.g. {unknown[:3]}; "
                         "pass new_users=add or skip")
    ids = list(ids)
    if new_users == "add":
        for u in unknown:
            index[u] = len(ids)
            ids.append(u)
    out = torch.cat([base, torch.zeros(len(ids) - base.shape[0], base.shape[1], dtype=base.dtype)])
    src = [j for j, u in enumerate(export_ids) if u in index]
    dst = [index[export_ids[j]] for j in src]
    out[dst] = weight[src].to(out.dtype)
    report = {"replaced": len(export_ids) - len(unknown), "added": len(unknown) if new_users == "add" else 0,
              "skipped": len(unknown) if new_users == "skip" else 0}
    return out, ids, report


def import_model(
    export_dir: str | Path, model_dir: str | Path, allow_fingerprint_mismatch: bool = False, new_users: str = "add"
) -> dict:
    """Load an export into a model directory's tower: rows replaced (new users appended), manifest rewritten."""
    model_dir = Path(model_dir)
    manifest = verify(model_dir)
    weight, export_ids, _, _ = import_user_table(export_dir, manifest["backbone_fingerprint"],
                                                 allow_fingerprint_mismatch)
    tower = load_file(model_dir / "tower.safetensors")
    ids = json.loads((model_dir / "users.json").read_text())
    tower[TOWER_KEY], ids, report = _merge_rows(tower[TOWER_KEY], ids, weight, export_ids, new_users,
                                                str(export_dir))
    rewrite_model_files(model_dir, {"tower.safetensors": st_save({k: v.contiguous() for k, v in tower.items()}),
                                    "users.json": json.dumps(ids).encode()})
    return report


def grow_table(table: UserStateTable, num_users: int, seed: int = 0) -> UserStateTable:
    """A new table with ``num_users`` rows: the old rows copied, the new ones from N(0, init_std) (seeded)."""
    old = table.weight.shape[0]
    if num_users < old:
        raise ValueError(f"cannot shrink the table from {old} to {num_users} rows")
    if num_users == old:
        return table
    cfg = UserStateConfig(num_users=num_users, dim=table.cfg.dim, init_std=table.cfg.init_std)
    with torch.random.fork_rng(devices=[]):
        new = UserStateTable(cfg, device=table.weight.device)
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(num_users - old, cfg.dim, generator=g) * cfg.init_std  # (new, D)
    with torch.no_grad():
        new.weight.copy_(torch.cat([table.weight.detach(), extra.to(table.weight)]))
    return new


def import_into_table(
    export_dir: str | Path,
    table: UserStateTable,
    users: UserIndex,
    expected_fingerprint: str | None = None,
    allow_fingerprint_mismatch: bool = False,
    new_users: str = "error",
) -> tuple[UserStateTable, dict]:
    """Load an export into an in-memory, unsharded table. Returns ``(table, report)``: the same table, or a
    larger one when ``new_users="add"`` appended users (``users`` gains them). A DMP-sharded table is not
    handled here (its rows live on other ranks)."""
    if not isinstance(table, UserStateTable):
        raise TypeError(f"expected an unsharded UserStateTable, got {type(table).__name__}")
    weight, export_ids, _, _ = import_user_table(export_dir, expected_fingerprint, allow_fingerprint_mismatch)
    merged, ids, report = _merge_rows(table.weight.detach(), users.ids, weight, export_ids, new_users,
                                      str(export_dir))
    for u in ids[len(users):]:
        users.add(u)
    if merged.shape[0] != table.weight.shape[0]:
        table = grow_table(table, merged.shape[0])
    with torch.no_grad():
        table.weight.copy_(merged)
    return table, report


def import_into_module(
    export_dir: str | Path,
    module: torch.nn.Module,
    users: UserIndex,
    expected_fingerprint: str | None = None,
    allow_fingerprint_mismatch: bool = False,
    new_users: str = "error",
) -> dict:
    """Load an export into any module that holds the ``user_state`` EBC, DMP-sharded or not (e.g. the
    ``shard_user_tower`` result). The row count cannot change here (``new_users``: ``skip`` or ``error``).

    Under DMP this is a collective: every rank calls it with the same export; rank 0 gathers the table
    (``embeddings.sharding.gather_user_table``), merges the rows, broadcasts the result, and each rank loads
    its own shards (``load_user_table``).
    """
    import torch.distributed as dist

    from embeddings.sharding import gather_user_table, load_user_table

    if new_users == "add":
        raise InputError("a sharded table cannot grow in place; use new_users=skip or error, or reshard")
    weight, export_ids, _, _ = import_user_table(export_dir, expected_fingerprint, allow_fingerprint_mismatch)
    full = gather_user_table(module)  # (N, D) on rank 0, None elsewhere
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if full is not None:
        full, _, report = _merge_rows(full, users.ids, weight, export_ids, new_users, str(export_dir))
    if distributed:
        shape = [None] if full is None else [tuple(full.shape)]
        dist.broadcast_object_list(shape, src=0)
        if full is None:
            full = torch.empty(shape[0])
        dist.broadcast(full, src=0)  # gloo needs CPU tensors; under nccl move ``full`` to the device first
        n_unknown = sum(u not in users.index for u in export_ids)
        report = {"replaced": len(export_ids) - n_unknown, "added": 0, "skipped": n_unknown}
    load_user_table(module, full)
    return report


def run_export(cfg: ExportConfig) -> dict:
    """``tapper export``: :func:`export_model` with the config's values."""
    return export_model(cfg.model_dir, cfg.out, cfg.dtype)


def run_import(cfg: ImportConfig) -> dict:
    """``tapper import``: :func:`import_model` with the config's values."""
    return import_model(cfg.export_dir, cfg.model_dir, cfg.allow_fingerprint_mismatch, cfg.new_users)
