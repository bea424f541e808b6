"""Save and load a trained TAP-PER model as safetensors + JSON (no code-executing deserialization).

Layout of a model directory::

    task_lora.safetensors     Stage-1 LoRA (merged into the backbone on load)
    bridge_lora.safetensors   Stage-2 bridge LoRA
    tower.safetensors         P_u table + scorer + lambdas (unsharded names)
    projector.safetensors     bridge projector
    bank.safetensors          record vectors (+ the encoder's token weights);  bank_keys.json: their keys, row order
    users.json                user ids in table-row order
    histories.parquet         every user's visible history: user_id, record_id, fields (JSON), date (days)
    config.json               the resolved RunConfig
    manifest.json             schema version, backbone fingerprint, sha256 of every file above

Example::

    save_model(out / "model", model, task_lora_state, users, bank, cfg)
    model, users, bank, cfg = load_model(out / "model")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save

from embeddings.record_bank import RecordBank
from llm_bridge.backbone import fingerprint, load_backbone
from llm_bridge.lora import add_lora, merge_lora
from recsys_tapper.config import RunConfig
from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.errors import InputError
from recsys_tapper.io import atomic_write_bytes, atomic_write_text
from recsys_tapper.model import TapperModel
from recsys_tapper.users import UserIndex

SCHEMA_VERSION = 1
HISTORY_SCHEMA = pa.schema([("user_id", pa.string()), ("record_id", pa.string()), ("fields", pa.string()),
                            ("date", pa.float64())])
FILES = ("histories.parquet", "task_lora.safetensors", "bridge_lora.safetensors", "tower.safetensors", "projector.safetensors",
         "bank.safetensors", "bank_keys.json", "users.json", "config.json")
ITEM_FILES = ("items.safetensors", "items.json")  # only for a model with an item table


class CheckpointError(InputError, RuntimeError):
    """A model directory that is missing, damaged or not ours; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def save_model(
    out: str | Path,
    model: TapperModel,
    task_lora: dict[str, torch.Tensor],
    users: UserIndex,
    bank: RecordBank,
    cfg: RunConfig,
    histories: list[LampExample] = (),
) -> Path:
    """Write a model directory; ``histories`` are questions whose profiles are the users' histories
    (for each user the longest profile seen is kept)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_histories(out / "histories.parquet", histories)
    _save_tensors(out / "task_lora.safetensors", task_lora)
    _save_tensors(out / "bridge_lora.safetensors", get_peft_model_state_dict(model.lm))
    _save_tensors(out / "tower.safetensors", model.tower.state_dict())
    _save_tensors(out / "projector.safetensors", model.projector.state_dict())
    files = FILES
    if model.items is not None:  # the item table and its up-projection, with the item ids in row order
        _save_tensors(out / "items.safetensors", model.items.state_dict())
        atomic_write_text(out / "items.json", json.dumps(model.item_index.ids))
        files = FILES + ITEM_FILES
    _save_tensors(out / "bank.safetensors", bank_tensors(bank))
    atomic_write_text(out / "bank_keys.json", json.dumps(bank.keys))
    atomic_write_text(out / "users.json", json.dumps(users.ids))
    atomic_write_text(out / "config.json", json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg))))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "backbone": cfg.model.backbone.name_or_path,
        "backbone_fingerprint": fingerprint(model.lm.get_base_model()),
        "files": {name: sha256_file(out / name) for name in files},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return out


def bank_tensors(bank: RecordBank) -> dict[str, torch.Tensor]:
    """What ``bank.safetensors`` holds: the record vectors and, when they were made with token weights
    (``model.text_weighting=sif``), those weights, so that new records and questions are encoded the same way."""
    extra = {} if bank.token_weights is None else {"token_weights": bank.token_weights}
    return {"vectors": bank.vectors, **extra}


def write_histories(path: Path, examples: list[LampExample]) -> None:
    longest: dict[str, LampExample] = {}
    for ex in examples:
        if ex.user_id not in longest or len(ex.profile) > len(longest[ex.user_id].profile):
            longest[ex.user_id] = ex
    rows = [
        {"user_id": u, "record_id": r.id, "fields": json.dumps(dict(r.fields), ensure_ascii=False), "date": r.date}
        for u, ex in longest.items()
        for r in ex.profile
    ]
    table = pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_histories(path: Path) -> dict[str, list[ProfileRecord]]:
    """user id -> profile records in time order (as saved)."""
    out: dict[str, list[ProfileRecord]] = {}
    for row in pq.read_table(path).to_pylist():
        out.setdefault(row["user_id"], []).append(ProfileRecord(row["record_id"], json.loads(row["fields"]), row["date"]))
    return out


def merge_history(old: Sequence[ProfileRecord], new: Sequence[ProfileRecord]) -> list[ProfileRecord]:
    """Old records then new ones, stably sorted by date when every record has one (history is in time order).
    ``tapper serve`` and ``tapper update`` both append events with this rule."""
    merged = list(old) + sorted(new, key=lambda r: (r.date is None, r.date or 0.0))
    if all(r.date is not None for r in merged):
        merged.sort(key=lambda r: r.date)
    return merged


def verify(path: str | Path) -> dict:
    """Check the manifest's checksums; raise CheckpointError naming the first bad file."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise CheckpointError(f"{path}: no manifest.json; not a recsys-tapper model directory")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: manifest is not valid JSON ({e})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{mpath}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (truncated or corrupted); refusing to load")
    return manifest


