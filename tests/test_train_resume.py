"""train_loop's resume file: an interrupted Stage 2 picks up where it was saved and ends where an uninterrupted
run ends (same parameters, same losses)."""

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.lora import add_lora, lora_parameters
from llm_bridge.tiny import tiny_llama
from recsys_tapper.build import build_tapper
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.synthetic import synthetic_rating_task
from recsys_tapper.tasks import get_task
from recsys_tapper.training import OptimConfig, train_loop
from recsys_tapper.users import UserIndex


def _setup():
    torch.manual_seed(0)
    train, _ = synthetic_rating_task(n_users=3, n_records=6, seed=1)
    lm, tok = tiny_llama()
    users = UserIndex(sorted({ex.user_id for ex in train}))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task("movielens"), RecordBank(32), users)
    fb.register(train)
    plm = add_lora(lm, tiny_config("unused").model.bridge_lora)  # dropout 0.05: the RNG state matters
    model = build_tapper(tiny_config("unused").model, plm, len(users), bank=fb.bank)
    groups = [{"params": list(model.tower.parameters()) + list(model.projector.parameters())},
              {"params": lora_parameters(plm), "lr": 1e-2}]
    return model, fb, fb.profile_samples(train, per_user=None), groups


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    cfg = OptimConfig(lr=1e-2, epochs=2, batch_size=4)
    model, fb, samples, groups = _setup()
    torch.manual_seed(5)
    ref_losses = train_loop(model, samples, fb, groups, cfg)
    ref = _state(model)

    path = tmp_path / "stage2_resume.safetensors"
    model, fb, samples, groups = _setup()
    torch.manual_seed(5)

    def crash(step, loss):
        if step == 4:  # after the 5th step; the last save was after step 4 (save_every=2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_loop(model, samples, fb, groups, cfg, on_step=crash, resume=path, save_every=2)
    assert path.exists()
    model, fb, samples, groups = _setup()  # a fresh process: new model, new optimizer
    torch.manual_seed(123)  # the saved RNG state replaces this
    losses = train_loop(model, samples, fb, groups, cfg, resume=path, save_every=2)
    assert len(losses) == len(ref_losses) == 2 * 3
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    for k, v in _state(model).items():
        assert_close(v, ref[k], atol=1e-6, rtol=1e-6)
    assert not path.exists()  # removed when the loop finished


def test_a_resume_file_of_other_samples_is_refused(tmp_path):
    cfg = OptimConfig(lr=1e-2, epochs=1, batch_size=4)
    model, fb, samples, groups = _setup()
    path = tmp_path / "r.safetensors"

    def crash(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_loop(model, samples, fb, groups, cfg, on_step=crash, resume=path, save_every=1)
    with pytest.raises(ValueError, match="other samples or settings"):
        train_loop(model, samples[1:], fb, groups, cfg, resume=path)
