"""User-table operations on a saved model directory: export, import, and online updates from new events.

    tapper export model_dir=runs/demo/model out=exports/demo dtype=fp32        # or fp16 / int8
    tapper import export_dir=exports/demo model_dir=runs/demo/model
    tapper update model_dir=runs/demo/model events=new.parquet [strict=false] [epochs=1]

``update`` reads a parquet file of events (user_id, record_id, text, label, timestamp), validates every row,
appends the events to the users' histories and the record bank, gives new users a row (the table grows and
``users.json`` records the id), then fine-tunes ONLY the affected users' P_u rows with the events as targets
(record i is the target, the user's records before it its visible history, as in Stage 2). Every shared
weight (backbone, bridge LoRA, scorer, lambdas, projector, other users' rows) stays bit-identical: the
affected rows are copied into a small k-row table that is the only thing the optimizer sees, and copied back.

Timestamps: a timestamp column, epoch seconds (numbers above 1e11 are milliseconds) or a date string
(see ``recsys_tapper.data.parse_date``). Rows are numbered from 0 in error messages.

Each function below is importable; the Hydra commands are thin wrappers (``recsys_tapper.cli``).
"""

from __future__ import annotations

import json
import math
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hydra.core.config_store import ConfigStore
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from embeddings.export import export_user_table, import_user_table
from embeddings.user_state import UserStateConfig, UserStateTable
from recsys_tapper.checkpoint import HISTORY_SCHEMA, read_histories, rewrite_model_files, verify
from recsys_tapper.data import LampExample, ProfileRecord, format_date, parse_date
from recsys_tapper.data.dates import DateParseError
from recsys_tapper.errors import InputError
from recsys_tapper.features import FeatureBuilder, Sample, record_key
from recsys_tapper.tasks import Task, get_task
from recsys_tapper.training import OptimConfig, train_loop
from recsys_tapper.users import UserIndex

TOWER_KEY = "table.ebc.embedding_bags.user_state.weight"  # the P_u table inside tower.safetensors
EVENT_FIELDS = ("user_id", "record_id", "text", "label", "timestamp")
_MAX_PROBLEMS = 1000


class UpdateError(InputError):
    """A bad events file or row; the message names the file, the row (from 0) and the field."""


# ------------------------------------------------------------------------------------------------ configs


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


@dataclass
class UpdateConfig:
    """Args:
    events: parquet file of (user_id, record_id, text, label, timestamp).
    strict: reject the file at the first bad row (True) or skip bad rows and count them (False).
    epochs, batch_size, clip: the row fine-tune (AdamW, linear warm-up/decay as in Stage 2).
    lr / weight_decay: None = the model's trainer.lr_user / trainer.wd_user.
    seed: initial rows of new users (N(0, model.user_init_std)) and sample order.
    now: days since the epoch that count as "now" for the future-timestamp check (None = the clock).
    """

    model_dir: str = "runs/demo/model"
    events: str = "new.parquet"
    strict: bool = True
    epochs: int = 1
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float | None = None
    clip: float = 0.3
    seed: int = 0
    now: float | None = None
    threads: int | None = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="import_schema", node=ImportConfig)
    cs.store(name="update_schema", node=UpdateConfig)


# ------------------------------------------------------------------------------------------------- export


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


# ------------------------------------------------------------------------------------------------- import


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


# ---------------------------------------------------------------------------------------- event validation


@dataclass
class Event:
    user_id: str
    record_id: str
    fields: dict[str, str]
    date: float  # days since the epoch


def _placeholders(template: str | None) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template or "") if f}


def text_field(task: Task) -> str:
    """The record field the events' ``text`` fills (the one non-label field the task templates use)."""
    if task.output_field is None or task.input_template is None:
        raise UpdateError(f"task {task.name}: profile records carry no label, so there is nothing to fine-tune on")
    names = (_placeholders(task.record_template) | _placeholders(task.input_template)) - {task.output_field}
    if len(names) != 1:
        raise UpdateError(f"task {task.name}: records need fields {sorted(names)}; events carry one text field")
    return names.pop()


def _check_type(path: str, table: pa.Table, name: str) -> None:
    t = table.schema.field(name).type
    ok = {
        "user_id": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
        "record_id": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
        "text": pa.types.is_string(t) or pa.types.is_large_string(t),
        "label": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
        or pa.types.is_floating(t),
        "timestamp": pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
        or pa.types.is_string(t) or pa.types.is_large_string(t),
    }[name]
    if not ok:
        want = {"user_id": "string or integer", "record_id": "string or integer", "text": "string",
                "label": "string or number", "timestamp": "timestamp, epoch seconds or date string"}[name]
        col = table.column(name)
        first = next((i for i, v in enumerate(col.to_pylist()) if v is not None), 0)
        raise UpdateError(f"{path}: row {first}: field '{name}' must be {want}, got {t}")


