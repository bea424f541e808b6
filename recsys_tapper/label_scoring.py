"""Label-set scoring: a classification answer is the label the model finds most likely behind the prompt.

For each question and each label l of the task's label set, the score is the length-normalised log-likelihood of
l's target tokens a = ``FeatureBuilder.answer_ids(l)`` (l's tokens + EOS: exactly what Stage 1 and Stage 2 train
on) behind the prefix and the prompt:

    score(l) = 1/n_l · Σ_m log p(a_m | P, prompt, a_<m),        n_l = |a|       (norm="mean", the default)
    score(l) =         Σ_m log p(a_m | P, prompt, a_<m)                          (norm="sum": log p(l | P, prompt))

The mean favours long labels: after a label's first token the rest are nearly certain, so a 4-token label's
uncertain first token is divided by 5 and a 1-token label's by 2. The sum is the label's own probability
(``trainer.label_norm``; which one answers best is a validation choice).

The answer is argmax_l score(l), so it is always in the label set (a format slip cannot score 0). All labels share
the prompt's forward pass: one packed row per question holds the prompt once and every label's inputs after it,
under a tree mask (a label sees the prefix, the prompt and its own earlier tokens; its positions restart behind
the prompt, as if it stood there alone)::

    row       [P_1..P_L | p_1 .. p_T | a¹_1 .. a¹_{n_1-1} | a²_1 .. a²_{n_2-1} | .. | pad]
    position   0 .. L-1 | L .. L+T-1 | L+T .. L+T+n_1-2   | L+T .. L+T+n_2-2   | ..
    reads      a^j_1 at p_T (one state for every label), a^j_m at a^j_{m-1}; a label's last token is only a target

Cost: one forward pass per question over L + T + Σ_l (n_l - 1) positions, batched over questions, instead of K
passes over L + T + n_l each. With the cached trunk (``prefix_layer`` k > 0) the packed row also runs through
layers 0..k-1 once (at the trunk's offset, rounded to its storage dtype as the cache would): the cache holds only
the states entering layer k, not the keys and values below k that the continuations attend to, so it is not read.

Example::

    rows = predict_label_set(model, fb, samples, task.labels)   # [{"id", "user", "gold", "pred", "cold", "label_scores"}]
    task_report(task, rows)                                      # {"accuracy", "f1", "out_of_label_set_frac": 0.0, ...}
    rep, rows = classify(model, fb, samples, task, "both")       # + accuracy_generate, f1_generate, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_bridge.trunk import decoder, run_layers
from recsys_tapper.evaluation import eval_batches, predict_texts, task_report
from recsys_tapper.features import Batch, FeatureBuilder, Sample
from recsys_tapper.model import TapperModel
from recsys_tapper.tasks import Task

CLASS_READOUTS = ("label_set", "generate", "both")
LABEL_NORMS = ("mean", "sum")


@dataclass
class TreeLayout:
    """B packed rows of S token positions (no prefix slots) and Q = Σ_l n_l read-outs per row.

    Args:
        ids: (B, S) prompt ids, then every label's inputs (its targets but the last), then padding.
        allowed: (B, S, S) bool, query may attend to key.
        positions: (B, S) RoPE positions counted from the first prompt token.
        read_pos: (B, Q) the position whose output predicts each target.
        targets: (Q,) the target token ids, label after label.
        label_of: (Q,) which label each target belongs to.
        n_targets: (K,) n_l.
    """

    ids: torch.Tensor
    allowed: torch.Tensor
    positions: torch.Tensor
    read_pos: torch.Tensor
    targets: torch.Tensor
    label_of: torch.Tensor
    n_targets: torch.Tensor


def tree_layout(prompts: Sequence[Sequence[int]], label_targets: Sequence[Sequence[int]], pad_id: int = 0) -> TreeLayout:
    """Pack each prompt with every label's continuation (see the module docstring).

    Example::

        lay = tree_layout([[5, 6, 7]], [[8, 1], [9, 9, 1]])   # 2 labels: "8"+EOS, "99"+EOS
        lay.ids        # [[5, 6, 7, 8, 9, 9]]
        lay.positions  # [[0, 1, 2, 3, 3, 4]]
        lay.read_pos   # [[2, 3, 2, 4, 5]]
    """
    if any(len(t) == 0 for t in label_targets):
        raise ValueError(f"a label has no target tokens: {[list(t) for t in label_targets]}")
    inputs = [list(t[:-1]) for t in label_targets]  # a label's last target is never an input
    seg = torch.tensor([len(x) for x in inputs])  # (K,)
    starts = torch.cumsum(seg, 0) - seg  # (K,) where each label's inputs begin, behind the prompt
    n_lab = int(seg.sum())
    t = torch.tensor([len(p) for p in prompts])  # (B,)
    s = int(t.max()) + n_lab
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    tail = [x for inp in inputs for x in inp]
    for i, p in enumerate(prompts):
        ids[i, : len(p) + n_lab] = torch.tensor(list(p) + tail, dtype=torch.long)
    idx = torch.arange(s)[None, :]  # (1, S)
    rel = idx - t[:, None]  # (B, S) index behind the prompt's end
    owner = torch.repeat_interleave(torch.arange(len(inputs)), seg)  # (n_lab,) label of each input slot
    in_labels = (rel >= 0) & (rel < n_lab)
    group = torch.full(rel.shape, -1, dtype=torch.long)  # -1 prompt, j label j, -2 padding
    group[in_labels] = owner[rel[in_labels]]
    group[rel >= n_lab] = -2
    within = torch.zeros_like(rel)
    within[in_labels] = rel[in_labels] - starts[group[in_labels]]
    positions = torch.where(rel < 0, idx.expand_as(rel), t[:, None] + within)  # (B, S)
    valid = group != -2
    causal = idx[:, None, :] <= idx[:, :, None]  # (1, S, S): key index <= query index
    same = (group[:, None, :] == -1) | (group[:, None, :] == group[:, :, None])  # key is prompt or same label
    allowed = causal & same & valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(s, dtype=torch.bool)[None]  # padding queries see themselves (never read)
    n = torch.tensor([len(x) for x in label_targets])  # (K,)
    rel_read = torch.cat([torch.cat([torch.tensor([-1]), st + torch.arange(k - 1)]) for st, k in zip(starts, n)])
    return TreeLayout(ids, allowed, positions, t[:, None] + rel_read[None, :], torch.tensor(
        [x for tg in label_targets for x in tg], dtype=torch.long), torch.repeat_interleave(torch.arange(len(n)), n), n)


def with_prefix(allowed: torch.Tensor, positions: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``n_slots`` prefix slots in front: (B, S, S), (B, S) -> (B, L+S, L+S), (B, L+S). Slots attend causally
    among themselves, every token sees every slot, token positions shift by L."""
    b, s, _ = allowed.shape
    full = torch.zeros(b, n_slots + s, n_slots + s, dtype=torch.bool)
    full[:, :n_slots, :n_slots] = torch.ones(n_slots, n_slots, dtype=torch.bool).tril()
    full[:, n_slots:, :n_slots] = True
    full[:, n_slots:, n_slots:] = allowed
    return full, torch.cat([torch.arange(n_slots)[None].expand(b, n_slots), positions + n_slots], dim=1)


