"""A compressed ``model.user_dim`` end to end on the tiny model: rows r wide (r < L·d), a shared up-projection
(r -> L·d) that the prefix goes through, trained, saved and reloaded.

Tiny backbone: d = 32; L = 2 slots, so a full row would be 64 wide; here r = 8.
"""

import json

import torch
from conftest import tiny_config
from safetensors.torch import load_file

from llm_bridge.encoder import TextEncoder
from recsys_tapper.checkpoint import load_model
from recsys_tapper.evaluation import predict_labels
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.job import run
from recsys_tapper.synthetic import synthetic_rating_task
from recsys_tapper.tasks import get_task

R, L, D = 8, 2, 32


def test_compressed_rows_go_through_the_trained_up_projection(tmp_path):
    cfg = tiny_config(tmp_path / "run", slots=L)
    cfg.model.user_dim = R
    train, test = synthetic_rating_task(n_users=4, n_records=8, seed=2)
    result = run(cfg, splits=(train, test))
    assert result["methods"]["tapper"]["params_per_user"] == R

    # saved: (U, r) rows and an r -> L*d up-projection
    mdir = tmp_path / "run" / "model"
    users = json.loads((mdir / "users.json").read_text())
    tower = load_file(mdir / "tower.safetensors")
    assert tower["table.ebc.embedding_bags.user_state.weight"].shape == (len(users), R)
    proj = load_file(mdir / "projector.safetensors")
    assert proj["user_up.weight"].shape == (L * D, R) and proj["user_up.bias"].shape == (L * D,)

    # reloaded: the prefix is user_up(P_u row) + history_proj(context), reshaped to (B, L, d)
    model, tok, index, bank, _ = load_model(mdir)
    assert isinstance(model.projector.user_up, torch.nn.Linear)
    task = get_task("movielens")
    fb = FeatureBuilder(tok, TextEncoder(model.lm, tok), task, bank, index, cfg.model.max_prompt_tokens)
    samples = fb.question_samples([ex for ex in test if index.row(ex.user_id) is not None])
    batch = fb.collate(samples, with_labels=False)
    with torch.no_grad():
        prefix = model.prefix(batch)  # (B, L, d)
        rows = model.tower.table.weight[[index.row(s.user) for s in samples]]  # (B, r)
        _, context, _ = model.tower(batch.users, batch.history, batch.q)  # (B, d)
        want = model.projector.user_up(rows) + model.projector.history_proj(context)  # (B, L*d)
    assert prefix.shape == (len(samples), L, D)
    torch.testing.assert_close(prefix, want.view(-1, L, D))

    # the up-projection matters: zeroing it changes the label distribution of every personalized question
    before = predict_labels(model, fb, samples, task.labels)
    with torch.no_grad():
        model.projector.user_up.weight.zero_()
        model.projector.user_up.bias.zero_()
    after = predict_labels(model, fb, samples, task.labels)
    assert all(abs(a["expected"] - b["expected"]) > 1e-6 for a, b in zip(after, before, strict=True))
