"""Serving: known users reproduce the evaluation path; cold users are served by P_q plus the cold-start row."""

import json
import math

import pytest
import torch

from embeddings.cold_start import cold_start_rows
from recsys_tapper.serve import Query, Server

Q = "Rate the movie from 1 to 5. movie: film 12 | drama"
HISTORY = [{"id": "a", "text": "film 1 | drama", "score": "5", "date": 3.0},
           {"id": "b", "text": "film 2 | comedy", "score": "1", "date": 6.0}]


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run

@pytest.fixture(scope="module")
def server(trained):
    return Server(trained[0] / "model")


@pytest.fixture(scope="module")
def mean_server(trained):
    return Server(trained[0] / "model", cold_start="mean")


def test_cold_start_rows_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-1.0, 1.0]])
    assert torch.equal(cold_start_rows(w, "zero"), torch.zeros(2))
    assert torch.equal(cold_start_rows(w, "mean"), torch.tensor([1.0, 1.0]))
    assert torch.equal(cold_start_rows(torch.zeros(0, 3), "mean"), torch.zeros(3))
    with pytest.raises(ValueError, match="cold_start mode 'median' is not one of zero, mean"):
        cold_start_rows(w, "median")


def test_known_users_reproduce_the_evaluation_predictions(trained, server):
    out_dir, test = trained
    saved = {r["id"]: r for r in json.loads((out_dir / "predictions.json").read_text())["tapper"]}
    checked = 0
    for ex in test:
        if ex.id not in saved:
            continue
        checked += 1
        got = server.predict(ex.user_id, ex.input, date=ex.date)
        assert got["served_by"] == "pu+pq" and got["n_history"] == len(ex.profile)
        assert got["pred"] == saved[ex.id]["pred"]
        torch.testing.assert_close(got["expected"], saved[ex.id]["expected"], rtol=1e-5, atol=1e-5)
        assert math.isclose(sum(got["probs"].values()), 1.0, rel_tol=1e-5)
    assert checked == len(saved) == 9  # 3 users x 3 test questions


def _with_row(server: Server, user: str, row: torch.Tensor, fn):
    """Run ``fn`` with ``user``'s P_u row temporarily replaced (a reference for the cold-start paths)."""
    w = server.model.tower.table.weight
    r = server.users.row(user)
    saved = w[r].detach().clone()
    with torch.no_grad():
        w[r] = row
    try:
        return fn()
    finally:
        with torch.no_grad():
            w[r] = saved


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_cold_user_is_served_by_pq_plus_the_cold_start_row(server, mean_server, mode):
    s = server if mode == "zero" else mean_server
    cold = s.predict("never-seen", Q, history_records=HISTORY, date=8.0)
    assert cold["served_by"] == f"pq_only({mode})" and cold["n_history"] == 2
    # reference: a known user whose row is set to the cold-start row, with the same history and date
    row = torch.zeros(s.model.tower.table.weight.shape[1]) if mode == "zero" else \
        s.model.tower.table.weight.detach().mean(0)
    ref = _with_row(s, "syn1", row, lambda: s.predict("syn1", Q, history_records=HISTORY, date=8.0))
    assert ref["served_by"] == "pu+pq"
    torch.testing.assert_close(torch.tensor(list(cold["probs"].values())), torch.tensor(list(ref["probs"].values())))


def test_zero_and_mean_cold_start_differ_and_history_matters(server, mean_server):
    z = server.predict("never-seen", Q, history_records=HISTORY, date=8.0)
    m = mean_server.predict("never-seen", Q, history_records=HISTORY, date=8.0)
    bare = server.predict("never-seen", Q)
    assert bare["served_by"] == "pq_only(zero)" and bare["n_history"] == 0
    assert z["probs"] != m["probs"] and z["probs"] != bare["probs"]