@torch.no_grad()
def label_scores(model: TapperModel, batch: Batch, label_targets: Sequence[Sequence[int]],
                 cold_row: torch.Tensor | None = None, norm: str = "mean") -> torch.Tensor:
    """Mean (``norm="mean"``) or summed (``"sum"``) log-probability of each label's targets behind each prompt of
    ``batch`` (prompt-only, as ``fb.collate(samples, with_labels=False)``) -> (B, K). One packed forward pass."""
    if norm not in LABEL_NORMS:
        raise ValueError(f"unknown label score norm {norm!r}; use one of {LABEL_NORMS}")
    prompts = [batch.input_ids[i, : last + 1].tolist() for i, last in enumerate(batch.last_prompt.tolist())]
    lay = tree_layout(prompts, label_targets)
    prefix = model.prefix(batch, cold_row) if model.personalized else None  # (B, L, d)
    n_slots = 0 if prefix is None else prefix.shape[1]
    allowed, positions = with_prefix(lay.allowed, lay.positions, n_slots)  # (B, L+S, L+S), (B, L+S)
    k = model.prefix_layer
    if k > 0:
        trunk = model.trunk
        if trunk is None:
            raise ValueError(f"prefix_layer={k} needs a TrunkCache (model.trunk)")
        inner, _ = decoder(trunk.lm)
        h = run_layers(trunk.lm, inner.embed_tokens(lay.ids), lay.allowed, 0, k, offset=trunk.offset,
                       final_norm=False, position_ids=lay.positions)  # (B, S, d) entering layer k
        h = h.float().to(trunk.dtype).float()  # as the cache stores and returns trunk states
    else:
        h = model.lm.get_input_embeddings()(lay.ids)  # (B, S, d)
    if prefix is not None:
        h = torch.cat([prefix.to(h.dtype), h], dim=1)  # (B, L+S, d)
    h = run_layers(model.lm, h, allowed, start=k, position_ids=positions)  # (B, L+S, d), final norm applied
    _, lm_head = decoder(model.lm)
    read = h.gather(1, (lay.read_pos + n_slots)[..., None].expand(-1, -1, h.shape[-1]))  # (B, Q, d)
    logp = torch.log_softmax(lm_head(read).float(), dim=-1)  # (B, Q, V)
    tok_lp = logp.gather(2, lay.targets[None, :, None].expand(len(prompts), -1, 1))[..., 0]  # (B, Q)
    sums = torch.zeros(len(prompts), len(label_targets)).index_add_(1, lay.label_of, tok_lp)  # (B, K)
    return sums if norm == "sum" else sums / lay.n_targets[None, :]


