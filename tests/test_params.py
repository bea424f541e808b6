import json
import subprocess
import sys

import pytest

from recsys_tapper.params import (
    BRIDGE_TARGETS,
    LLAMA2_7B,
    LLAMA31_8B,
    BackboneShape,
    lora_params,
    main,
    oppu_params,
    paper_reference,
    param_table,
    tapper_params,
)

SMOL = BackboneShape(hidden=576, layers=30, heads=9, kv_heads=3)  # SmolLM2-135M


def test_smollm2_by_hand():
    t = param_table(SMOL, users=1000, slots=8, user_dim=64)
    # OPPU: 30 * (8*(576+576) + 8*(576+192)) = 30 * (9216 + 6144)
    assert t["oppu"]["per_user"] == 460_800 and t["oppu"]["total"] == 460_800_000
    full = t["tapper_full"]
    assert full["per_user"] == 8 * 576 == 4608
    sb = full["shared_breakdown"]
    assert sb["scorer"] == 4 * 576 * 576 + 576 + 576 + 1 == 1_328_257
    assert sb["projection"] == 576 * 4608 + 4608 == 2_658_816
    assert sb["lambdas"] == 2 and sb["up_projection"] == 0
    # bridge r=4 on q, k, v, o: 30 * 4 * ((576+576) + 2*(576+192) + (576+576))
    assert sb["bridge_lora"] == 30 * 4 * 3840 == 460_800
    assert full["shared"] == 1_328_257 + 2 + 2_658_816 + 460_800
    assert full["total"] == 1000 * 4608 + full["shared"] == 9_055_875
    comp = t["tapper_compressed"]
    assert comp["per_user"] == 64
    assert comp["shared_breakdown"]["up_projection"] == 64 * 4608 + 4608
    assert comp["total"] == 64_000 + full["shared"] + 64 * 4608 + 4608
    assert t["oppu"]["pct_of_oppu_total"] == 100.0
    assert full["pct_of_oppu_total"] == pytest.approx(100 * 9_055_875 / 460_800_000)


def test_paper_reference_configuration():
    assert tapper_params(LLAMA31_8B, users=1)["per_user"] == 32_768
    # OPPU's 4,194,304 = 32 layers * (8*(4096+4096) + 8*(4096+4096)): v_proj 4096 wide (no GQA)
    assert oppu_params(LLAMA2_7B, users=1)["per_user"] == 32 * (8 * 8192 + 8 * 8192) == 4_194_304
    # with Llama-3.1-8B's 8 KV heads v_proj is 1024 wide
    assert oppu_params(LLAMA31_8B, users=1)["per_user"] == 32 * (8 * (4096 + 4096) + 8 * (4096 + 1024)) == 3_407_872
    ref = paper_reference(users=1000)
    shared = ref["tapper_full"]["shared"]
    assert shared == (4 * 4096**2 + 4096 + 4096 + 1) + 2 + (4096 * 32_768 + 32_768) + 32 * 4 * (
        8192 + 2 * 5120 + 8192)
    assert 200e6 < shared < 210e6  # "about 200M at d=4096"
    assert ref["tapper_full"]["pct_of_oppu_no_gqa_total"] == pytest.approx(5.66, abs=0.01)  # paper: 5.7%


def test_counts_match_the_real_modules():
    """The formula against the parameters of the modules the pipeline builds (tiny backbone)."""
    from llm_bridge.lora import LoraSpec, add_lora, lora_parameters
    from llm_bridge.tiny import tiny_llama
    from recsys_tapper.build import build_tapper
    from recsys_tapper.config import RunConfig

    lm, _ = tiny_llama()
    shape = BackboneShape.from_config(lm.config)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.hd) == (32, 2, 4, 2, 8)
    cfg = RunConfig()
    cfg.model.projector.slots = 4
    for user_dim in (None, 16):
        cfg.model.user_dim = user_dim
        model = build_tapper(cfg.model, lm, n_users=5)
        want = tapper_params(shape, users=5, slots=4, user_dim=user_dim)
        dense = sum(p.numel() for m in (model.tower.pooling, model.projector) for p in m.parameters())
        assert dense == want["shared"] - want["shared_breakdown"]["bridge_lora"]
        assert model.tower.table.weight.numel() == 5 * want["per_user"]
    peft_lm = add_lora(lm, LoraSpec(r=4, target_modules=list(BRIDGE_TARGETS)))
    assert sum(p.numel() for p in lora_parameters(peft_lm)) == lora_params(shape, 4, BRIDGE_TARGETS)
    peft_lm.unload()


def test_shapes_from_a_model_dir(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                intermediate_size=1536, vocab_size=100).save_pretrained(tmp_path)
    assert BackboneShape.from_model_dir(tmp_path) == BackboneShape(576, 30, 9, 3, 64)
    assert main(["--model-dir", str(tmp_path), "--users", "10", "--json"]) == 0


def test_cli_flags_json(capsys):
    assert main(["--hidden", "576", "--layers", "30", "--kv-heads", "3", "--heads", "9", "--users", "1000",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["oppu"]["per_user"] == 460_800 and out["tapper_full"]["total"] == 9_055_875
    with pytest.raises(SystemExit):
        main(["--hidden", "576"])


def test_python_dash_m_entry_point():
    cmd = [sys.executable, "-m", "recsys_tapper.params", "--hidden", "576", "--layers", "30", "--kv-heads", "3",
           "--heads", "9", "--users", "1000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "460,800,000" in out and "tapper_full" in out and "9,055,875" in out


def test_shapes_from_a_saved_tapper_model_dir(model_dir):
    """A saved TAP-PER model directory gives its backbone's shapes (here the tiny random Llama)."""
    from llm_bridge.tiny import tiny_llama
    from recsys_tapper.params import BackboneShape

    assert BackboneShape.from_model_dir(model_dir) == BackboneShape.from_config(tiny_llama()[0].config)