def _read_events(events: str | Path | pd.DataFrame) -> tuple[str, pa.Table]:
    if isinstance(events, pd.DataFrame):
        try:
            return "events", pa.Table.from_pandas(events, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise UpdateError(f"events: cannot convert the DataFrame to columns ({e})") from None
    path = Path(events)
    if not path.is_file():
        raise UpdateError(f"{path}: events file not found")
    try:
        return str(path), pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UpdateError(f"{path}: not a readable parquet file ({e})") from None


def _timestamp_days(value: object) -> float:
    if isinstance(value, datetime):  # a parquet timestamp column (pandas Timestamps are datetimes too)
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)  # naive means UTC, as in parse_date
        return value.timestamp() / 86400.0
    days = parse_date(value)
    if days is None:
        raise DateParseError("empty date")
    return days


def validate_events(
    events: str | Path | pd.DataFrame,
    task: Task,
    existing: set[str] = frozenset(),
    strict: bool = True,
    now: float | None = None,
) -> tuple[list[Event], dict]:
    """Check every row; returns (good events in file order, report). ``existing``: record keys already held.

    Raises UpdateError at the first bad row when ``strict``; otherwise skips it and counts it in the report.
    """
    path, table = _read_events(events)
    missing = [f for f in EVENT_FIELDS if f not in table.column_names]
    if missing:
        raise UpdateError(f"{path}: field '{missing[0]}' missing (columns: {', '.join(table.column_names)})")
    for f in EVENT_FIELDS:
        _check_type(path, table, f)
    now = time.time() / 86400.0 if now is None else now
    tfield = text_field(task)
    labels = set(task.labels) if task.labels else None
    cols = {f: table.column(f).to_pylist() for f in EVENT_FIELDS}
    report = {"path": path, "n_rows": table.num_rows, "n_kept": 0, "n_skipped": 0, "problems": []}
    seen: dict[tuple[str, str], int] = {}
    out: list[Event] = []

    for i in range(table.num_rows):
        try:
            v = {f: cols[f][i] for f in EVENT_FIELDS}
            for f in EVENT_FIELDS:
                if v[f] is None:
                    raise UpdateError(f"field '{f}' is missing (null)")
            for f in ("user_id", "record_id", "label"):
                if isinstance(v[f], float):
                    if not math.isfinite(v[f]):
                        raise UpdateError(f"field '{f}' is not a finite number ({v[f]!r})")
                    v[f] = str(int(v[f])) if v[f].is_integer() else repr(v[f])
                v[f] = str(v[f]).strip()
                if not v[f]:
                    raise UpdateError(f"field '{f}' is empty")
            if not v["text"].strip():
                raise UpdateError("field 'text' is empty")
            if labels is not None and v["label"] not in labels:
                raise UpdateError(f"field 'label' {v['label']!r} is not one of {sorted(labels)}")
            try:
                day = _timestamp_days(v["timestamp"])
            except DateParseError as e:
                raise UpdateError(f"field 'timestamp': {e}") from None
            if day > now:
                raise UpdateError(f"field 'timestamp' is in the future ({format_date(day)} > now "
                                  f"{format_date(now)})")
            key = (v["user_id"], v["record_id"])
            if key in seen:
                raise UpdateError(f"(user_id, record_id) {key} duplicates row {seen[key]}")
            if record_key(*key) in existing:
                raise UpdateError(f"record {key} is already in the model (records are immutable)")
        except UpdateError as e:
            msg = f"{path}: row {i}: {e}"
            if strict:
                raise UpdateError(msg) from None
            report["n_skipped"] += 1
            if len(report["problems"]) < _MAX_PROBLEMS:
                report["problems"].append(msg)
            continue
        seen[key] = i
        out.append(Event(v["user_id"], v["record_id"], {tfield: v["text"], task.output_field: v["label"]}, day))
    report["n_kept"] = len(out)
    return out, report


# ------------------------------------------------------------------------------------------------- update


def _merge_history(old: list[ProfileRecord], new: list[ProfileRecord]) -> list[ProfileRecord]:
    """Old records then new ones, stably sorted by date when every record has one (history is in time order)."""
    merged = list(old) + sorted(new, key=lambda r: r.date)
    if all(r.date is not None for r in merged):
        merged.sort(key=lambda r: r.date)
    return merged


def _histories_bytes(histories: dict[str, list[ProfileRecord]]) -> bytes:
    rows = [{"user_id": u, "record_id": r.id, "fields": json.dumps(dict(r.fields), ensure_ascii=False),
             "date": r.date} for u, recs in histories.items() for r in recs]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


def finetune_rows(model, fb: FeatureBuilder, samples: list[Sample], users: Sequence[str], opt: OptimConfig,
                  desc: str = "update P_u rows") -> list[float]:
    """Train only the P_u rows of ``users`` on ``samples``; every other weight is left bit-identical.

    The rows are copied into a k-row UserStateTable that stands in for the full table (user ids are remapped
    to local rows by a local UserIndex), everything else is frozen, and the trained rows are copied back.
    """
    tower = model.tower
    full = tower.table
    rows = torch.tensor([fb.users.row(u) for u in users], dtype=torch.long)
    local = UserStateTable(UserStateConfig(num_users=len(users), dim=full.cfg.dim, init_std=full.cfg.init_std))
    with torch.no_grad():
        local.weight.copy_(full.weight[rows])  # (k, D)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    local_fb = FeatureBuilder(fb.tok, fb.encoder, fb.task, fb.bank, UserIndex(users), fb.max_prompt_tokens,
                              fb.max_history)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        tower.table = local
        local.weight.requires_grad_(True)
        losses = train_loop(model, samples, local_fb, [{"params": [local.weight]}], opt, desc=desc)
    finally:
        tower.table = full
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    with torch.no_grad():
        full.weight[rows] = local.weight.detach()
    return losses