def test_bad_inputs_give_clear_errors(server):
    cases = [
        ({"question_input": "   "}, ValueError, "question_input is empty"),
        ({"date": float("nan")}, ValueError, "date: nan is not a finite number of days"),
        ({"date": "13/45/2020"}, ValueError, "date: cannot parse date '13/45/2020': month must be in 1..12"),
        ({"user_id": ""}, ValueError, "user_id must be a non-empty string, got ''"),
        ({"history_records": [{"id": "x", "text": "t"}]}, ValueError,
         "history_records[0]: task movielens: profile record lacks field 'score'"),
        ({"history_records": [{"id": "x", "text": "t", "score": "3", "date": float("inf")}]}, ValueError,
         "history_records[0]: field 'date': inf is not a finite number of days"),
        ({"history_records": ["x"]}, TypeError, "history_records[0]: expected a ProfileRecord or a dict, got str"),
    ]
    for kw, err, msg in cases:
        args = {"user_id": "syn0", "question_input": Q} | kw
        with pytest.raises(err) as e:
            server.predict(**args)
        assert str(e.value) == msg
    with pytest.raises(ValueError, match="cold_start 'warm' is not one of zero, mean"):
        Server(server.model_dir, cold_start="warm")


def test_a_label_weighted_model_serves_new_records_as_the_job_encoded_its_own(tmp_path):
    """model.record_label_weight = 1: records the bank lacks are encoded by the same FeatureBuilder rule as the
    training job's (text + label embedding), so a user's saved history passed as new records (other ids, so
    the bank lacks them) gives the same answer as the saved history read from the bank."""
    from recsys_tapper.job import run
    from recsys_tapper.synthetic import synthetic_rating_task
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path / "run")
    cfg.model.record_label_weight = 1.0
    splits = synthetic_rating_task(n_users=4, n_records=8, seed=2)
    run(cfg, splits=splits)
    s = Server(tmp_path / "run" / "model")
    ex = next(e for e in splits[1] if s.users.row(e.user_id) is not None)
    saved = s.predict(ex.user_id, ex.input, date=ex.date)
    recs = [{"id": f"new-{r.id}", **r.fields, "date": r.date} for r in s.records(ex.user_id)]
    fresh = s.predict(ex.user_id, ex.input, history_records=recs, date=ex.date)
    assert fresh["n_history"] == saved["n_history"] == len(recs) > 0
    for lab in saved["probs"]:
        assert math.isclose(fresh["probs"][lab], saved["probs"][lab], rel_tol=1e-5, abs_tol=1e-6)
    r0 = s.records(ex.user_id)[0]
    text = s.encoder.encode([s.task.record_text(r0.fields)])
    label = s.encoder.encode([r0.fields[s.task.output_field]])
    torch.testing.assert_close(s.encode_records([(ex.user_id, r0)]), text + label)
    torch.testing.assert_close(s.bank.vectors[s.bank.index[f"{ex.user_id}/{r0.id}"]][None], text + label)


@pytest.mark.parametrize("norm", ["mean", "sum"])
def test_a_classification_model_is_served_by_label_set_scoring(tmp_path, norm):
    """LaMP-2M: the server answers with the job's label_set readout (each tag's whole token sequence scored
    behind the prefix, under the job's trainer.label_norm), not with first tokens; its probs are the softmax of
    those scores."""
    from recsys_tapper.job import run
    from recsys_tapper.label_scoring import label_scores
    from recsys_tapper.synthetic import synthetic_tagging_task
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path / "run")
    cfg.task.name, cfg.trainer.class_readout, cfg.trainer.label_norm = "LaMP-2M", "label_set", norm
    splits = synthetic_tagging_task(n_users=3, n_records=6, n_test=2, seed=3)
    run(cfg, splits=splits)
    saved = {r["id"]: r for r in json.loads((tmp_path / "run" / "predictions.json").read_text())["tapper"]}
    s = Server(tmp_path / "run" / "model")
    assert s.label_set and s.label_ids is None
    checked = 0
    for ex in splits[1]:
        if ex.id not in saved:
            continue
        got = s.predict(ex.user_id, ex.input, date=ex.date)
        assert got["pred"] == saved[ex.id]["pred"] and got["pred"] in s.task.labels
        batch = s.batch([Query(ex.user_id, ex.input, None, ex.date)])
        scores = label_scores(s.model, batch, s.label_targets, cold_row=s.cold_row, norm=norm)[0]
        torch.testing.assert_close(torch.tensor(list(got["probs"].values())), torch.softmax(scores, 0))
        checked += 1
    assert checked == len(saved) == 6  # 3 users x 2 test questions


