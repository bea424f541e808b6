"""benchmarks/serve_latency.py times what is served: its tapper answer is ``Server.predict``'s, its none / rag_k4
answers are the Stage-1 model's label distribution through ``predict_labels`` (no wall-clock assertions)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks.serve_latency import (
    METHODS,
    answer_fns,
    default_config,
    stage1_model,
    time_answers,
    write_model_dir,
)
from recsys_tapper.baselines.rag import HEADER, rag_samples
from recsys_tapper.checkpoint import verify
from recsys_tapper.evaluation import label_token_ids, predict_labels
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.serve import Server
from recsys_tapper.synthetic import synthetic_rating_task


@pytest.fixture(scope="module")
def late(tmp_path_factory):
    """The benchmark's model directory for the shipped default config (configs/demo.yaml: late prefix, item
    table, MF-shaped rows) on the tiny backbone, prefix at layer 1 of 2: (server, stage-1 model, questions)."""
    cfg = default_config(["model=tiny", "model.prefix_layer=1"])
    _, test = synthetic_rating_task(n_users=3, n_records=8, seed=2)
    questions = [dataclasses.replace(ex, extras={"item_id": str(i % 4)}) for i, ex in enumerate(test)]
    server = Server(write_model_dir(cfg, questions, tmp_path_factory.mktemp("serve") / "model"))
    return server, stage1_model(server), questions


def test_benchmark_model_dir_is_save_models_and_loads_with_the_default_shape(late):
    server, base, _ = late
    files = verify(server.model_dir)["files"]
    assert {"items.safetensors", "items.json", "task_lora.safetensors", "histories.parquet"} <= set(files)
    m = server.cfg.model
    assert (m.prefix_layer, m.item_dim, m.warm_start, m.backbone.name_or_path) == (1, 33, "mf", "tiny-random-llama")
    assert server.model.prefix_layer == 1 and server.model.trunk is not None and server.model.items is not None
    assert server.model.trunk.offset == m.projector.slots + 1  # the item slot is part of the prefix
    assert not base.personalized and base.prefix_layer == 0


def test_timed_tapper_answer_is_server_predict_cold_then_warm(late):
    """The first answer of a question runs its trunk once (a miss); the same query again is a hit and returns
    exactly the same dict; both equal the evaluation path (``predict_labels``) on the loaded model."""
    server, base, questions = late
    fns = answer_fns(server, base, questions)
    trunk = server.model.trunk
    seen: set[str] = set()
    for i, q in enumerate(questions):
        before = trunk.n_computed
        got = fns["tapper"](i)
        after = trunk.n_computed
        assert after - before == (q.input not in seen)  # one trunk run per new prompt
        seen.add(q.input)
        again = server.predict(q.user_id, q.input, date=q.date, item_id=q.extras["item_id"])
        assert trunk.n_computed == after and got == again  # a hit, the same answer
        assert got["served_by"] == "pu+pq" and got["n_history"] == len(q.profile)
        ref = predict_labels(server.model, server.fb, server.fb.question_samples([q]), server.task.labels)[0]
        assert got["pred"] == ref["pred"]
        torch.testing.assert_close(got["expected"], ref["expected"], rtol=1e-5, atol=1e-5)
    n = trunk.n_computed
    assert fns["tapper_warm"](0) == fns["tapper"](0) and trunk.n_computed == n


def _naive_probs(model, fb: FeatureBuilder, question: str) -> torch.Tensor:
    """The label distribution at the last prompt token by a plain forward of the whole LM on the prompt ids."""
    ids = torch.tensor(fb.token_rows([Sample("x", "u", [], [], None, question, None)], with_labels=False))
    with torch.no_grad():
        logits = model.lm(input_ids=ids).logits[0, -1]  # (V,)
    return torch.softmax(logits[label_token_ids(fb.tok, fb.task.labels)].float(), -1)


def test_none_and_rag_answers_are_the_stage1_models_label_distribution(late):
    server, base, questions = late
    fns = answer_fns(server, base, questions, rag_max_prompt_tokens=192)
    fb_rag = FeatureBuilder(server.tok, server.encoder, server.task, server.bank, server.users, max_prompt_tokens=192)
    values = torch.arange(1.0, 6.0)
    for i, q in enumerate(questions):
        none, rag = fns["none"](i), fns["rag_k4"](i)
        p_none = _naive_probs(base, server.fb, q.input)
        prompt = rag_samples(fb_rag, [q], k=4, method="recency")[0].question
        assert prompt.startswith(HEADER) and prompt.endswith(q.input)  # records first, the question whole
        p_rag = _naive_probs(base, fb_rag, prompt)
        assert none["pred"] == str(int(p_none.argmax()) + 1) and rag["pred"] == str(int(p_rag.argmax()) + 1)
        torch.testing.assert_close(none["expected"], float(p_none @ values), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rag["expected"], float(p_rag @ values), rtol=1e-5, atol=1e-5)
        assert abs(none["expected"] - rag["expected"]) > 1e-6  # the records in the prompt change the answer


def test_none_reproduces_the_jobs_non_personalized_predictions(tiny_run, model_dir):
    """On a directory the training job wrote (trained task LoRA), the benchmark's none path is the model the job
    scored as non_personalized, and its tapper path the job's TAP-PER."""
    out_dir, test = tiny_run
    saved = json.loads((out_dir / "predictions.json").read_text())
    questions = [ex for ex in test if ex.id in {r["id"] for r in saved["tapper"]}]  # the trained users'
    assert len(questions) == 9  # 3 users x 3 test questions
    server = Server(model_dir)
    fns = answer_fns(server, stage1_model(server), questions)
    for name, method in (("non_personalized", "none"), ("tapper", "tapper")):
        rows = {r["id"]: r for r in saved[name]}
        for i, ex in enumerate(questions):
            got = fns[method](i)
            assert got["pred"] == rows[ex.id]["pred"]
            torch.testing.assert_close(got["expected"], rows[ex.id]["expected"], rtol=1e-5, atol=1e-5)


def test_time_answers_interleaves_warms_up_and_counts_trunk_misses():
    calls: list[tuple[str, int]] = []
    trunk = SimpleNamespace(n_computed=0)
    cached: set[int] = set()

    def fn(name):
        def answer(i):
            calls.append((name, i))
            if name in ("tapper", "tapper_warm") and i not in cached:
                cached.add(i)
                trunk.n_computed += 1
            return {}
        return answer

    ms, misses = time_answers({k: fn(k) for k in METHODS}, 4, trunk, warmup=1)
    assert calls == [("none", 0), ("tapper", 0), ("tapper_warm", 0), ("rag_k4", 0),
                     ("none", 1), ("tapper", 1), ("tapper_warm", 1), ("rag_k4", 1),
                     ("tapper", 2), ("tapper_warm", 2), ("rag_k4", 2), ("none", 2),
                     ("rag_k4", 3), ("none", 3), ("tapper", 3), ("tapper_warm", 3)]
    assert {k: len(v) for k, v in ms.items()} == dict.fromkeys(METHODS, 3) and misses == 3
