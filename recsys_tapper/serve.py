"""Serve a saved model: one question for one user -> label distribution, with an explicit cold-start path.

A user with a row is served by ``P_u + P_q``. A user without one (never trained, or unknown) is served by P_q
alone plus the cold-start row: zeros (the paper) or the mean trained row (``cold_start="mean"``); the answer
says which (``served_by``: ``"pu+pq"``, ``"pq_only(zero)"`` or ``"pq_only(mean)"``).

The history is the user's saved history (``histories.parquet``) unless ``history_records`` are passed; records
the bank lacks are encoded on the fly (and not kept). The features come from the same FeatureBuilder that
training used.

Example::

    server = Server("runs/demo/model", cold_start="mean")
    server.predict("196", "Rate the movie from 1 to 5. movie: Heat (1995) | Action")
    # {"user_id": "196", "pred": "4", "expected": 3.8, "probs": {...}, "served_by": "pu+pq", ...}
    server.predict("new-user", "...", history_records=[{"id": "a", "text": "Heat (1995)", "score": "5",
                                                        "date": "1997-12-04"}])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from embeddings.cold_start import COLD_START_MODES, cold_start_rows, served_by
from llm_bridge.encoder import TextEncoder
from recsys_tapper.checkpoint import load_model, read_histories
from recsys_tapper.data import ProfileRecord, parse_date
from recsys_tapper.data.dates import DateParseError
from recsys_tapper.evaluation import label_token_ids
from recsys_tapper.features import Batch, FeatureBuilder, Sample, record_key
from recsys_tapper.model import TapperModel
from recsys_tapper.tasks import get_task


@dataclass
class ServeConfig:
    """Args:
    cold_start: the P_u row of a user without one: ``zero`` (P_q alone, the paper) or ``mean``.
    allow_fingerprint_mismatch: serve a model directory trained on another backbone.
    """

    cold_start: str = "zero"
    allow_fingerprint_mismatch: bool = False


def cold_start_prefix(model: TapperModel, batch: Batch, bank: torch.Tensor, cold_row: torch.Tensor) -> torch.Tensor:
    """The prefix with each cold example's P_u replaced by ``cold_row``. -> (B, L, d)"""
    return model.prefix(batch, bank, cold_row=cold_row)


def _day(value: object, where: str) -> float | None:
    """Days since the epoch: a number is already days; a string is parsed (ISO, MM/DD/YYYY, epoch seconds)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{where}: {value!r} is not a date")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number of days")
        return float(value)
    try:
        return parse_date(value)
    except DateParseError as e:
        raise ValueError(f"{where}: {e}") from None


class Server:
    def __init__(self, model_dir: str | Path, cold_start: str = "zero", allow_fingerprint_mismatch: bool = False):
        if cold_start not in COLD_START_MODES:
            raise ValueError(f"cold_start {cold_start!r} is not one of {', '.join(COLD_START_MODES)}")
        self.model_dir = Path(model_dir)
        self.model, self.tok, self.users, self.bank, self.cfg = load_model(self.model_dir, allow_fingerprint_mismatch)
        self.task = get_task(self.cfg.task.name)
        if not self.task.labels:
            raise NotImplementedError(f"serving scores label tasks; {self.task.name} is {self.task.kind}")
        self.encoder = TextEncoder(self.model.lm, self.tok, self.cfg.model.max_record_tokens)
        self.fb = FeatureBuilder(self.tok, self.encoder, self.task, self.bank, self.users,
                                 self.cfg.model.max_prompt_tokens, self.cfg.model.max_history,
                                 items=self.model.item_index)
        self.histories = read_histories(self.model_dir / "histories.parquet")
        self.cold_start = cold_start
        self.cold_row = cold_start_rows(self.model.tower.table.weight, cold_start)  # (D,)
        self.label_ids = label_token_ids(self.tok, self.task.labels)

    def _records(self, user: str, history_records: Sequence | None) -> list[ProfileRecord]:
        if history_records is None:
            return list(self.histories.get(user, []))
        recs = []
        for i, r in enumerate(history_records):
            where = f"history_records[{i}]"
            if isinstance(r, ProfileRecord):
                rec = r
            elif isinstance(r, Mapping):
                if not r.get("id"):
                    raise ValueError(f"{where}: field 'id' missing")
                fields = {k: str(v) for k, v in r.items() if k not in ("id", "date")}
                rec = ProfileRecord(str(r["id"]), fields, _day(r.get("date"), f"{where}: field 'date'"))
            else:
                raise TypeError(f"{where}: expected a ProfileRecord or a dict, got {type(r).__name__}")
            try:
                self.task.record_text(rec.fields)
            except KeyError as e:
                raise ValueError(f"{where}: {e.args[0]}") from None
            recs.append(rec)
        if all(r.date is not None for r in recs):
            recs.sort(key=lambda r: r.date)  # history is in time order
        return recs

    def _history(self, user: str, recs: list[ProfileRecord]) -> tuple[list[int], list[float | None], torch.Tensor]:
        """Bank rows for the records (unknown ones encoded into extra rows past the bank's end)."""
        if self.cfg.model.max_history is not None:
            recs = recs[-self.cfg.model.max_history :] if self.cfg.model.max_history > 0 else []
        rows, texts = [], []
        n = len(self.bank)
        for r in recs:
            row = self.bank.index.get(record_key(user, r.id))
            if row is None:
                row = n + len(texts)
                texts.append(self.task.record_text(r.fields))
            rows.append(row)
        bank = self.bank.vectors
        if texts:
            bank = torch.cat([bank, self.encoder.encode(texts)])  # (R + new, d)
        return rows, [r.date for r in recs], bank

    @torch.no_grad()
    def predict(self, user_id: str, question_input: str, history_records: Sequence | None = None,
                date: float | str | None = None, item_id: str | None = None) -> dict:
        """Score one question. ``date`` is days since the epoch (a number) or a date string; None = the date
        of the last history record. ``item_id`` keys the item table of a model that has one (None: cold item).
        ``history_records`` override the saved history (dicts with ``id``, the
        task's record fields and an optional ``date``, or ProfileRecords)."""
        if not isinstance(user_id, str) or not user_id.strip():
            raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
        if not isinstance(question_input, str) or not question_input.strip():
            raise ValueError("question_input is empty")
        query_day = _day(date, "date")
        rows, days, bank = self._history(user_id, self._records(user_id, history_records))
        sample = Sample("predict", user_id, rows, days, query_day, question_input, None, item_id)
        batch = self.fb.collate([sample], with_labels=False)
        self.model.eval()
        probs = self.model.label_probs(batch, bank, self.label_ids, cold_row=self.cold_row)[0]  # (n_labels,)
        labels = self.task.labels
        out = {
            "user_id": user_id,
            "pred": labels[int(probs.argmax())],
            "probs": {lab: float(p) for lab, p in zip(labels, probs)},
            "served_by": served_by(not batch.cold[0], self.cold_start),
            "n_history": len(rows),
            "query_date": query_day,
        }
        if all(x.isdigit() for x in labels):
            out["expected"] = float(probs @ torch.tensor([float(x) for x in labels]))
        return out