def test_a_sif_content_model_is_served_and_explained_as_trained(tmp_path):
    """model.text_weighting=sif + model.pooling.content_beta: the token weights the job fitted on the training
    records travel with the bank, so the server encodes questions and new records as the job did (its
    evaluation predictions are reproduced); the pooling's centers are the job's means; explain's content column
    is beta * cos by hand."""
    from recsys_tapper.explain import explain
    from recsys_tapper.features import text_weights
    from recsys_tapper.job import run
    from recsys_tapper.pipeline import personal_splits
    from recsys_tapper.synthetic import synthetic_rating_task
    from recsys_tapper.tasks import get_task
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path / "run")
    cfg.model.text_weighting = "sif"
    cfg.model.pooling.content_beta = 4.0
    splits = synthetic_rating_task(n_users=4, n_records=8, seed=2)
    run(cfg, splits=splits)
    s = Server(tmp_path / "run" / "model")
    task = get_task("movielens")
    _, test, _, train_chosen = personal_splits(*splits, cfg.data.n_users, task)
    want = text_weights("sif", s.tok, task, train_chosen + test, s.model.lm.get_input_embeddings().num_embeddings)
    torch.testing.assert_close(s.bank.token_weights, want)
    assert float(want.min()) < 0.5 < float(want.max()) == 1.0  # template tokens are down-weighted
    assert s.encoder.token_weights is s.bank.token_weights
    pool = s.model.tower.pooling
    torch.testing.assert_close(pool.record_center, s.bank.vectors.mean(0))
    assert float(pool.query_center.norm()) > 0

    saved = {r["id"]: r for r in json.loads((tmp_path / "run" / "predictions.json").read_text())["tapper"]}
    ex = next(e for e in test if e.id in saved)
    got = s.predict(ex.user_id, ex.input, date=ex.date)
    torch.testing.assert_close(got["expected"], saved[ex.id]["expected"], rtol=1e-5, atol=1e-5)
    r0 = s.records(ex.user_id)[0]
    sif_mean = s.encoder.encode([s.task.record_text(r0.fields)])
    plain = torch.nn.functional.embedding(
        torch.tensor(s.tok(s.task.record_text(r0.fields), add_special_tokens=False)["input_ids"]),
        s.model.lm.get_input_embeddings().weight).mean(0, keepdim=True)
    assert not torch.allclose(sif_mean, plain, atol=1e-4)  # the weights change the vector
    torch.testing.assert_close(s.encode_records([(ex.user_id, r0)]), sif_mean)
    torch.testing.assert_close(s.bank.vectors[s.bank.index[f"{ex.user_id}/{r0.id}"]][None], sif_mean)

    data = explain(s, ex.user_id, ex.input, date=ex.date)
    q = s.encoder.encode([ex.input])[0] - pool.query_center
    h = s.bank.vectors[[s.bank.index[f"{ex.user_id}/{r.id}"] for r in s.records(ex.user_id)]] - pool.record_center
    want_content = float(pool.beta.detach()) * (h @ q) / (h.norm(dim=-1) * q.norm())
    torch.testing.assert_close(torch.tensor([r["content_score"] for r in data["records"]]), want_content,
                               rtol=1e-5, atol=1e-5)
    assert data["alpha_check_max_abs"] < 1e-5 and "beta*cos" in data["formula"]
