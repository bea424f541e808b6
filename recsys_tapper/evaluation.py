"""Prediction and scoring on question samples.

For rating tasks one forward pass reads the next-token distribution over the labels "1".."5": the argmax is
the answer and the expectation is reported beside it.

Example::

    rows = predict_labels(model, fb, samples, label_ids, labels)   # [{"id", "pred", "expected", ...}]
    rating_report(rows)                                            # {"mae", "rmse", "mae_expected", ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.metrics import rating_metrics, rating_metrics_numeric
from recsys_tapper.model import TapperModel


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """First token of each label; labels must differ in their first token."""
    ids = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} share first tokens {ids}; score them by generation instead")
    return ids


@torch.no_grad()
def predict_labels(
    model: TapperModel,
    fb: FeatureBuilder,
    samples: Sequence[Sample],
    labels: Sequence[str],
    batch_size: int = 32,
    desc: str = "predict",
) -> list[dict]:
    model.eval()
    label_ids = label_token_ids(fb.tok, labels)
    values = torch.tensor([float(x) for x in labels]) if all(x.isdigit() for x in labels) else None
    bank = fb.bank.vectors
    # The scorer is frozen here: its per-record term is computed once for the whole bank.
    record_terms = model.tower.pooling.scorer.record_term(bank) if model.personalized else None
    rows = []
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[i : i + batch_size]
        batch = fb.collate(chunk, with_labels=False)
        probs = model.label_probs(batch, bank, label_ids, record_terms)  # (B, n_labels)
        for s, p, cold in zip(chunk, probs, batch.cold):
            row = {"id": s.id, "user": s.user, "gold": s.answer, "pred": labels[int(p.argmax())], "cold": cold}
            if values is not None:
                row["expected"] = float(p @ values)
            rows.append(row)
    return rows


def rating_report(rows: Sequence[dict]) -> dict:
    golds = [r["gold"] for r in rows]
    rep = rating_metrics([r["pred"] for r in rows], golds)
    if rows and "expected" in rows[0]:
        num = rating_metrics_numeric([r["expected"] for r in rows], [float(g) for g in golds])
        rep.update(mae_expected=num["mae"], rmse_expected=num["rmse"])
    rep["n"] = len(rows)
    return rep
