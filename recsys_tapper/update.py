"""Online updates of a saved model directory from new events: only the affected users' P_u rows train.

    tapper update model_dir=runs/demo/model events=new.parquet [strict=false] [epochs=1]

``update_model`` validates the events (``recsys_tapper.events``), appends them to the users' histories and the
record bank, gives new users a row (the table grows and ``users.json`` records the id), then fine-tunes ONLY
the affected users' P_u rows with the events as targets (record i is the target, the user's records before it
its visible history, as in Stage 2). Every shared weight (backbone, bridge LoRA, scorer, lambdas, projector,
other users' rows) stays bit-identical: the affected rows are copied into a small k-row table that is the
only thing the optimizer sees, and copied back.

Example::

    report = update_model("runs/demo/model", "new.parquet", strict=False, epochs=1)
    report["new_users"], report["n_samples"], report["losses"][-1], report["timings_s"]["total"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as st_save

from embeddings.user_state import UserStateConfig, UserStateTable
from recsys_tapper.checkpoint import (
    HISTORY_SCHEMA,
    bank_tensors,
    merge_history,
    read_histories,
    rewrite_model_files,
)
from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.events import validate_events
from recsys_tapper.features import FeatureBuilder, Sample, record_item, record_key, saved_feature_builder
from recsys_tapper.table_io import grow_table
from recsys_tapper.tasks import get_task
from recsys_tapper.training import OptimConfig, train_loop
from recsys_tapper.users import UserIndex


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
                              fb.max_history, items=fb.items, label_weight=fb.label_weight)
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
    fb = saved_feature_builder(cfg.model, model, tok, task, bank, users)
    keys = [record_key(e.user_id, e.record_id) for e in good]
    bank.add(keys, fb.record_vectors([e.fields for e in good]))  # encoded as the training job's records were
    histories = read_histories(model_dir / "histories.parquet")
    by_user: dict[str, list[ProfileRecord]] = {}
    for e in good:
        by_user.setdefault(e.user_id, []).append(ProfileRecord(e.record_id, e.fields, e.date))
    for u, recs in by_user.items():
        histories[u] = merge_history(histories.get(u, []), recs)
    t["encode"] = time.perf_counter()

    # Targets: each new event, with the user's records before it as visible history.
    new_keys = set(keys)
    samples: list[Sample] = []
    for u in affected:
        ex = LampExample(f"{u}/update", u, "", tuple(histories[u]))
        for i, rec in enumerate(ex.profile):
            if record_key(u, rec.id) in new_keys:
                question, answer = task.record_example(rec.fields)
                rows, days = fb.history_window(ex, upto=i)
                samples.append(Sample(record_key(u, rec.id), u, rows, days, rec.date, question, answer,
                                      record_item(u, rec.id)))  # the item table's key, as Stage 2's targets
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
        "bank.safetensors": st_save({k: v.contiguous() for k, v in bank_tensors(bank).items()}),
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


def run_update(cfg: UpdateConfig) -> dict:
    """``tapper update``: :func:`update_model` with the config's values (``threads`` sets torch's)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return update_model(cfg.model_dir, cfg.events, strict=cfg.strict, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                        seed=cfg.seed, now=cfg.now)
