"""OPPU baseline: one LoRA per user (r=8 on q_proj and v_proj) on top of the Stage-1 merged model.

Per user, the adapter is trained on that user's own history (the same Stage-2 samples TAP-PER trains on, from
``FeatureBuilder.profile_samples``, but with no prefix and no history in the prompt) and then predicts that
user's test questions. One peft model serves every user: before each user its LoRA weights are re-initialised
in place (A Kaiming-uniform as peft does, B = 0, from a seed derived from the user id), so the backbone is
never reloaded or copied, and the adapter starts as a no-op (= the Stage-1 model) for every user.

    for user u:  reset LoRA(seed(u)) ──► AdamW on u's records ──► predict u's questions ──► (keep A_u, B_u)

Storage: ``r·(d_in + d_out)`` per adapted projection and layer, see :func:`oppu_params_per_user` (exact:
counted from the backbone's module shapes) and :mod:`recsys_tapper.params` (from the config).

Example::

    rows = run_oppu(stage1_lm, fb, train_chosen, test_samples, OppuConfig(per_user=15))
    rating_report(rows)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llm_bridge.lora import LoraSpec, add_lora
from recsys_tapper.data import LampExample
from recsys_tapper.evaluation import predict_labels
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.model import TapperModel
from recsys_tapper.training import OptimConfig, train_loop


@dataclass
class OppuConfig:
    """Args:
    r, alpha, dropout, target_modules: the per-user LoRA (OPPU: r=8 on q_proj and v_proj).
    per_user: most recent profile records per user used as targets (None = all), like ``stage2_per_user``.
    optim: per-user AdamW settings (a fresh optimizer per user). One epoch by default, like the CPU trainer
        defaults; the paper's recipe is 3. Cost is one LM forward+backward per batch: on SmolLM2 on 2 shared
        CPU cores a batch of 8 took ~7-14 s, so 15 records x 1 epoch is ~20-30 s per user.
    seed: mixed with a hash of the user id for the adapter init and dropout.
    eval_batch_size: questions per forward pass at prediction.
    """

    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    per_user: int | None = 15
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, epochs=1, batch_size=8))
    seed: int = 0
    eval_batch_size: int = 32


def oppu_params_per_user(lm: nn.Module, r: int = 8, target_modules: Sequence[str] = ("q_proj", "v_proj")) -> int:
    """Exact LoRA parameters per user: Σ over adapted Linear layers of ``r·(in_features + out_features)``."""
    total = 0
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            total += r * (mod.in_features + mod.out_features)
    return total


def user_seed(user: str, seed: int) -> int:
    return (zlib.crc32(user.encode("utf-8")) + 1_000_003 * seed) % (2**31 - 1)


def lora_named_parameters(peft_lm: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in peft_lm.named_parameters() if "lora_" in n and p.requires_grad]


@torch.no_grad()
def reset_lora(params: Sequence[tuple[str, nn.Parameter]], seed: int) -> None:
    """peft's default init, in place: lora_A ~ Kaiming-uniform(a=√5), lora_B = 0 (the adapter is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in params:
        if "lora_A" in name:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
        elif "lora_B" in name:
            p.zero_()
        else:
            raise ValueError(f"unexpected LoRA parameter {name}")


def run_oppu(
    lm: nn.Module,
    fb: FeatureBuilder,
    train_examples: Sequence[LampExample],
    test_samples: Sequence[Sample],
    cfg: OppuConfig | None = None,
    adapters: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[dict]:
    """Train one LoRA per test user on their history, predict their questions; rows as ``predict_labels``.

    Args:
        lm: the Stage-1 merged, frozen backbone. LoRA layers are added for the run and removed again (peft
            ``unload``), so ``lm`` comes back with its original modules and unchanged weights.
        fb: the feature builder (its task gives the labels; records are registered if missing).
        train_examples: the train-split questions of the users; their profiles give the targets.
        test_samples: e.g. ``fb.question_samples(test)``; their history is ignored (no prefix).
        cfg: see :class:`OppuConfig`.
        adapters: if given, filled with ``{user: {lora param name: tensor}}`` after each user's training.

    Returns:
        One row per test sample, in ``test_samples`` order, with ``n_train`` (that user's training samples;
        0 means the Stage-1 model answered).
    """
    cfg = cfg or OppuConfig()
    fb.register(train_examples)
    by_user: dict[str, list[Sample]] = {}
    for s in fb.profile_samples(train_examples, per_user=cfg.per_user, seed=cfg.seed):
        by_user.setdefault(s.user, []).append(s)
    tests: dict[str, list[int]] = {}
    for j, s in enumerate(test_samples):
        tests.setdefault(s.user, []).append(j)

    spec = LoraSpec(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    peft_lm = add_lora(lm, spec)
    rows: list[dict | None] = [None] * len(test_samples)
    try:
        model = TapperModel(peft_lm, None, None)
        lora = lora_named_parameters(peft_lm)
        for user, idx in tests.items():
            seed = user_seed(user, cfg.seed)
            reset_lora(lora, seed)
            torch.manual_seed(seed)  # LoRA dropout
            samples = by_user.get(user, [])
            if samples:
                train_loop(model, samples, fb, [{"params": [p for _, p in lora]}], cfg.optim, desc=f"oppu {user}")
            if adapters is not None:
                adapters[user] = {n: p.detach().clone() for n, p in lora}
            chunk = [test_samples[j] for j in idx]
            for j, row in zip(idx, predict_labels(model, fb, chunk, fb.task.labels, cfg.eval_batch_size,
                                                  desc=f"oppu eval {user}")):
                rows[j] = {**row, "n_train": len(samples)}
    finally:
        peft_lm.unload()  # restores lm's own Linear modules; base weights were never written
    return rows  # type: ignore[return-value]
