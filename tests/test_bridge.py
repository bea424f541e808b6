import torch
from torch.testing import assert_close

from llm_bridge.inject import IGNORE, prepend_prefix
from llm_bridge.lora import LoraSpec, add_lora
from llm_bridge.projector import BridgeProjector, BridgeProjectorConfig
from llm_bridge.tiny import tiny_llama


def test_prepend_prefix_shapes_mask_and_labels():
    emb = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, IGNORE, IGNORE], [IGNORE, 3, 4, 5, 6]])
    prefix = torch.randn(2, 4, 32)
    e, m, lab = prepend_prefix(emb, mask, labels, prefix)
    assert e.shape == (2, 9, 32)
    assert_close(e[:, :4], prefix)
    assert_close(e[:, 4:], emb)
    assert m.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 9]
    assert lab[:, :4].eq(IGNORE).all()
    assert_close(lab[:, 4:], labels)


def test_prefix_width_mismatch_is_an_error():
    try:
        prepend_prefix(torch.randn(2, 5, 32), torch.ones(2, 5), None, torch.randn(2, 4, 16))
    except ValueError as e:
        assert "does not fit" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_bridge_lora_starts_as_a_no_op():
    lm, _ = tiny_llama()
    ids = torch.randint(2, 128, (2, 7))
    ref = lm(input_ids=ids).logits
    peft_lm = add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.05))
    peft_lm.eval()
    assert_close(peft_lm(input_ids=ids).logits, ref)
    trainable = [n for n, p in peft_lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_gradients_through_the_prefix_are_finite():
    lm, _ = tiny_llama()
    lm = add_lora(lm, LoraSpec())
    proj = BridgeProjector(BridgeProjectorConfig(slots=4), d=32, user_dim=4 * 32)
    user = torch.randn(2, 128, requires_grad=True)
    ctx = torch.randn(2, 32)
    prefix = proj(user, ctx)
    ids = torch.randint(2, 128, (2, 6))
    emb, mask, labels = prepend_prefix(lm.get_input_embeddings()(ids), torch.ones(2, 6, dtype=torch.long), ids, prefix)
    loss = lm(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(user.grad).all() and user.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in proj.parameters())


def test_projector_ablations_drop_their_part():
    proj = BridgeProjector(BridgeProjectorConfig(slots=2, use_history=False), d=8, user_dim=16)
    u = torch.randn(3, 16)
    assert_close(proj(u, torch.randn(3, 8)), u.view(3, 2, 8))
    compressed = BridgeProjector(BridgeProjectorConfig(slots=2), d=8, user_dim=4)
    assert compressed(torch.randn(3, 4), torch.randn(3, 8)).shape == (3, 2, 8)


def test_standardized_context_projects_the_fitted_z_scores():
    torch.manual_seed(0)
    cfg = BridgeProjectorConfig(slots=2, use_user_state=False, standardize_context=True)
    proj = BridgeProjector(cfg, d=4, user_dim=8)
    contexts = torch.randn(50, 4) * torch.tensor([1.0, 0.01, 3.0, 0.1]) + 5.0
    proj.fit_context(contexts)
    assert_close(proj.context_mean, contexts.mean(0))
    assert_close(proj.context_std, contexts.std(0))
    c = torch.randn(3, 4)
    want = proj.history_proj((c - contexts.mean(0)) / contexts.std(0)).view(3, 2, 4)
    assert_close(proj(torch.zeros(3, 8), c), want)
    assert {"context_mean", "context_std"} <= set(proj.state_dict())  # saved with the model


def test_fit_context_rejects_bad_input():
    import pytest

    with pytest.raises(ValueError, match="needs standardize_context=True"):
        BridgeProjector(BridgeProjectorConfig(slots=2), d=4, user_dim=8).fit_context(torch.randn(5, 4))
    proj = BridgeProjector(BridgeProjectorConfig(slots=2, standardize_context=True), d=4, user_dim=8)
    with pytest.raises(ValueError, match=r"expected \(N>=2, 4\) contexts"):
        proj.fit_context(torch.randn(1, 4))
