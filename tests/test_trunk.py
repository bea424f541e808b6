"""Late prefix on a cached frozen trunk (llm_bridge/trunk.py, TapperModel.prefix_layer)."""

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.inject import prepend_prefix
from llm_bridge.lora import LoraSpec, add_lora
from llm_bridge.tiny import tiny_llama
from llm_bridge.trunk import TrunkCache, TrunkCacheError, decoder, run_layers, trunk_fingerprint
from recsys_tapper.build import build_tapper, build_trunk
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.model import TapperTrain
from recsys_tapper.synthetic import synthetic_rating_task
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

N_LAYERS = 4


def _setup(k: int, slots: int = 2):
    torch.manual_seed(0)
    train, test = synthetic_rating_task(n_users=3, n_records=6, n_test=2, seed=1)
    lm, tok = tiny_llama(layers=N_LAYERS)
    users = UserIndex(sorted({ex.user_id for ex in test}))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task("movielens"), RecordBank(lm.config.hidden_size), users)
    fb.register(train + test)
    m = tiny_config("unused", slots=slots).model
    m.prefix_layer = k
    trunk = build_trunk(m, lm, None)
    plm = add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.0), first_layer=k)
    for n, p in plm.named_parameters():  # a non-zero bridge LoRA, so that the upper layers differ from the base
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model = build_tapper(m, plm, len(users), trunk=trunk, bank=fb.bank).eval()
    return model, fb, train, test


def _naive_late_logits(model, batch, k: int) -> list[torch.Tensor]:
    """Per example, no padding: HF's own forward gives the states entering layer k (output_hidden_states),
    then the upper layers run on [P | states] with HF's default causal attention (no mask tensor)."""
    inner, lm_head = decoder(model.lm)
    prefix = model.prefix(batch)  # (B, L, d)
    n_slots = prefix.shape[1]
    out = []
    for i in range(len(batch.ids)):
        n = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :n][None]
        pos = torch.arange(n_slots, n_slots + n)[None]
        hs = model.lm.get_base_model().model(input_ids=ids, position_ids=pos, output_hidden_states=True)
        x = torch.cat([prefix[i : i + 1], hs.hidden_states[k]], dim=1)  # (1, L+n, d)
        p = torch.arange(x.shape[1])[None]
        rope = inner.rotary_emb(x, position_ids=p)
        for layer in inner.layers[k:]:
            x = layer(x, attention_mask=None, position_ids=p, position_embeddings=rope)
        out.append(lm_head(inner.norm(x))[0])  # (L+n, V)
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_cached_late_prefix_equals_a_naive_per_example_path(k):
    model, fb, _, test = _setup(k)
    samples = fb.question_samples(test)
    batch = fb.collate(samples, with_labels=False)
    label_ids = [fb.tok(x)["input_ids"][0] for x in "12345"]
    with torch.no_grad():
        got = model.label_probs(batch, label_ids)  # cached path, right-padded batch
        ref = _naive_late_logits(model, batch, k)
    n_slots = 2
    want = torch.stack([torch.softmax(r[n_slots + int(last), label_ids], -1)
                        for r, last in zip(ref, batch.last_prompt)])
    assert_close(got, want, atol=1e-5, rtol=1e-4)  # fp32, different padding/batching: 1e-5