@torch.no_grad()
def predict_label_set(model: TapperModel, fb: FeatureBuilder, samples: Sequence[Sample], labels: Sequence[str],
                      batch_size: int = 16, desc: str = "label set", norm: str = "mean") -> list[dict]:
    """The best-scoring label per sample, as ``predict_texts`` rows plus ``label_scores`` {label: score}:
    ``{"id", "user", "gold", "pred", "cold", "label_scores"}``."""
    targets = [fb.answer_ids(lab) for lab in labels]
    rows = []
    for chunk, batch in eval_batches(model, fb, samples, batch_size, desc):
        scores = label_scores(model, batch, targets, norm=norm)  # (B, K)
        for s, sc, cold in zip(chunk, scores.tolist(), batch.cold):
            best = max(range(len(labels)), key=sc.__getitem__)  # first of ties, as argmax
            rows.append({"id": s.id, "user": s.user, "gold": s.answer, "pred": labels[best], "cold": cold,
                         "label_scores": dict(zip(labels, sc))})
    return rows


def classify(model: TapperModel, fb: FeatureBuilder, samples: Sequence[Sample], task: Task, readout: str = "both",
             batch_size: int = 16, desc: str = "eval", max_new_tokens: int = 32,
             norm: str = "mean") -> tuple[dict, list[dict]]:
    """(report, rows) of a classification task under ``readout``: ``label_set`` (label-set scoring),
    ``generate`` (greedy decoding, exact match) or ``both`` (label-set scoring is the answer; greedy decoding is
    reported beside it as ``<metric>_generate`` and each row's ``pred_generate``)."""
    rows = classify_rows(model, fb, samples, task, readout, batch_size, desc, max_new_tokens, norm)
    return class_report(task, rows, readout), rows


def classify_rows(model: TapperModel, fb: FeatureBuilder, samples: Sequence[Sample], task: Task,
                  readout: str = "both", batch_size: int = 16, desc: str = "eval",
                  max_new_tokens: int = 32, norm: str = "mean") -> list[dict]:
    """The prediction rows of :func:`classify` (``pred``; ``pred_generate`` too under ``both``)."""
    if readout not in CLASS_READOUTS:
        raise ValueError(f"unknown classification readout {readout!r}; use one of {CLASS_READOUTS}")
    if readout == "generate":
        return predict_texts(model, fb, samples, max_new_tokens, batch_size=batch_size, desc=desc)
    rows = predict_label_set(model, fb, samples, task.labels, batch_size=batch_size, desc=desc, norm=norm)
    if readout == "both":
        gen = predict_texts(model, fb, samples, max_new_tokens, batch_size=batch_size, desc=f"{desc} (generate)")
        for r, g in zip(rows, gen):
            r["pred_generate"] = g["pred"]
    return rows


def class_report(task: Task, rows: Sequence[dict], readout: str = "both") -> dict:
    """The report of :func:`classify_rows`' rows: the answer's metrics, and greedy decoding's beside them
    (``<metric>_generate``) when the rows carry ``pred_generate``."""
    rep = {**task_report(task, rows), "readout": "generate" if readout == "generate" else "label_set"}
    if rows and "pred_generate" in rows[0]:
        gen = [{**r, "pred": r["pred_generate"]} for r in rows]
        rep.update({f"{k}_generate": v for k, v in task_report(task, gen).items() if k != "n"})
    return rep
