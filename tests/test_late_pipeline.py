"""Full-history Stage 2, the MF warm start, the item table and the readouts, end to end on the tiny model."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from torch.testing import assert_close

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.tiny import tiny_llama
from recsys_tapper.evaluation import median_index, rating_report
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.job import run
from recsys_tapper.synthetic import synthetic_rating_task
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex


def test_full_history_targets_see_only_earlier_records():
    """stage2_per_user=None: every record after the first is a target; its history is exactly the records
    before it (never itself, never a later one), with their dates."""
    train, _ = synthetic_rating_task(n_users=2, n_records=7, seed=3)
    lm, tok = tiny_llama()
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task("movielens"), RecordBank(32), UserIndex(["syn0", "syn1"]))
    fb.register(train)
    samples = fb.profile_samples(train, per_user=None)
    assert len(samples) == sum(len(ex.profile) - 1 for ex in train) == 10
    key_of = {row: key for key, row in fb.bank.index.items()}
    for s in samples:
        ex = next(e for e in train if e.user_id == s.user)
        target = next(i for i, r in enumerate(ex.profile) if f"{ex.user_id}/{r.id}" == s.id)
        assert [key_of[r] for r in s.history_rows] == [f"{ex.user_id}/{r.id}" for r in ex.profile[:target]]
        assert s.history_days == [r.date for r in ex.profile[:target]]
        assert all(d < s.query_day for d in s.history_days)
        assert s.item == ex.profile[target].id.removeprefix(f"{s.user}_")


def test_median_readout_by_hand():
    assert median_index(torch.tensor([0.1, 0.2, 0.15, 0.3, 0.25])) == 3  # CDF 0.1 0.3 0.45 0.75
    assert median_index(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.5])) == 0  # CDF reaches 1/2 at the first label
    rows = [{"gold": "4", "pred": "5", "median": "4", "expected": 3.5},
            {"gold": "1", "pred": "1", "median": "2", "expected": 2.0}]
    rep = rating_report(rows, "median")
    assert rep["readout"] == "median" and rep["mae"] == 0.5 and rep["mae_argmax"] == 0.5
    assert rep["mae_expected"] == 0.75 and rep["rmse"] == pytest.approx(np.sqrt(0.5))
    with pytest.raises(ValueError, match="unknown readout"):
        rating_report(rows, "mode")


@pytest.fixture(scope="module")
def late_run(tmp_path_factory):
    """A tiny run with the prefix at layer 1 of 2, MF warm start and an item table, every record a target."""
    cfg = tiny_config(tmp_path_factory.mktemp("late"), stage2_per_user=None)
    cfg.model.prefix_layer = 1
    cfg.model.warm_start = "mf"
    cfg.model.warm_start_rank = 4
    cfg.model.item_dim = 5
    splits = synthetic_rating_task(n_users=4, n_records=8, seed=2)
    return cfg, run(cfg, splits=splits), splits


def test_late_run_trains_every_record_and_saves_item_table(late_run):
    cfg, result, (train, _) = late_run
    assert result["n_stage2_examples"] == 3 * (len(train[0].profile) - 1)  # 3 users, every record but the first
    tapper = result["methods"]["tapper"]
    assert tapper["params_per_user"] == 5 and {"mae_median", "mae_expected", "mae_argmax"} <= set(tapper)
    saved = load_file(f"{cfg.out_dir}/model/items.safetensors")
    with open(f"{cfg.out_dir}/model/items.json") as f:
        items = json.load(f)
    assert saved["table.ebc.embedding_bags.item_state.weight"].shape == (len(items), 5)
    assert saved["up.weight"].shape == (32, 5)  # one item slot of width d=32


def test_saved_late_model_reloads_and_predicts_the_same(late_run):
    from recsys_tapper.checkpoint import load_model
    from recsys_tapper.evaluation import predict_labels

    cfg, _, (_, test) = late_run
    model, tok, users, bank, _ = load_model(f"{cfg.out_dir}/model")
    assert model.prefix_layer == 1 and model.trunk is not None and model.items is not None
    fb = FeatureBuilder(tok, TextEncoder(model.lm, tok), get_task("movielens"), bank, users,
                        items=model.item_index)
    samples = fb.question_samples([ex for ex in test if users.row(ex.user_id) is not None])
    rows = predict_labels(model, fb, samples, get_task("movielens").labels)
    with open(f"{cfg.out_dir}/predictions.json") as f:
        saved = {r["id"]: r for r in json.load(f)["tapper"]}
    for r in rows:
        assert r["pred"] == saved[r["id"]]["pred"]
        assert r["expected"] == pytest.approx(saved[r["id"]]["expected"], abs=1e-5)


def test_mf_warm_start_writes_p_u_and_b_u_into_the_rows():
    from recsys_tapper.warm_start import fit_mf, init_rows

    train, _ = synthetic_rating_task(n_users=3, n_records=10, seed=4)
    mf = fit_mf(train, rank=3, seed=0)
    users = UserIndex(["new", "syn2", "syn0"])
    weight = torch.full((3, 4), 7.0)
    assert init_rows(weight, users, mf.users, mf.P, mf.bu) == 2
    for uid in ("syn2", "syn0"):
        j = mf.users.index[uid]
        assert_close(weight[users.row(uid)], torch.tensor([*mf.P[j], mf.bu[j]], dtype=torch.float32))
    assert weight[0].eq(7.0).all()  # MF never saw "new": its row is left as it was
    with pytest.raises(ValueError, match="4 wide, MF gives 2"):
        init_rows(weight, users, mf.users, mf.P[:, :2], mf.bu)
