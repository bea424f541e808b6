"""Prediction and scoring on question samples.

For rating tasks one forward pass reads the next-token distribution over the labels "1".."5": the argmax is
the answer and the expectation is reported beside it. Generation tasks answer by greedy decoding, scored with
ROUGE-1/ROUGE-L. Classification tasks answer by label-set scoring (``recsys_tapper.label_scoring``) or, as an
option, by greedy decoding (``predict_texts``; LaMP's rule: a class answer outside the label set is wrong), scored
with accuracy/macro-F1.

Example::

    rows = predict_labels(model, fb, samples, labels)   # [{"id", "pred", "expected", ...}]
    rating_report(rows)                                 # {"mae", "rmse", "mae_expected", ...}
    rows = predict_texts(model, fb, samples)            # [{"id", "pred", "gold", ...}]
    task_report(task, rows)                             # {"accuracy", "f1"} or {"rouge1", "rougeL"}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.metrics import (
    classification_metrics,
    rating_metrics,
    rating_metrics_numeric,
    rouge_metrics,
)
from recsys_tapper.model import TapperModel
from recsys_tapper.tasks import CLASSIFICATION, RATING, Task


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """First token of each label; labels must differ in their first token."""
    ids = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} share first tokens {ids}; score them by generation instead")
    return ids


def eval_batches(model: TapperModel, fb: FeatureBuilder, samples: Sequence[Sample], batch_size: int, desc: str):
    """Yield (samples, prompt-only batch) in eval mode, with a progress bar. (The tower caches its bank's
    record terms while the scorer is frozen: computed once for the whole bank.)"""
    model.eval()
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[i : i + batch_size]
        yield chunk, fb.collate(chunk, with_labels=False)


@torch.no_grad()
def predict_labels(
    model: TapperModel,
    fb: FeatureBuilder,
    samples: Sequence[Sample],
    labels: Sequence[str],
    batch_size: int = 32,
    desc: str = "predict",
) -> list[dict]:
    label_ids = label_token_ids(fb.tok, labels)
    values = torch.tensor([float(x) for x in labels]) if all(x.isdigit() for x in labels) else None
    rows = []
    for chunk, batch in eval_batches(model, fb, samples, batch_size, desc):
        probs = model.label_probs(batch, label_ids)  # (B, n_labels)
        for s, p, cold in zip(chunk, probs, batch.cold):
            row = {"id": s.id, "user": s.user, "gold": s.answer, "pred": labels[int(p.argmax())], "cold": cold}
            if values is not None:
                row["expected"] = float(p @ values)
                row["median"] = labels[median_index(p)]
            rows.append(row)
    return rows


def median_index(p: torch.Tensor) -> int:
    """Index of the median of a distribution over ordered labels: the first label whose CDF reaches 1/2
    (the MAE-optimal answer)."""
    return int((torch.cumsum(p, 0) >= 0.5).nonzero()[0])


READOUTS = ("argmax", "median", "expected")


def rating_report(rows: Sequence[dict], readout: str = "argmax", rmse_readout: str | None = None) -> dict:
    """MAE/RMSE of each readout of the label distribution: ``argmax`` (the answer), ``median`` (MAE-optimal)
    and ``expected`` (the mean, real-valued, RMSE-optimal); ``mae`` is that of ``readout`` and ``rmse`` that of
    ``rmse_readout`` (default: ``readout``), both named in the report."""
    rmse_readout = rmse_readout or readout
    for r in (readout, rmse_readout):
        if r not in READOUTS:
            raise ValueError(f"unknown readout {r!r}; use one of {READOUTS}")
    golds = [r["gold"] for r in rows]
    rep = rating_metrics([r["pred"] for r in rows], golds)
    rep.update(mae_argmax=rep["mae"], rmse_argmax=rep["rmse"])
    if rows and "median" in rows[0]:
        med = rating_metrics([r["median"] for r in rows], golds)
        rep.update(mae_median=med["mae"], rmse_median=med["rmse"])
    if rows and "expected" in rows[0]:
        num = rating_metrics_numeric([r["expected"] for r in rows], [float(g) for g in golds])
        rep.update(mae_expected=num["mae"], rmse_expected=num["rmse"])
    for r in (readout, rmse_readout):
        if f"mae_{r}" not in rep:
            raise ValueError(f"readout {r!r} needs '{r}' in the prediction rows")
    rep.update(mae=rep[f"mae_{readout}"], rmse=rep[f"rmse_{rmse_readout}"], readout=readout,
               rmse_readout=rmse_readout, n=len(rows))
    return rep


def choose_readout(dev_rows: Sequence[dict]) -> tuple[str, str, dict[str, float]]:
    """The headline readouts of a model: for MAE the readout with the lowest MAE on the dev queries, for RMSE the
    one with the lowest RMSE (ties: argmax, median, expected in that order), and each readout's dev MAE and
    RMSE (``mae_median``, ...). Test queries never enter the choice."""
    reps = {r: rating_report(dev_rows, r) for r in READOUTS}
    dev = {f"{m}_{r}": reps[r][m] for r in READOUTS for m in ("mae", "rmse")}

    def best(metric: str) -> str:
        return min(READOUTS, key=lambda r: (reps[r][metric], READOUTS.index(r)))

    return best("mae"), best("rmse"), dev


@torch.no_grad()
def predict_texts(
    model: TapperModel,
    fb: FeatureBuilder,
    samples: Sequence[Sample],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[dict]:
    """Greedy answers, decoded and stripped, one row per sample: ``{"id", "user", "gold", "pred", "cold"}``."""
    rows = []
    for chunk, batch in eval_batches(model, fb, samples, batch_size, desc):
        tokens = model.generate(batch, max_new_tokens, fb.tok.eos_token_id)
        for s, toks, cold in zip(chunk, tokens, batch.cold):
            pred = fb.tok.decode(toks, skip_special_tokens=True).strip()
            rows.append({"id": s.id, "user": s.user, "gold": s.answer, "pred": pred, "cold": cold})
    return rows


def task_report(task: Task, rows: Sequence[dict], readouts: tuple[str, str] = ("argmax", "argmax")) -> dict:
    """The task's LaMP metrics over prediction rows (``predict_labels``, ``predict_texts`` or
    ``label_scoring.predict_label_set``); rating tasks report MAE by ``readouts[0]`` and RMSE by ``readouts[1]``
    (see ``rating_report``)."""
    if any(r["gold"] is None for r in rows):
        raise ValueError(f"task {task.name}: {sum(r['gold'] is None for r in rows)} questions have no gold output")
    if task.kind == RATING:
        return rating_report(rows, *readouts)
    preds, golds = [r["pred"] for r in rows], [r["gold"] for r in rows]
    if task.kind != CLASSIFICATION:
        return {**rouge_metrics(preds, golds), "n": len(rows)}
    out_of_set = sum(p.strip() not in task.labels for p in preds) / max(1, len(preds))
    return {**classification_metrics(preds, golds, task.labels), "out_of_label_set_frac": out_of_set, "n": len(rows)}
