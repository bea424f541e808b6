import pytest
import torch

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.tiny import tiny_llama
from recsys_tapper.baselines.oppu import OppuConfig, oppu_params_per_user, run_oppu
from recsys_tapper.evaluation import predict_labels, rating_report
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.model import TapperModel
from recsys_tapper.params import BackboneShape, oppu_params
from recsys_tapper.synthetic import synthetic_rating_task
from recsys_tapper.tasks import get_task
from recsys_tapper.training import OptimConfig
from recsys_tapper.users import UserIndex

# tiny Llama: d=32, 2 layers, 4 heads, 2 KV heads -> head_dim 8, v_proj out 16
# per layer: q 8*(32+32) = 512, v 8*(32+16) = 384 -> 896; 2 layers -> 1792
HAND_COUNT = 1792


def _setup():
    lm, tok = tiny_llama()
    train, test = synthetic_rating_task(n_users=3, n_records=8, n_test=2, seed=4)
    task = get_task("movielens")
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), task, RecordBank(lm.config.hidden_size),
                        UserIndex(sorted({ex.user_id for ex in train})), max_prompt_tokens=64)
    fb.register(train + test)
    samples = fb.question_samples(test)
    # a user with no history at all: the adapter stays a no-op, so the Stage-1 model answers
    samples.append(Sample("ghost_q", "ghost", [], [], 30.0, test[0].input, "3"))
    return lm, fb, train, samples


CFG = OppuConfig(per_user=4, optim=OptimConfig(lr=5e-2, epochs=2, batch_size=4, warmup=0.0), dropout=0.0)


def test_oppu_trains_one_adapter_per_user_and_leaves_the_backbone_alone():
    lm, fb, train, samples = _setup()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    base_rows = predict_labels(TapperModel(lm, None, None), fb, samples, fb.task.labels)
    adapters: dict = {}
    rows = run_oppu(lm, fb, train, samples, CFG, adapters=adapters)

    # backbone: same modules, same weights, still frozen
    assert set(lm.state_dict()) == set(before)
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not any("lora" in n for n, _ in lm.named_modules())
    assert not any(p.requires_grad for p in lm.parameters())

    # rows: one per sample, in order, scoreable
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert [r["n_train"] for r in rows][-1] == 0 and all(r["n_train"] == 4 for r in rows[:-1])
    assert rating_report(rows)["mae"] == pytest.approx(
        sum(abs(int(r["pred"]) - int(r["gold"])) for r in rows) / len(rows))

    # adapters: exact size, trained (B != 0), different across users; the untrained user's B is 0
    users = sorted({s.user for s in samples})
    assert set(adapters) == set(users)
    for u in users:
        assert sum(t.numel() for t in adapters[u].values()) == HAND_COUNT
    trained = [u for u in users if u != "ghost"]
    b = {u: torch.cat([t.flatten() for n, t in adapters[u].items() if "lora_B" in n]) for u in users}
    assert all(b[u].abs().sum() > 0 for u in trained) and b["ghost"].abs().sum() == 0
    for i, u in enumerate(trained):
        for v in trained[i + 1 :]:
            assert not torch.allclose(b[u], b[v])
    # the no-op adapter reproduces the Stage-1 model exactly
    torch.testing.assert_close(torch.tensor(rows[-1]["expected"]), torch.tensor(base_rows[-1]["expected"]))


def test_oppu_is_seeded():
    lm, fb, train, samples = _setup()
    a, b = {}, {}
    run_oppu(lm, fb, train, samples[:2], CFG, adapters=a)
    run_oppu(lm, fb, train, samples[:2], CFG, adapters=b)
    assert set(a) == set(b)
    for u, tensors in a.items():
        for n, t in tensors.items():
            torch.testing.assert_close(t, b[u][n])


def test_params_per_user_is_exact():
    lm, _ = tiny_llama()
    assert oppu_params_per_user(lm, r=8) == HAND_COUNT
    assert oppu_params(BackboneShape.from_config(lm.config), users=1)["per_user"] == HAND_COUNT
    assert oppu_params_per_user(lm, r=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")) == \
        2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32))
