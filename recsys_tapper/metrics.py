"""LaMP's official evaluation: accuracy/macro-F1, MAE/RMSE on ratings, ROUGE-1/ROUGE-L.

Mirrors ``LaMP/eval/evaluation.py`` without its ``evaluate``/sklearn dependencies:

- classification: strip whitespace; macro-F1 averages over *every* label of the task's set
  (sklearn ``f1_score(average="macro", labels=labels, zero_division=0)``), so a label nobody
  predicted and nobody needed still counts with F1 = 0. A prediction outside the set is wrong.
- rating: an unparsable prediction counts as whichever of 1 and 5 is farther from the gold
  (5 on a tie, as in LaMP).
- generation: ROUGE F-measures from ``rouge_score`` (stemming on), averaged over examples.

Example::

    >>> rating_metrics(["1", "x", "5"], ["2", "4", "5"])["mae"]
    1.3333333333333333
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_LEADING_NUMBER = re.compile(r"(\d+)(\.\d+)?")


def _check_lengths(preds: Sequence, golds: Sequence) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} golds")
    if not golds:
        raise ValueError("no examples to score")


def classification_metrics(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy and macro-F1 over a closed label set.

    Args:
        preds: predicted labels (whitespace is stripped).
        golds: gold labels, same length.
        labels: the task's label set (e.g. ``LABEL_SETS["LaMP-1"]``); F1 is averaged over all of them.

    Returns:
        ``{"accuracy": float, "f1": float}``.

    Example::

        >>> classification_metrics(["[1]", "[1]"], ["[1]", "[2]"], ["[1]", "[2]"])
        {'accuracy': 0.5, 'f1': 0.3333333333333333}
    """
    _check_lengths(preds, golds)
    label_set = [lab.strip() for lab in labels]
    p = [x.strip() for x in preds]
    g = [x.strip() for x in golds]
    accuracy = sum(a == b and a in label_set for a, b in zip(p, g)) / len(g)
    f1s = []
    for lab in label_set:
        tp = sum(a == lab and b == lab for a, b in zip(p, g))
        fp = sum(a == lab and b != lab for a, b in zip(p, g))
        fn = sum(a != lab and b == lab for a, b in zip(p, g))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)  # == 2PR/(P+R), 0 when undefined
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s)}


def parse_rating(text: str) -> int | None:
    """Read a 1..5 rating from the start of a generated text.

    The stripped text must begin with an integer (``"4.0"`` also counts); anything after it is
    ignored. Returns ``None`` when there is no such number or it is outside 1..5.

    Example::

        >>> [parse_rating(t) for t in ["4", " 4.", "4 stars", "4.0", "five", "", "7", "4.5"]]
        [4, 4, 4, 4, None, None, None, None]
    """
    m = _LEADING_NUMBER.match(text.strip())
    if m is None:
        return None
    whole, frac = m.groups()
    if frac is not None and frac.strip(".0"):
        return None
    value = int(whole)
    return value if 1 <= value <= 5 else None


def _mae_rmse(values: Sequence[float], golds: Sequence[float]) -> dict:
    errors = [float(v) - float(g) for v, g in zip(values, golds)]
    if not all(math.isfinite(e) for e in errors):
        raise ValueError("predictions and golds must be finite numbers")
    return {"mae": sum(abs(e) for e in errors) / len(errors),
            "rmse": math.sqrt(sum(e * e for e in errors) / len(errors))}


def rating_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict:
    """MAE and RMSE of generated ratings against gold ratings ``"1".."5"``.

    Args:
        preds: generated texts, read with :func:`parse_rating`.
        golds: gold ratings as text.

    Returns:
        ``{"mae", "rmse", "unparsable_frac"}``; an unparsable prediction counts as 1 or 5,
        whichever is farther from the gold (5 when gold is 3).

    Example::

        >>> rating_metrics(["4", "oops"], ["4", "2"])
        {'mae': 1.5, 'rmse': 2.1213203435596424, 'unparsable_frac': 0.5}
    """
    _check_lengths(preds, golds)
    gold_values = []
    for g in golds:
        value = parse_rating(g)
        if value is None:
            raise ValueError(f"gold rating {g!r} is not an integer in 1..5")
        gold_values.append(value)
    values, n_bad = [], 0
    for p, g in zip(preds, gold_values):
        value = parse_rating(p)
        if value is None:
            n_bad += 1
            value = 1 if abs(1 - g) > abs(5 - g) else 5
        values.append(value)
    return {**_mae_rmse(values, gold_values), "unparsable_frac": n_bad / len(golds)}


def rating_metrics_numeric(values: Sequence[float], golds: Sequence[float]) -> dict:
    """MAE and RMSE of real-valued predictions (e.g. the expected rating under the LM's distribution).

    Example::

        >>> rating_metrics_numeric([3.5, 5.0], [4, 3])
        {'mae': 1.25, 'rmse': 1.4577379737113252}
    """
    _check_lengths(values, golds)
    return _mae_rmse(values, golds)


def rouge_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict:
    """Mean ROUGE-1 and ROUGE-L F-measures (``rouge_score``, Porter stemming on, texts stripped).

    Example::

        >>> rouge_metrics(["the cat sat"], ["the cat sat down"])["rouge1"]
        0.8571428571428571
    """
    from rouge_score import rouge_scorer

    _check_lengths(preds, golds)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rougeL": 0.0}
    for p, g in zip(preds, golds):
        scores = scorer.score(g.strip(), p.strip())  # score(target, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: total / len(golds) for key, total in totals.items()}
