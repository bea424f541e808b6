"""TAP-PER: user tower (TorchRec) + bridge projector + frozen causal LM with a bridge LoRA.

    users KJT, History, q     ──► UserTower ──► (P_u row, pooled context c)
                                     BridgeProjector ──► prefix P = P_u + P_q   (B, L, d)
    items KJT (optional) ──► ItemSlots ──► P_i (B, L_i, d), appended: P = [P_u + P_q | P_i]
    prompt tokens ──► embed ──► [P | tokens] ──► LM (+ bridge LoRA) ──► logits           prefix_layer k = 0
    prompt tokens ──► cached layers[0:k] ──► [P | states] ──► layers[k:] ──► logits     prefix_layer k > 0

Built from already-made parts (compose, don't inherit). ``personalize=False`` runs the LM alone: that is
the non-personalized baseline on the same backbone. With ``prefix_layer`` k > 0 the prefix enters at decoder
layer k and the states below it come from a :class:`llm_bridge.trunk.TrunkCache` (the paper's input-level
prefix is k = 0).

Example::

    model = TapperModel(lm, tower, projector)   # the tower owns the record bank
    out = model(batch)                          # out.logits (N, V) at the N answer positions, out.targets (N,)
    loss, (_, n) = TapperTrain(model)(batch)    # the train wrapper owns the loss (TorchRec's DLRMTrain)
    probs = model.label_probs(batch, label_ids) # (B, n_labels) at the answer position
    tokens = model.generate(batch, max_new_tokens=32, eos_token_id=tok.eos_token_id)  # greedy
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from embeddings.tower import UserTower
from embeddings.user_state import UserStateTable
from llm_bridge.generation import greedy_generate, left_pad
from llm_bridge.inject import IGNORE, prepend_prefix
from llm_bridge.projector import BridgeProjector
from llm_bridge.trunk import TrunkCache, decoder, right_pad, run_layers
from recsys_tapper.features import Batch


@dataclass
class ModelOutput:
    """The logits where an answer token is read: ``logits[j]`` predicts ``targets[j]``."""

    logits: torch.Tensor  # (N, V), N = answer tokens in the batch
    targets: torch.Tensor  # (N,)
    prefix_len: int  # soft tokens before each prompt


class ItemSlots(nn.Module):
    """An item table (TorchRec, keyed by the query's item id) and its up-projection to ``slots`` prefix slots.

    rows (B, r) ──► Linear(r → slots·d) ──► (B, slots, d); an item without a row pools to 0 and gets the bias."""

    def __init__(self, table: UserStateTable, slots: int, d: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.table, self.slots, self.d = table, slots, d
        self.up = nn.Linear(table.cfg.dim, slots * d)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.normal_(self.up.bias, std=init_std)

    def forward(self, items) -> torch.Tensor:
        rows = self.table(items)  # (B, r)
        return self.up(rows).view(rows.shape[0], self.slots, self.d)  # (B, slots, d)


class TapperModel(nn.Module):
    def __init__(self, lm: nn.Module, tower: UserTower | None, projector: BridgeProjector | None,
                 prefix_layer: int = 0, trunk: TrunkCache | None = None, items: ItemSlots | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.tower = tower
        self.projector = projector
        self.items = items
        self.item_index = None  # item id -> item-table row (a UserIndex), set with the item table
        self.prefix_layer = prefix_layer
        self.trunk = trunk  # not a module: a cache over the frozen lower layers
        if prefix_layer > 0 and trunk is not None and trunk.k != prefix_layer:
            raise ValueError(f"trunk cache is for layer {trunk.k}, the model's prefix enters at {prefix_layer}")

    @property
    def personalized(self) -> bool:
        return self.tower is not None

    def prefix(self, batch: Batch, cold_row: torch.Tensor | None = None) -> torch.Tensor:
        """The soft tokens of each example -> (B, L[+L_i], d). ``cold_row`` (D,) stands in for the P_u row of
        examples whose user has none (serving's cold start); without it they get zeros."""
        user_state, context, _ = self.tower(batch.users, batch.history, batch.q, batch.extra_records)
        if cold_row is not None:
            cold = torch.tensor(batch.cold, dtype=torch.bool, device=user_state.device)
            user_state = torch.where(cold[:, None], cold_row.to(user_state)[None, :], user_state)  # (B, D)
        prefix = self.projector(user_state, context)  # (B, L, d)
        if self.items is not None:
            if batch.items is None:
                raise ValueError("the model has an item table but the batch carries no item ids")
            prefix = torch.cat([prefix, self.items(batch.items)], dim=1)  # (B, L+L_i, d)
        return prefix

    def forward(self, batch: Batch) -> ModelOutput:
        """The logits at the batch's answer positions (``batch.labels``); the loss is the train wrapper's."""
        if batch.labels is None:
            raise ValueError("the forward reads answer positions from labels; use label_probs or generate for "
                             "prompts without answers")
        prefix = self.prefix(batch) if self.personalized else None
        if self.prefix_layer > 0:
            return self._late_forward(batch, prefix)
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, T, d)
        embeds, mask, labels = prepend_prefix(embeds, batch.attention_mask, batch.labels, prefix)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits  # (B, L+T, V)
        targets = labels[:, 1:]  # position j predicts token j+1
        read = targets != IGNORE
        return ModelOutput(logits[:, :-1][read], targets[read], 0 if prefix is None else prefix.shape[1])

    # ------------------------------------------------------------------------------------- late prefix

    def _trunk_states(self, rows: list[list[int]]) -> list[torch.Tensor]:
        if self.trunk is None:
            raise ValueError(f"prefix_layer={self.prefix_layer} needs a TrunkCache (model.trunk)")
        return self.trunk.states(rows)

    def _upper(self, batch: Batch, prefix: torch.Tensor | None, with_labels: bool,
               query_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Final-normed hidden states (B, L+T', d) of [P | cached states] through layers k..N-1, or (B, Q, d) at
        ``query_pos`` (B, Q) (token positions, counted after the prefix) when given.

        With labels the last token of each row is dropped from the input: it is only ever a target."""
        lens = batch.attention_mask.sum(1).tolist()
        n = [x - 1 if with_labels else x for x in lens]
        rows = [batch.input_ids[i, : n[i]].tolist() for i in range(len(n))]
        states, mask = right_pad(self._trunk_states(rows))  # (B, T', d), (B, T')
        n_slots = 0
        if prefix is not None:
            n_slots = prefix.shape[1]
            states = torch.cat([prefix.to(states.dtype), states], dim=1)  # (B, L+T', d)
            mask = torch.cat([torch.ones(len(n), n_slots, dtype=mask.dtype), mask], dim=1)
        qp = None if query_pos is None else query_pos + n_slots
        return run_layers(self.lm, states, mask, start=self.prefix_layer, query_pos=qp), n_slots

    def _late_forward(self, batch: Batch, prefix: torch.Tensor | None) -> ModelOutput:
        targets = batch.labels[:, 1:]  # token j's state predicts token j+1
        read = targets != IGNORE  # (B, T-1): the positions whose output is read
        n_read = read.sum(1)
        q = int(n_read.max())
        # (B, Q) the read positions of each row, padded with the row's first one (padding is not scored)
        order = torch.argsort((~read).int(), dim=1, stable=True)[:, :q]
        keep = torch.arange(q)[None, :] < n_read[:, None]  # (B, Q)
        query_pos = torch.where(keep, order, order[:, :1])
        h, n_slots = self._upper(batch, prefix, with_labels=True, query_pos=query_pos)  # (B, Q, d)
        _, lm_head = decoder(self.lm)
        logits = lm_head(h[keep])  # (n_answer_tokens, V): only where a label is read
        return ModelOutput(logits, targets.gather(1, query_pos)[keep], n_slots)

    # ---------------------------------------------------------------------------------------- readouts

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
        """Greedy answers (token ids, EOS dropped) to the batch's prompts, each led by its user's prefix."""
        prefix = self.prefix(batch) if self.personalized else None  # (B, L, d)
        if self.prefix_layer > 0:
            return self._late_generate(batch, prefix, max_new_tokens, eos_token_id)
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, T, d)
        rows = []
        for i, last in enumerate(batch.last_prompt.tolist()):
            prompt = embeds[i, : last + 1]
            rows.append(prompt if prefix is None else torch.cat([prefix[i].to(prompt.dtype), prompt]))
        padded, mask = left_pad(rows)
        return greedy_generate(self.lm, padded, mask, max_new_tokens, eos_token_id).tokens

    def _late_generate(self, batch: Batch, prefix, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
        """Greedy decoding on the late path: each step runs the upper layers over [P | states of the text so
        far] (no KV cache: answers are short; new tokens' lower states are computed, the prompt's cached)."""
        seqs = [batch.input_ids[i, : last + 1].tolist() for i, last in enumerate(batch.last_prompt.tolist())]
        out: list[list[int]] = [[] for _ in seqs]
        done = [False] * len(seqs)
        _, lm_head = decoder(self.lm)
        n_slots = 0 if prefix is None else prefix.shape[1]
        for _ in range(max_new_tokens):
            states, mask = right_pad(self._trunk_states([s + o for s, o in zip(seqs, out)]))
            if prefix is not None:
                states = torch.cat([prefix.to(states.dtype), states], dim=1)
                mask = torch.cat([torch.ones(len(seqs), n_slots, dtype=mask.dtype), mask], dim=1)
            h = run_layers(self.lm, states, mask, start=self.prefix_layer)  # (B, L+T, d)
            last = mask.sum(1) - 1
            nxt = lm_head(h[torch.arange(len(seqs)), last]).argmax(-1).tolist()
            for i, tok in enumerate(nxt):
                if not done[i]:
                    if tok == eos_token_id:
                        done[i] = True
                    else:
                        out[i].append(tok)
            if all(done):
                break
        return out

    @torch.no_grad()
    def label_probs(self, batch: Batch, label_ids: list[int], cold_row: torch.Tensor | None = None):
        """Next-token distribution over ``label_ids`` at the answer position -> (B, n_labels). The one scoring
        path: evaluation, ``serve.Server`` and the serving benchmark call it."""
        prefix = self.prefix(batch, cold_row) if self.personalized else None
        if self.prefix_layer > 0:
            h, _ = self._upper(batch, prefix, with_labels=False, query_pos=batch.last_prompt[:, None])  # (B, 1, d)
            _, lm_head = decoder(self.lm)
            logits = h[:, 0] @ lm_head.weight[label_ids].T  # (B, n_labels)
            if lm_head.bias is not None:
                logits = logits + lm_head.bias[label_ids]
            return torch.softmax(logits.float(), dim=-1)
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, T, d)
        embeds, mask, _ = prepend_prefix(embeds, batch.attention_mask, None, prefix)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits  # (B, L+T, V)
        pos = batch.last_prompt + (0 if prefix is None else prefix.shape[1])  # (B,)
        return torch.softmax(logits[torch.arange(len(pos)), pos][:, label_ids].float(), dim=-1)


def recency_values(pool) -> dict:
    """The pooling's recency scalars by name: lambda_t, lambda_o and, with the soft window applied, lambda_w and
    window_width (``model.pooling.window``)."""
    names = ["lambda_t", "lambda_o", *(["lambda_w", "window_width"] if pool.windowed else [])]
    return {k: p.detach().item() for k, p in zip(names, pool.recency_parameters())}


def lambda_report(model: TapperModel) -> dict:
    """lambda_t, lambda_o (and the soft window's lambda_w, width) after Stage 2, where Stage 2 started them
    (``*_start``) and whether each bias is on; with the content term, its beta and where it started
    (``model.pooling.content_beta``)."""
    pool = model.tower.pooling
    start = getattr(model, "lambda_start", {})
    content = ({"beta": pool.beta.detach().item(), "beta_start": pool.cfg.content_beta}
               if pool.cfg.content_beta is not None else {})
    return {**recency_values(pool), **{f"{k}_start": v for k, v in start.items()},
            "time_bias": pool.cfg.time_bias, "order_bias": pool.cfg.order_bias, **content}


def train_module(model: nn.Module) -> nn.Module:
    """What a training loop steps: a TapperModel inside its ``TapperTrain`` (which owns the loss); any other
    module is taken as a train module already (``batch -> (loss, aux)``, TorchRec's convention)."""
    return TapperTrain(model) if isinstance(model, TapperModel) else model


class TapperTrain(nn.Module):
    """The training wrapper that owns the loss, as TorchRec's ``DLRMTrain`` wraps ``DLRM``: token-mean
    cross-entropy over the batch's answer tokens.

    ``TapperTrain(model)(batch)`` -> ``(loss, (loss.detach(), n_targets))``; ``n_targets`` weighs a rank's
    share of a global batch under torchrun."""

    def __init__(self, model: TapperModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
        out = self.model(batch)
        loss = F.cross_entropy(out.logits.float(), out.targets)
        return loss, (loss.detach(), out.targets.numel())
