"""RAG baselines: the question with k of the user's profile records in front, scored by the Stage-1 model.

``rag_recency_k4`` takes the 4 most recent records, ``rag_bm25_k4`` the 4 records BM25 ranks highest
(``rank_bm25.BM25Okapi``; documents = ``task.record_text`` of each record, query = the question input with the
task's fixed instruction removed, as LaMP's retrievers do). The picked records are listed oldest first,
then the question::

    Past records of this user:
    - Heat (1995) | Action rating: 4
    - ...
    Rate the movie from 1 to 5. movie: Casino (1995) | Drama

The augmented text replaces the question input, so the usual ``FeatureBuilder`` / ``predict_labels`` path
scores it with the Stage-1 model alone (``TapperModel(lm, None, None)``: no prefix, no history).

Prompt length: CPU forward cost grows with it, so every record field except the label is cut to
``max_record_chars`` characters (the label, e.g. ``rating: 4``, is always kept). ``FeatureBuilder`` keeps only
the first ``max_prompt_tokens`` prompt tokens, which would cut the *question* off the end: :func:`rag_samples`
shrinks the record budget (then drops records) until the whole prompt fits. Raise ``model.max_prompt_tokens``
(e.g. to 192) to give RAG its 4 records in full.

Example::

    samples = rag_samples(fb, test, k=4, method="bm25")
    rows = predict_labels(TapperModel(stage1_lm, None, None), fb, samples, task.labels)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from recsys_tapper.data import LampExample, ProfileRecord
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.tasks import Task

RECENCY, BM25 = "recency", "bm25"
RAG_METHODS: dict[str, tuple[str, int]] = {"rag_recency_k4": (RECENCY, 4), "rag_bm25_k4": (BM25, 4)}
HEADER = "Past records of this user:"
_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (``\\w+``)."""
    return _WORD.findall(text.lower())


def query_text(example: LampExample, task: Task) -> str:
    """The question input without the task's fixed instruction (the text before the template's first field)."""
    if task.input_template:
        head = task.input_template.split("{", 1)[0]
        if head and example.input.startswith(head):
            return example.input[len(head) :]
    return example.input


def select_records(example: LampExample, task: Task, k: int, method: str) -> list[ProfileRecord]:
    """The k records to show, oldest first.

    ``recency``: the last k of the (date-sorted) profile. ``bm25``: the k best BM25 scores of the query against
    each record's ``task.record_text``; ties go to the more recent record.
    """
    profile = example.profile
    if k <= 0 or not profile:
        return []
    if method == RECENCY:
        return list(profile[-k:])
    if method != BM25:
        raise ValueError(f"unknown RAG method {method!r}: use {RECENCY!r} or {BM25!r}")
    from rank_bm25 import BM25Okapi

    docs = [bm25_tokens(task.record_text(r.fields)) or ["<empty>"] for r in profile]
    scores = BM25Okapi(docs).get_scores(bm25_tokens(query_text(example, task)))
    best = sorted(range(len(profile)), key=lambda j: (-scores[j], -j))[:k]
    return [profile[j] for j in sorted(best)]


def _short(fields, task: Task, max_chars: int) -> dict[str, str]:
    out = {}
    for name, value in fields.items():
        value = " ".join(str(value).split())
        if name != task.output_field and len(value) > max_chars:
            value = value[:max_chars].rstrip() + "..."
        out[name] = value
    return out


def format_rag(question: str, records: Sequence[ProfileRecord], task: Task, max_record_chars: int) -> str:
    if not records:
        return question
    lines = [HEADER] + [f"- {task.record_text(_short(r.fields, task, max_record_chars))}" for r in records]
    return "\n".join(lines + [question])


def rag_question(example: LampExample, task: Task, k: int = 4, method: str = RECENCY,
                 max_record_chars: int = 100) -> str:
    """The question input with the user's k picked profile records in front (see the module docstring).

    Args:
        example: the question and its user's profile.
        task: gives ``record_text`` (record rendering, BM25 documents) and the label field kept whole.
        k: records to include.
        method: ``"recency"`` or ``"bm25"``.
        max_record_chars: every non-label field of a shown record is cut to this many characters.
    """
    return format_rag(example.input, select_records(example, task, k, method), task, max_record_chars)


def rag_samples(fb: FeatureBuilder, examples: Sequence[LampExample], k: int = 4, method: str = RECENCY,
                max_record_chars: int = 100, min_record_chars: int = 12) -> list[Sample]:
    """One no-history sample per question, its input augmented by :func:`rag_question`, fitted to
    ``fb.max_prompt_tokens``: the per-record budget shrinks by 20% steps down to ``min_record_chars``, then
    the oldest shown record is dropped, until the tokenized prompt fits. The question itself is never cut."""
    out = []
    for ex in examples:
        records = select_records(ex, fb.task, k, method)
        chars = max_record_chars
        text = format_rag(ex.input, records, fb.task, chars)
        while records and len(fb.tok(text, add_special_tokens=False)["input_ids"]) > fb.max_prompt_tokens:
            if chars > min_record_chars:
                chars = max(min_record_chars, int(chars * 0.8))
            else:
                records = records[1:]
            text = format_rag(ex.input, records, fb.task, chars)
        out.append(Sample(ex.id, ex.user_id, [], [], ex.date, text, ex.output))
    return out


def run_rag(model, fb: FeatureBuilder, examples: Sequence[LampExample], name: str = "rag_bm25_k4",
            batch_size: int = 32, max_record_chars: int = 100) -> list[dict]:
    """Rows (as ``evaluation.predict_labels``) of RAG method ``name`` from :data:`RAG_METHODS`; ``model`` is
    the Stage-1 model without prefix, ``TapperModel(lm, None, None)``."""
    from recsys_tapper.evaluation import predict_labels

    method, k = RAG_METHODS[name]
    samples = rag_samples(fb, examples, k=k, method=method, max_record_chars=max_record_chars)
    return predict_labels(model, fb, samples, fb.task.labels, batch_size=batch_size, desc=name)
