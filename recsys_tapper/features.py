"""The one feature builder, shared by training and serving: examples -> model-ready batches.

A ``Sample`` is one (user, visible history, query, answer) item. ``FeatureBuilder.collate`` turns a list of
samples into a ``Batch``: the user KJT, the ``History`` (record rows in a KJT, day gaps beside them), query
vectors, and right-padded prompt+answer token ids with answer-only labels.

Example::

    fb = FeatureBuilder(tokenizer, encoder, task, bank, users)
    fb.register(examples)                       # encode every profile record once, into the bank
    samples = fb.question_samples(examples)     # or fb.profile_samples(examples, per_user=20)
    batch = fb.collate(samples[:16])
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.history import History, build_history
from embeddings.record_bank import RecordBank
from embeddings.user_state import user_kjt

ITEM_ID = "item_id"
from llm_bridge.encoder import TextEncoder, sif_weights
from llm_bridge.inject import IGNORE
from recsys_tapper.data import LampExample
from recsys_tapper.errors import InputError
from recsys_tapper.tasks import RATING, Task
from recsys_tapper.users import UserIndex


@dataclass
class Sample:
    id: str
    user: str
    history_rows: list[int]
    history_days: list[float | None]
    query_day: float | None
    question: str
    answer: str | None
    item: str | None = None  # the query's item id (MovieLens movie), for the optional item table


@dataclass
class Batch:
    ids: list[str]
    users: KeyedJaggedTensor
    history: History
    q: torch.Tensor  # (B, d)
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor | None  # (B, T), answer tokens only
    last_prompt: torch.Tensor  # (B,) index of the last prompt token
    answers: list[str | None]
    cold: list[bool]  # user had no trained row
    items: KeyedJaggedTensor | None = None  # ``item_id`` KJT when the builder has an item index
    # (n, d) vectors of history records the record bank lacks (serving): history ids ``len(bank) + i`` read row i
    extra_records: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (KJT, ``History``) on ``device``, as TorchRec's ``Batch.to``."""
        def mv(x):
            return None if x is None else x.to(device=device, non_blocking=non_blocking)

        return Batch(self.ids, mv(self.users), mv(self.history), mv(self.q), mv(self.input_ids),
                     mv(self.attention_mask), mv(self.labels), mv(self.last_prompt), self.answers, self.cold,
                     mv(self.items), mv(self.extra_records))


TEXT_WEIGHTINGS = ("mean", "sif")
SIF_A = 1e-3  # the smooth-inverse-frequency constant (Arora et al. 2017's default)


def check_text_weighting(weighting: str) -> None:
    if weighting not in TEXT_WEIGHTINGS:
        raise InputError(f"model.text_weighting {weighting!r} is not one of {', '.join(TEXT_WEIGHTINGS)}")


def text_weights(weighting: str, tokenizer, task: Task, examples: Sequence[LampExample],
                 vocab_size: int) -> torch.Tensor | None:
    """(V,) token weights of the record and question vectors (``model.text_weighting``), or None.

    ``mean``: None, the paper's plain mean. ``sif``: smooth-inverse-frequency weights a / (a + p(t)) fitted on
    the examples' profile record texts (history only; no question or answer is read), so that the rare tokens
    that tell records apart (a film's genre) outweigh the template every record shares.
    """
    check_text_weighting(weighting)
    if weighting == "mean":
        return None
    texts = [task.record_text(r.fields) for ex in examples for r in ex.profile]
    return sif_weights(tokenizer, texts, vocab_size, SIF_A)


def bank_key(m) -> tuple:
    """What the record vectors of model config ``m`` depend on beyond the records: ``(record_label_weight,
    text_weighting)``. Feature builders with equal keys over the same records hold equal banks."""
    return m.record_label_weight, m.text_weighting


def feature_builder(m, lm, tokenizer, task: Task, users: UserIndex, examples: Sequence[LampExample],
                    encoder_lm=None, progress: bool = False) -> FeatureBuilder:
    """The feature builder of model config ``m`` with ``examples``' profile records registered: token weights
    fitted on those records (``m.text_weighting``), the encoder and the record bank made with them.

    ``encoder_lm``: the module whose input embeddings encode (an executor's ``encoder_view``); default ``lm``.
    """
    weights = text_weights(m.text_weighting, tokenizer, task, examples, lm.get_input_embeddings().num_embeddings)
    encoder = TextEncoder(lm if encoder_lm is None else encoder_lm, tokenizer, m.max_record_tokens,
                          token_weights=weights)
    fb = FeatureBuilder(tokenizer, encoder, task, RecordBank(lm.config.hidden_size, token_weights=weights), users,
                        m.max_prompt_tokens, m.max_history, label_weight=m.record_label_weight)
    fb.register(examples, progress=progress)
    return fb


