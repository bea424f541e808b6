"""The record bank: one frozen vector per history record, computed once and cached.

Rows are keyed by a string (``"{user}/{record id}"``); new records are appended (online updates) and
existing rows never move, so ids handed out stay valid. ``token_weights`` (V,) are the text encoder's token
weights the vectors were made with (None: plain means, the paper's); records added later and the questions
scored against them are encoded with the same weights, and they are saved with the bank.

Example::

    bank = RecordBank(d=576)
    rows = bank.add(["u1/r1", "u1/r2"], vectors)     # (2, d) -> [0, 1]
    bank.rows(["u1/r2"])                              # [1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RecordBank:
    def __init__(self, d: int, token_weights: torch.Tensor | None = None) -> None:
        self.d = d
        self.token_weights = token_weights  # (V,) or None
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.vectors = torch.zeros(0, d)

    def __len__(self) -> int:
        return len(self.keys)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Keys not in the bank yet, de-duplicated, in first-seen order."""
        seen: dict[str, None] = {}
        for k in keys:
            if k not in self.index:
                seen.setdefault(k, None)
        return list(seen)

    def add(self, keys: Sequence[str], vectors: torch.Tensor) -> list[int]:
        """Append new rows; a key already present is an error (records are immutable)."""
        if vectors.shape != (len(keys), self.d):
            raise ValueError(f"expected vectors of shape ({len(keys)}, {self.d}), got {tuple(vectors.shape)}")
        if not torch.isfinite(vectors).all():
            raise ValueError("record vectors contain NaN or inf")
        start = len(self.keys)
        for i, k in enumerate(keys):
            if k in self.index:
                raise KeyError(f"record {k!r} is already in the bank")
            self.index[k] = start + i
        self.keys.extend(keys)
        self.vectors = torch.cat([self.vectors, vectors.detach().float()])
        return list(range(start, start + len(keys)))

    def rows(self, keys: Sequence[str]) -> list[int]:
        try:
            return [self.index[k] for k in keys]
        except KeyError as e:
            raise KeyError(f"record {e.args[0]!r} is not in the record bank") from None
