"""Task LoRA (Stage 1, merged) and the shared bridge LoRA (Stage 2), with peft.

Example::

    model = add_lora(model, LoraSpec(r=8, alpha=8, dropout=0.0))     # Stage 1
    ...train...
    model = merge_lora(model)                                        # plain frozen backbone again
    model = add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.05))    # bridge LoRA, B = 0: a no-op at start
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model


@dataclass
class LoraSpec:
    r: int = 4
    alpha: int = 8
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def add_lora(model, spec: LoraSpec, first_layer: int = 0):
    """Wrap ``model`` with a LoRA on ``spec.target_modules``; with ``first_layer`` = k > 0 only decoder layers
    k..N-1 get one (the bridge LoRA of a late prefix: the cached layers below k stay frozen and plain)."""
    layers = None
    if first_layer > 0:
        n = model.config.num_hidden_layers
        layers = list(range(first_layer, n))
    cfg = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM",
        layers_to_transform=layers, layers_pattern="layers" if layers else None,
    )
    return get_peft_model(model, cfg)


def merge_lora(peft_model):
    """Merge the adapter into the base weights and freeze everything."""
    base = peft_model.merge_and_unload()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def lora_parameters(model) -> list:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