def load_model(path: str | Path, allow_fingerprint_mismatch: bool = False):
    """Rebuild ``(model, tok, users, bank, cfg)`` from a model directory saved by ``save_model``; the model's
    tower owns ``bank`` (records added to it later are read by the model at once)."""
    from recsys_tapper.build import build_tapper, build_trunk

    path = Path(path)
    manifest = verify(path)
    cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                                         json.loads((path / "config.json").read_text())))
    lm, tok = load_backbone(cfg.model.backbone)
    fp = fingerprint(lm)
    if fp != manifest["backbone_fingerprint"] and not allow_fingerprint_mismatch:
        raise CheckpointError(
            f"{path}: trained on backbone fingerprint {manifest['backbone_fingerprint']}, but the loaded backbone "
            f"is {fp}; pass allow_fingerprint_mismatch=True to load anyway"
        )
    lm = add_lora(lm, cfg.model.task_lora)
    task_lora = load_file(path / "task_lora.safetensors")
    set_peft_model_state_dict(lm, task_lora)
    lm = merge_lora(lm)
    trunk = build_trunk(cfg.model, lm, task_lora)
    lm = add_lora(lm, cfg.model.bridge_lora, first_layer=cfg.model.prefix_layer)
    set_peft_model_state_dict(lm, load_file(path / "bridge_lora.safetensors"))
    users = UserIndex(json.loads((path / "users.json").read_text()))
    items = UserIndex(json.loads((path / "items.json").read_text())) if (path / "items.json").exists() else None
    saved_bank = load_file(path / "bank.safetensors")
    bank = RecordBank(lm.config.hidden_size, token_weights=saved_bank.get("token_weights"))
    bank.add(json.loads((path / "bank_keys.json").read_text()), saved_bank["vectors"])
    model = build_tapper(cfg.model, lm, len(users), len(items or ()), trunk, bank)
    if model.items is not None:
        model.items.load_state_dict(load_file(path / "items.safetensors"))
        model.item_index = items
    model.tower.load_state_dict(load_file(path / "tower.safetensors"))
    model.projector.load_state_dict(load_file(path / "projector.safetensors"))
    model.eval()
    return model, tok, users, bank, cfg


def config_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def rewrite_model_files(path: str | Path, updates: dict[str, bytes]) -> dict:
    """Replace some files of a verified model directory and write a manifest that vouches for them.

    Every new file is first written beside its target (temp name, fsync); then all are renamed into place
    and the manifest, with fresh sha256 sums, is written last (atomically). Each file is always whole; a crash
    between the renames leaves files the old manifest does not vouch for, which ``verify`` refuses.

    Example::

        rewrite_model_files(model_dir, {"tower.safetensors": save(state), "users.json": b'["u1"]'})
    """
    import os
    import tempfile

    path = Path(path)
    manifest = verify(path)
    bad = sorted(set(updates) - set(FILES))
    if bad:
        raise CheckpointError(f"{path}: {bad} are not model-directory files (allowed: {', '.join(FILES)})")
    staged: list[tuple[str, Path]] = []
    try:
        for name, data in updates.items():
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.", suffix=".tmp")
            staged.append((tmp, path / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, dest in staged:
            os.replace(tmp, dest)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    manifest = {**manifest, "files": {name: sha256_file(path / name) for name in manifest["files"]}}
    atomic_write_text(path / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
