"""Serve a saved model: one question for one user -> label distribution, with an explicit cold-start path.

A user with a row is served by ``P_u + P_q``. A user without one (never trained, or unknown) is served by P_q
alone plus the cold-start row: zeros (the paper) or the mean trained row (``cold_start="mean"``); the answer
says which (``served_by``: ``"pu+pq"``, ``"pq_only(zero)"`` or ``"pq_only(mean)"``).

The history is the user's saved history (``histories.parquet``) unless ``history_records`` are passed; records
the bank lacks are encoded on the fly (and not kept). The features come from the same FeatureBuilder that
training used.

``predict_many`` scores several queries in one forward pass (one ``Server.label_distribution`` call over the
collated batch; the HTTP service's batcher uses it). ``add_records`` appends live events to a user's history
and the record bank in memory, with no training step: the next query reads them through P_q.

Example::

    server = Server("runs/demo/model", cold_start="mean")
    server.predict("196", "Rate the movie from 1 to 5. movie: Heat (1995) | Action")
    # {"user_id": "196", "pred": "4", "expected": 3.8, "probs": {...}, "served_by": "pu+pq", ...}
    server.predict("new-user", "...", history_records=[{"id": "a", "text": "Heat (1995)", "score": "5",
                                                        "date": "1997-12-04"}])
    server.predict_many([Query("196", q1), Query("new-user", q2)])   # one batch, one forward pass
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from embeddings.cold_start import COLD_START_MODES, cold_start_rows, served_by
from recsys_tapper.checkpoint import load_model, merge_history, read_histories
from recsys_tapper.data import ProfileRecord, parse_date
from recsys_tapper.data.dates import DateParseError
from recsys_tapper.evaluation import label_token_ids
from recsys_tapper.features import Batch, Sample, record_key, saved_feature_builder
from recsys_tapper.label_scoring import label_scores
from recsys_tapper.tasks import CLASSIFICATION, get_task


@dataclass
class ServeConfig:
    """Args:
    cold_start: the P_u row of a user without one: ``zero`` (P_q alone, the paper) or ``mean``.
    allow_fingerprint_mismatch: serve a model directory trained on another backbone.
    """

    cold_start: str = "zero"
    allow_fingerprint_mismatch: bool = False


@dataclass
class Query:
    """One question to score: the arguments of :meth:`Server.predict`, for :meth:`Server.predict_many`."""

    user_id: str
    question: str
    history_records: Sequence | None = None
    date: float | str | None = None
    item_id: str | None = None


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
        self.fb = saved_feature_builder(self.cfg.model, self.model, self.tok, self.task, self.bank, self.users)
        self.encoder = self.fb.encoder  # with the token weights the training job fitted (saved with the bank)
        self.histories = read_histories(self.model_dir / "histories.parquet")
        self.cold_start = cold_start
        self.cold_row = cold_start_rows(self.model.tower.table.weight, cold_start)  # (D,)
        # classification answers by label-set scoring (each label's whole token sequence, as the job's label_set
        # readout); ratings by the next-token distribution over the labels' first tokens
        self.label_set = self.task.kind == CLASSIFICATION
        self.label_targets = [self.fb.answer_ids(lab) for lab in self.task.labels]
        self.label_ids = None if self.label_set else label_token_ids(self.tok, self.task.labels)

    def label_distribution(self, model, batch: Batch, cold_row: torch.Tensor | None = None) -> torch.Tensor:
        """The answer distribution over the task's labels -> (B, n_labels): for classification the softmax of
        each label's mean (or, ``trainer.label_norm=sum``, summed) token log-probability
        (``label_scoring.label_scores``; its argmax is the job's
        ``label_set`` answer), else ``model.label_probs`` over the labels' tokens."""
        if self.label_set:
            return torch.softmax(label_scores(model, batch, self.label_targets, cold_row=cold_row,
                                              norm=self.cfg.trainer.label_norm), dim=-1)
        return model.label_probs(batch, self.label_ids, cold_row=cold_row)

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

    def records(self, user: str, history_records: Sequence | None = None) -> list[ProfileRecord]:
        """The history a query of ``user`` reads, in time order: ``history_records`` or the user's history,
        cut to the model's ``max_history`` most recent records."""
        recs = self._records(user, history_records)
        if self.cfg.model.max_history is not None:
            recs = recs[-self.cfg.model.max_history :] if self.cfg.model.max_history > 0 else []
        return recs

    def _history(self, user: str, recs: list[ProfileRecord], new: list[dict]) -> tuple[list[int], list[float | None]]:
        """Bank rows for the records; a record the bank lacks gets row ``len(bank) + len(new)`` and its fields
        are appended to ``new`` (shared by every query of one batch; encoded once by the caller)."""
        rows = []
        n = len(self.bank)
        for r in recs:
            row = self.bank.index.get(record_key(user, r.id))
            if row is None:
                row = n + len(new)
                new.append(r.fields)
            rows.append(row)
        return rows, [r.date for r in recs]

    def sample(self, query: Query, new: list[dict]) -> Sample:
        """Check one query and build its Sample (unknown history records' fields go to ``new``)."""
        if not isinstance(query.user_id, str) or not query.user_id.strip():
            raise ValueError(f"user_id must be a non-empty string, got {query.user_id!r}")
        if not isinstance(query.question, str) or not query.question.strip():
            raise ValueError("question_input is empty")
        query_day = _day(query.date, "date")
        rows, days = self._history(query.user_id, self.records(query.user_id, query.history_records), new)
        return Sample("predict", query.user_id, rows, days, query_day, query.question, None, query.item_id)

    def batch(self, queries: Sequence[Query]) -> Batch:
        """One collated batch for several queries. History records the bank lacks are encoded once for the
        whole batch and travel in ``batch.extra_records`` (new, d); the bank is not changed."""
        new: list[dict] = []
        samples = [self.sample(q, new) for q in queries]
        batch = self.fb.collate(samples, with_labels=False)
        if new:
            batch.extra_records = self.fb.record_vectors(new)  # (new, d), encoded as the bank's records were
        return batch

    @torch.no_grad()
    def predict_many(self, queries: Sequence[Query]) -> list[dict]:
        """Score several queries in ONE forward pass (one ``label_probs`` call); same answers as ``predict``
        on each (up to float rounding of the padded batch). Raises on the first bad query."""
        if not queries:
            return []
        batch = self.batch(queries)
        self.model.eval()
        probs = self.label_distribution(self.model, batch, self.cold_row)  # (B, n_labels)
        labels = self.task.labels
        values = torch.tensor([float(x) for x in labels]) if all(x.isdigit() for x in labels) else None
        outs = []
        for i, q in enumerate(queries):
            p = probs[i]
            out = {
                "user_id": q.user_id,
                "pred": labels[int(p.argmax())],
                "probs": {lab: float(x) for lab, x in zip(labels, p)},
                "served_by": served_by(not batch.cold[i], self.cold_start),
                "n_history": int(batch.history.lengths()[i]),
                "query_date": _day(q.date, "date"),
            }
            if values is not None:
                out["expected"] = float(p @ values)
            outs.append(out)
        return outs

    def predict(self, user_id: str, question_input: str, history_records: Sequence | None = None,
                date: float | str | None = None, item_id: str | None = None) -> dict:
        """Score one question. ``date`` is days since the epoch (a number) or a date string; None = the date
        of the last history record. ``item_id`` keys the item table of a model that has one (None: cold item).
        ``history_records`` override the saved history (dicts with ``id``, the
        task's record fields and an optional ``date``, or ProfileRecords)."""
        return self.predict_many([Query(user_id, question_input, history_records, date, item_id)])[0]

    # ------------------------------------------------------------------------------ live history (serving)

    def has_record(self, user: str, record_id: str) -> bool:
        """Whether ``user`` already holds ``record_id`` (in the bank or the saved history): records are immutable."""
        return record_key(user, record_id) in self.bank.index or any(
            r.id == record_id for r in self.histories.get(user, ()))

    def encode_records(self, user_records: Sequence[tuple[str, ProfileRecord]]) -> torch.Tensor:
        """The bank vectors of (user, record) pairs -> (n, d); nothing is stored (see ``add_records``)."""
        return self.fb.record_vectors([r.fields for _, r in user_records])

    def add_records(self, user_records: Sequence[tuple[str, ProfileRecord]], vectors: torch.Tensor | None = None
                    ) -> None:
        """Append records to users' histories and to the record bank (in memory; no training step). The next
        query of such a user reads them through P_q; a user without a row is a cold-start user at once.

        ``vectors`` (n, d) from ``encode_records`` (computed here when None). A record already held is an error
        and nothing is added."""
        keys = [record_key(u, r.id) for u, r in user_records]
        dup = next((k for k, (u, r) in zip(keys, user_records) if self.has_record(u, r.id)), None)
        if dup is not None or len(set(keys)) != len(keys):
            raise KeyError(f"record {dup or keys!r} is already held (records are immutable)")
        if vectors is None:
            vectors = self.encode_records(user_records)
        self.bank.add(keys, vectors)
        by_user: dict[str, list[ProfileRecord]] = {}
        for u, r in user_records:
            by_user.setdefault(u, []).append(r)
        for u, recs in by_user.items():
            self.histories[u] = merge_history(self.histories.get(u, []), recs)

    def user_info(self, user: str) -> dict:
        """History length, whether the user has a trained row, and the last event's date (days, or None)."""
        recs = self.histories.get(user, [])
        dated = [r.date for r in recs if r.date is not None]
        return {"user_id": user, "n_history": len(recs), "has_row": self.users.row(user) is not None,
                "last_event_day": max(dated) if dated else None}
