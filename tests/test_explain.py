"""``tapper explain``: its numbers against a direct computation (literal DIN scorer, penalties by hand, the LM
alone for the answer without the prefix), and the PNG + JSON it writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recsys_tapper.cli import main
from recsys_tapper.explain import explain
from recsys_tapper.serve import Query, Server

Q = "Rate the movie from 1 to 5. movie: film 12 | drama"
QUERY_DAY = 30.0


@pytest.fixture(scope="module")
def server(model_dir):
    return Server(model_dir)


@pytest.fixture(scope="module")
def data(server):
    return explain(server, "syn0", Q, date=QUERY_DAY, top_k=3)


def test_attention_scores_and_penalties_equal_a_direct_computation(server, data):
    recs = server.histories["syn0"]
    pool = server.model.tower.pooling
    lam_t, lam_o = float(pool.lambda_t.detach()), float(pool.lambda_o.detach())
    assert data["lambda_t"] == lam_t and data["lambda_o"] == lam_o and data["n_history"] == len(recs) == 8
    # by hand: the literal DIN unit on [q; h; q-h; q*h], the penalties with math.log1p, a softmax
    q = server.encoder.encode([Q])  # (1, d)
    h = server.bank.vectors[[server.bank.index[f"syn0/{r.id}"] for r in recs]]  # (N, d)
    with torch.no_grad():
        din = pool.scorer.reference(q.expand_as(h), h)  # (N,)
    days = [QUERY_DAY - r.date for r in recs]
    gaps = [float(len(recs) - j) for j in range(len(recs))]
    pen_t = torch.tensor([lam_t * math.log1p(x) for x in days])
    pen_o = torch.tensor([lam_o * math.log1p(g) for g in gaps])
    score = din - pen_t - pen_o
    alpha = torch.softmax(score, 0)
    got = {k: torch.tensor([r[k] for r in data["records"]]) for k in data["records"][0] if k in (
        "din_score", "time_penalty", "order_penalty", "score", "alpha", "days_before_query", "position_gap")}
    torch.testing.assert_close(got["days_before_query"], torch.tensor(days))
    torch.testing.assert_close(got["position_gap"], torch.tensor(gaps))
    torch.testing.assert_close(got["din_score"], din, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["time_penalty"], pen_t)
    torch.testing.assert_close(got["order_penalty"], pen_o)
    torch.testing.assert_close(got["score"], score, rtol=1e-5, atol=1e-5)
    # alpha is the tower's own output; softmax of the penalised scores reproduces it
    torch.testing.assert_close(got["alpha"], alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.softmax(got["score"], 0), got["alpha"], rtol=1e-5, atol=1e-6)
    assert data["alpha_check_max_abs"] < 1e-6 and abs(float(got["alpha"].sum()) - 1.0) < 1e-5
    assert data["top"] == sorted(range(8), key=lambda j: -float(alpha[j]))[:3]
    assert [r["record_id"] for r in data["records"]] == [r.id for r in recs]
    assert data["records"][0]["text"] == server.task.record_text(recs[0].fields)
    assert data["query_date"] == "1970-01-31T00:00:00" and data["served_by"] == "pu+pq"


def test_penalty_curves_by_hand(data):
    c = data["penalty_curves"]
    assert c["days"][0] == 0.0 and c["days"][-1] == pytest.approx(max(r["days_before_query"] for r in data["records"]))
    for x, y in zip(c["days"], c["time_penalty"]):
        assert y == pytest.approx(data["lambda_t"] * math.log1p(x), rel=1e-12, abs=1e-15)
    assert c["position_gap"] == [float(g) for g in range(1, 9)]
    for g, y in zip(c["position_gap"], c["order_penalty"]):
        assert y == pytest.approx(data["lambda_o"] * math.log1p(g), rel=1e-12, abs=1e-15)


def test_answer_distribution_with_and_without_the_prefix(server, data):
    served = server.predict("syn0", Q, date=QUERY_DAY)
    ans = data["answer"]
    assert ans["with_prefix"]["probs"] == pytest.approx(served["probs"], abs=1e-6)
    assert ans["with_prefix"]["expected"] == pytest.approx(served["expected"], abs=1e-5)
    # without: the LM alone on the prompt (no soft tokens), read at the answer position
    batch = server.batch([Query("syn0", Q)])
    lm = server.model.lm
    with torch.no_grad():
        logits = lm(inputs_embeds=lm.get_input_embeddings()(batch.input_ids),
                    attention_mask=batch.attention_mask).logits[0, int(batch.last_prompt[0])]
    bare = torch.softmax(logits[server.label_ids].float(), 0)
    torch.testing.assert_close(torch.tensor(list(ans["without_prefix"]["probs"].values())), bare,
                               rtol=1e-5, atol=1e-6)
    diff = max(abs(ans["with_prefix"]["probs"][k] - ans["without_prefix"]["probs"][k]) for k in ans["labels"])
    assert diff > 1e-4  # the prefix changes the distribution
    assert sum(ans["without_prefix"]["probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_a_cold_user_with_an_inline_history(server):
    hist = [{"id": "a", "text": "film 1 | drama", "score": "5", "date": 3.0},
            {"id": "b", "text": "film 2 | comedy", "score": "1", "date": 6.0}]
    d = explain(server, "never-seen", Q, history_records=hist)  # no date: the last record's
    assert d["served_by"] == "pq_only(zero)" and d["query_date"] == "1970-01-07T00:00:00"
    assert [r["days_before_query"] for r in d["records"]] == [3.0, 0.0]
    assert [r["position_gap"] for r in d["records"]] == [2.0, 1.0]
    assert sum(r["alpha"] for r in d["records"]) == pytest.approx(1.0, abs=1e-6)
    empty = explain(server, "nobody", Q)
    assert empty["records"] == [] and empty["top"] == [] and empty["effective_records"] == 0.0


def test_tapper_explain_writes_a_png_and_the_json(model_dir, tmp_path, server, data):
    out = tmp_path / "pics" / "syn0"
    main(["explain", f"model_dir={model_dir}", "user=syn0", f'question="{Q}"', "date=2592000", f"out={out}",
          "top_k=3"])
    png, js = out.with_suffix(".png"), out.with_suffix(".json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    written = json.loads(js.read_text())
    assert written["top"] == data["top"] and written["query_date"] == data["query_date"]
    assert [r["alpha"] for r in written["records"]] == pytest.approx([r["alpha"] for r in data["records"]], abs=1e-7)
    with pytest.raises(SystemExit) as e:  # bad input: a plain message, exit 2, nothing written
        main(["explain", f"model_dir={model_dir}", "user=syn0", "question=q", "date=13/45/2020",
              f"out={tmp_path / 'bad'}"])
    assert e.value.code == 2 and not (tmp_path / "bad.json").exists()


def test_a_windowed_pooling_explains_the_window_in_its_order_penalty(model_dir):
    """With ``model.pooling.window`` the order penalty is lambda_o log(1+g) + lambda_w softplus(g - w), in the
    records, the curve and the formula, and softmax(score) is still the tower's own alpha."""
    from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig

    srv = Server(model_dir)
    old = srv.model.tower.pooling
    pool = TimeAwarePooling(TimeAwarePoolingConfig(**{**vars(old.cfg), "window": 3.0}), d=old.scorer.d)
    pool.load_state_dict(old.state_dict(), strict=False)
    with torch.no_grad():
        pool.window_lambda.fill_(2.0)
        pool.window_width.fill_(2.5)
    srv.model.tower.pooling = pool
    out = explain(srv, "syn0", Q, date=QUERY_DAY)
    lam_o = float(pool.lambda_o.detach())
    gaps = [r["position_gap"] for r in out["records"]]
    want = [lam_o * math.log1p(g) + 2.0 * math.log1p(math.exp(g - 2.5)) for g in gaps]
    assert [r["order_penalty"] for r in out["records"]] == pytest.approx(want, rel=1e-5)
    assert out["penalty_curves"]["order_penalty"] == pytest.approx(
        [lam_o * math.log1p(g) + 2.0 * math.log1p(math.exp(g - 2.5)) for g in out["penalty_curves"]["position_gap"]],
        rel=1e-9)
    assert out["alpha_check_max_abs"] < 1e-6 and out["lambda_w"] == 2.0 and out["window_width"] == 2.5
    assert "softplus(position_gap - window_width)" in out["formula"]