def update_model(
    model_dir: str | Path,
    events: str | Path | pd.DataFrame,
    strict: bool = True,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float | None = None,
    weight_decay: float | None = None,
    clip: float = 0.3,
    seed: int = 0,
    now: float | None = None,
) -> dict:
    """Apply new events to a model directory (see the module docstring); returns a report with timings."""
    from llm_bridge.encoder import TextEncoder
    from recsys_tapper.checkpoint import load_model

    model_dir = Path(model_dir)
    t = {"start": time.perf_counter()}
    model, tok, users, bank, cfg = load_model(model_dir)
    task = get_task(cfg.task.name)
    t["load"] = time.perf_counter()
    good, report = validate_events(events, task, set(bank.index), strict=strict, now=now)
    t["validate"] = time.perf_counter()
    if not good:
        report.update(new_users=[], affected_users=0, n_samples=0, losses=[], timings_s={})
        return report

    # New users get a row; the id map grows with them.
    affected = list(dict.fromkeys(e.user_id for e in good))
    new_users = [u for u in affected if users.row(u) is None]
    for u in new_users:
        users.add(u)
    model.tower.table = grow_table(model.tower.table, len(users), seed=seed)

    # Record bank and histories.
    encoder = TextEncoder(model.lm, tok, cfg.model.max_record_tokens)
    keys = [record_key(e.user_id, e.record_id) for e in good]
    bank.add(keys, encoder.encode([task.record_text(e.fields) for e in good]))
    histories = read_histories(model_dir / "histories.parquet")
    by_user: dict[str, list[ProfileRecord]] = {}
    for e in good:
        by_user.setdefault(e.user_id, []).append(ProfileRecord(e.record_id, e.fields, e.date))
    for u, recs in by_user.items():
        histories[u] = _merge_history(histories.get(u, []), recs)
    t["encode"] = time.perf_counter()

    # Targets: each new event, with the user's records before it as visible history.
    fb = FeatureBuilder(tok, encoder, task, bank, users, cfg.model.max_prompt_tokens, cfg.model.max_history)
    new_keys = set(keys)
    samples: list[Sample] = []
    for u in affected:
        ex = LampExample(f"{u}/update", u, "", tuple(histories[u]))
        for i, rec in enumerate(ex.profile):
            if record_key(u, rec.id) in new_keys:
                question, answer = task.record_example(rec.fields)
                rows, days = fb._history(ex, upto=i)
                samples.append(Sample(record_key(u, rec.id), u, rows, days, rec.date, question, answer))
    g = torch.Generator().manual_seed(seed)
    samples = [samples[i] for i in torch.randperm(len(samples), generator=g).tolist()]
    opt = OptimConfig(lr=cfg.trainer.lr_user if lr is None else lr, epochs=epochs, batch_size=batch_size,
                      weight_decay=cfg.trainer.wd_user if weight_decay is None else weight_decay, clip=clip)
    losses = finetune_rows(model, fb, samples, affected, opt)
    t["finetune"] = time.perf_counter()

    tower_state = {k: v.detach().contiguous() for k, v in model.tower.state_dict().items()}
    rewrite_model_files(model_dir, {
        "tower.safetensors": st_save(tower_state),
        "users.json": json.dumps(users.ids).encode(),
        "histories.parquet": _histories_bytes(histories),
        "bank.safetensors": st_save({"vectors": bank.vectors.contiguous()}),
        "bank_keys.json": json.dumps(bank.keys).encode(),
    })
    t["write"] = time.perf_counter()
    names = ["load", "validate", "encode", "finetune", "write"]
    prev = ["start", *names[:-1]]
    report.update(
        new_users=new_users,
        affected_users=len(affected),
        n_samples=len(samples),
        losses=losses,
        timings_s={**{n: t[n] - t[p] for n, p in zip(names, prev)}, "total": t["write"] - t["start"]},
    )
    return report


# ------------------------------------------------------------------------------------- Hydra entry points


def run_export(cfg: ExportConfig) -> dict:
    return export_model(cfg.model_dir, cfg.out, cfg.dtype)


def run_import(cfg: ImportConfig) -> dict:
    return import_model(cfg.export_dir, cfg.model_dir, cfg.allow_fingerprint_mismatch, cfg.new_users)


def run_update(cfg: UpdateConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return update_model(cfg.model_dir, cfg.events, strict=cfg.strict, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                        seed=cfg.seed, now=cfg.now)