def test_late_training_loss_equals_cross_entropy_of_the_naive_path():
    k = 2
    model, fb, train, _ = _setup(k)
    samples = fb.profile_samples(train, per_user=2)
    batch = fb.collate(samples)
    with torch.no_grad():
        loss, _ = TapperTrain(model)(batch)
        ref = _naive_late_logits(model, batch, k)
    terms = []
    for i, r in enumerate(ref):
        for t in (batch.labels[i] != -100).nonzero().flatten().tolist():  # label at t is read at t-1
            terms.append(torch.nn.functional.cross_entropy(r[2 + t - 1][None], batch.labels[i, t][None]))
    assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_run_layers_from_zero_reproduces_the_input_level_forward():
    """k = 0: [P | token embeddings] through every layer == the HF forward the model uses today."""
    lm, _ = tiny_llama(layers=N_LAYERS)
    ids = torch.randint(2, 128, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    prefix = torch.randn(2, 3, 32) * 0.02
    embeds, m, _ = prepend_prefix(lm.get_input_embeddings()(ids), mask, None, prefix)
    with torch.no_grad():
        ref = lm(inputs_embeds=embeds, attention_mask=m).logits
        got = decoder(lm)[1](run_layers(lm, embeds, m, start=0))
    valid = m.bool()
    assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_prefill_covers_training_and_spilled_states_read_back_equal(tmp_path):
    model, fb, train, _ = _setup(2)
    samples = fb.profile_samples(train, per_user=3)
    rows = fb.trunk_rows(samples)
    trunk = model.trunk
    want = trunk.compute(rows)
    trunk.max_bytes, trunk.spill_dir = 4 * 32 * 4 * 8, tmp_path  # ~8 tokens of fp32 states in memory
    trunk.states(rows)
    assert len(trunk._spilled) > 0 and list(tmp_path.glob("shard-*.safetensors"))
    for a, b in zip(trunk.states(rows), want):
        assert_close(a, b)
    before = trunk.n_computed
    model.train()
    TapperTrain(model)(fb.collate(samples))[0].backward()  # every sequence it needs is cached
    assert trunk.n_computed == before


def test_a_temporary_spill_folder_is_deleted_on_close_and_on_collection(tmp_path):
    import gc

    model, fb, train, _ = _setup(2)
    rows = fb.trunk_rows(fb.profile_samples(train, per_user=3))
    kept = TrunkCache(model.trunk.lm, 2, model.trunk.offset, "fp", max_bytes=4 * 32 * 4 * 8, spill_dir=str(tmp_path))
    kept.states(rows)
    kept.close()
    assert list(tmp_path.glob("shard-*.safetensors"))  # a folder the caller gave is the caller's
    folders = []
    for how in ("close", "gc"):
        trunk = TrunkCache(model.trunk.lm, 2, model.trunk.offset, "fp", max_bytes=4 * 32 * 4 * 8)
        trunk.states(rows)
        folder = trunk.spill_dir
        assert folder is not None and list(folder.glob("shard-*.safetensors"))
        if how == "close":
            trunk.close()
            assert len(trunk) == len(trunk.mem)
        else:
            del trunk
            gc.collect()
        folders.append(folder)
    assert not any(f.exists() for f in folders)


def test_cache_is_refused_under_another_backbone_or_task_lora(tmp_path):
    model, fb, train, _ = _setup(2)
    trunk = model.trunk
    trunk.states(fb.trunk_rows(fb.profile_samples(train, per_user=2)))
    trunk.save(tmp_path / "trunk.safetensors")
    same = TrunkCache(trunk.lm, 2, trunk.offset, trunk.fingerprint)
    assert same.load(tmp_path / "trunk.safetensors") == len(trunk)
    lora_a = {"w": torch.ones(2)}
    fp_lora = trunk_fingerprint("abc", lora_a, 2, trunk.offset)
    assert fp_lora != trunk_fingerprint("abc", {"w": torch.zeros(2)}, 2, trunk.offset)
    assert fp_lora != trunk_fingerprint("abd", lora_a, 2, trunk.offset)
    assert fp_lora != trunk_fingerprint("abc", lora_a, 1, trunk.offset)
    other = TrunkCache(trunk.lm, 2, trunk.offset, fp_lora)
    with pytest.raises(TrunkCacheError, match="rebuild it"):
        other.load(tmp_path / "trunk.safetensors")


def test_bridge_lora_sits_only_on_layers_at_or_above_k():
    model, *_ = _setup(3)
    layers = {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.lm.named_parameters() if "lora_" in n}
    assert layers == {3}


def test_late_generation_matches_step_by_step_argmax():
    model, fb, _, test = _setup(2)
    batch = fb.collate(fb.question_samples(test)[:2], with_labels=False)
    toks = model.generate(batch, max_new_tokens=3, eos_token_id=-1)
    with torch.no_grad():
        for i, last in enumerate(batch.last_prompt.tolist()):
            seq = batch.input_ids[i, : last + 1].tolist()
            for t in toks[i]:
                one = fb.collate(fb.question_samples(test)[i : i + 1], with_labels=False)
                one.input_ids = torch.tensor([seq])
                one.attention_mask = torch.ones(1, len(seq), dtype=torch.long)
                ref = _naive_late_logits(model, one, 2)[0]
                assert int(ref[-1].argmax()) == t
                seq.append(t)