def saved_feature_builder(m, model, tokenizer, task: Task, bank: RecordBank, users: UserIndex) -> FeatureBuilder:
    """The feature builder of a saved model (``tapper serve``, ``update``, ``evaluate``): its record bank, an encoder
    with the token weights the training job fitted (saved with the bank), and its item index; ``m`` is the saved
    model config. New records and questions are then encoded as the job encoded its own."""
    encoder = TextEncoder(model.lm, tokenizer, m.max_record_tokens, token_weights=bank.token_weights)
    return FeatureBuilder(tokenizer, encoder, task, bank, users, m.max_prompt_tokens, m.max_history,
                          items=model.item_index, label_weight=m.record_label_weight)


def record_key(user: str, record_id: str) -> str:
    return f"{user}/{record_id}"


def record_item(user: str, record_id: str) -> str:
    """The item of a profile record: its id without the ``f"{user}_"`` prefix (MovieLens ids are
    ``f"{user}_{item}"``; the whole id otherwise)."""
    return record_id.removeprefix(f"{user}_")


class FeatureBuilder:
    def __init__(
        self,
        tokenizer,
        encoder: TextEncoder,
        task: Task,
        bank: RecordBank,
        users: UserIndex,
        max_prompt_tokens: int = 96,
        max_history: int | None = None,
        items: UserIndex | None = None,
        label_weight: float = 0.0,
    ) -> None:
        self.tok, self.encoder, self.task, self.bank, self.users = tokenizer, encoder, task, bank, users
        self.label_weight = label_weight  # record vector = enc(record text) + label_weight * enc(label)
        self.items = items  # item id -> item-table row (None: no item table)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_history = max_history
        self.eos = tokenizer.eos_token_id
        # A rating is one label token read from the next-token logits: the loss stays on that token alone.
        # Tasks answered by generation also learn to stop (EOS).
        self.append_eos = task.kind != RATING
        self.suffix_ids: list[int] = tokenizer(task.prompt_suffix, add_special_tokens=False)["input_ids"]

    def register(self, examples: Sequence[LampExample], progress: bool = False) -> int:
        """Encode every profile record not yet in the bank (:meth:`record_vectors`); returns how many were added."""
        uniq = {}
        for ex in examples:
            for r in ex.profile:
                k = record_key(ex.user_id, r.id)
                if k not in self.bank.index:
                    uniq[k] = r.fields  # a key met twice keeps its last fields, as before
        if uniq:
            self.bank.add(list(uniq), self.record_vectors(list(uniq.values()), progress=progress))
        return len(uniq)

    def record_vectors(self, fields: Sequence, progress: bool = False) -> torch.Tensor:
        """(N records' fields) -> (N, d): the mean input embedding of ``task.record_text`` (the paper's h_j), plus,
        with ``label_weight`` w > 0, w times the mean embedding of the label alone, so that the label is not one
        token in ~25 of the record's mean (``model.record_label_weight``)::

            h_j = mean_emb(record_text_j) + w * mean_emb(label_j)
        """
        h = self.encoder.encode([self.task.record_text(f) for f in fields], progress=progress)  # (N, d)
        out = self.task.output_field
        if self.label_weight and out is not None:
            h = h + self.label_weight * self.encoder.encode([str(f[out]).strip() for f in fields])  # (N, d)
        return h

    def history_window(self, ex: LampExample, upto: int | None = None) -> tuple[list[int], list[float | None]]:
        """Bank rows and dates of the records ``ex.profile[:upto]`` (all when None), the last ``max_history``."""
        recs = ex.profile[:upto] if upto is not None else ex.profile
        if self.max_history is not None:
            recs = recs[-self.max_history :] if self.max_history > 0 else ()
        rows = self.bank.rows([record_key(ex.user_id, r.id) for r in recs])
        return rows, [r.date for r in recs]

    def question_samples(self, examples: Sequence[LampExample]) -> list[Sample]:
        """One sample per question, its whole profile as visible history."""
        out = []
        for ex in examples:
            rows, days = self.history_window(ex)
            out.append(Sample(ex.id, ex.user_id, rows, days, ex.date, ex.input, ex.output, ex.extras.get("item_id")))
        return out

    def profile_samples(
        self, examples: Sequence[LampExample], per_user: int | None = None, min_history: int = 1, seed: int = 0
    ) -> list[Sample]:
        """Stage-2 examples from each user's profile: record i is the target, records before it the history.

        Each user contributes once (the first question seen for that user); ``per_user`` keeps that user's
        most recent targets.
        """
        seen: set[str] = set()
        out = []
        for ex in examples:
            if ex.user_id in seen:
                continue
            seen.add(ex.user_id)
            targets = range(min_history, len(ex.profile))
            if per_user is not None:
                targets = targets[-per_user:]
            for i in targets:
                rec = ex.profile[i]
                question, answer = self.task.record_example(rec.fields)
                rows, days = self.history_window(ex, upto=i)
                out.append(Sample(f"{ex.user_id}/{rec.id}", ex.user_id, rows, days, rec.date, question, answer,
                                  record_item(ex.user_id, rec.id)))
        random.Random(seed).shuffle(out)
        return out

    def gold_question_samples(
        self, examples: Sequence[LampExample], per_user: int | None = None, seed: int = 0
    ) -> list[Sample]:
        """Stage-2 examples for tasks whose profile records carry no label (LaMP-1, LaMP-7): the users'
        questions that have a gold output, each with its own profile as history; ``per_user`` keeps each
        user's latest (by date, then file order)."""
        by_user: dict[str, list[tuple[int, LampExample]]] = {}
        for i, ex in enumerate(examples):
            if ex.output is not None and self.users.row(ex.user_id) is not None:
                by_user.setdefault(ex.user_id, []).append((i, ex))
        picked = []
        for rows in by_user.values():
            rows.sort(key=lambda t: (t[1].date is None, t[1].date or 0.0, t[0]))
            picked += [ex for _, ex in (rows[-per_user:] if per_user is not None else rows)]
        out = self.question_samples(picked)
        random.Random(seed).shuffle(out)
        return out

    def stage2_samples(self, examples: Sequence[LampExample], per_user: int | None = None, seed: int = 0) -> list[Sample]:
        """Stage-2 targets: profile records (record i, history before it) when the task's records carry a label,
        else the users' gold-labelled questions (:meth:`gold_question_samples`)."""
        if self.task.input_template is not None:
            return self.profile_samples(examples, per_user=per_user, seed=seed)
        return self.gold_question_samples(examples, per_user=per_user, seed=seed)

    def _prompt_ids(self, question: str) -> list[int]:
        ids = self.tok(question, add_special_tokens=False)["input_ids"][: self.max_prompt_tokens]
        return ids + self.suffix_ids

    def answer_ids(self, answer: str) -> list[int]:
        """The target tokens of an answer: its ids, + EOS for non-rating tasks. Training labels and label-set
        scoring (``recsys_tapper.label_scoring``) both read them here."""
        a = self.tok(answer, add_special_tokens=False)["input_ids"]
        return a + [self.eos] if self.append_eos else a

    def token_rows(self, samples: Sequence[Sample], with_labels: bool = True) -> list[list[int]]:
        """Each sample's prompt ids (+ :meth:`answer_ids` when ``with_labels``)."""
        return [self._prompt_ids(s.question) + (self.answer_ids(s.answer) if with_labels else []) for s in samples]

    def trunk_rows(self, samples: Sequence[Sample], with_labels: bool = True) -> list[list[int]]:
        """The token sequences a late-prefix model runs through its cached trunk for these samples: the
        collated row without its last token when it carries labels (that token is only ever a target)."""
        return [r[:-1] if with_labels else r for r in self.token_rows(samples, with_labels)]

    def collate(self, samples: Sequence[Sample], with_labels: bool = True) -> Batch:
        rows = self.token_rows(samples, with_labels)
        n_prompt = [len(self._prompt_ids(s.question)) for s in samples]
        t = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), t), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        labels = torch.full((len(rows), t), IGNORE, dtype=torch.long) if with_labels else None
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            if labels is not None:
                labels[i, n_prompt[i] : len(r)] = torch.tensor(r[n_prompt[i] :])
        user_rows = [self.users.row(s.user) for s in samples]
        return Batch(
            ids=[s.id for s in samples],
            users=user_kjt(user_rows),
            history=build_history([s.history_rows for s in samples], [s.history_days for s in samples],
                                  [s.query_day for s in samples]),
            q=self.encoder.encode([s.question for s in samples]),
            input_ids=input_ids,
            attention_mask=mask,
            labels=labels,
            last_prompt=torch.tensor(n_prompt) - 1,
            answers=[s.answer for s in samples],
            cold=[r is None for r in user_rows],
            items=None if self.items is None else user_kjt(
                [None if s.item is None else self.items.row(s.item) for s in samples], key=ITEM_ID),
        )
