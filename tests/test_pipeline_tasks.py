"""The pipeline on classification and generation tasks (greedy decoding, LaMP metrics, outputs layout)."""

import json

import pytest
import torch

from recsys_tapper.evaluation import task_report
from recsys_tapper.metrics import classification_metrics, rouge_metrics
from recsys_tapper.pipeline import run
from recsys_tapper.synthetic import synthetic_headline_task, synthetic_tagging_task
from recsys_tapper.tasks import get_task
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("task", "make", "metrics"),
    [("LaMP-2M", synthetic_tagging_task, {"accuracy", "f1", "out_of_label_set_frac"}),
     ("LaMP-4", synthetic_headline_task, {"rouge1", "rougeL"})],
)
def test_pipeline_runs_classification_and_generation_tasks(tmp_path, task, make, metrics):
    cfg = tiny_config(tmp_path / "run", n_users=3, stage1_examples=8, stage2_per_user=2)
    cfg.task.name = task
    cfg.trainer.eval_max_new_tokens = 4
    train, test = make(n_users=4, n_records=8, n_test=2, seed=3)
    result = run(cfg, splits=(train, test))
    assert result["n_test_queries"] == 6
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())
    for name in ("non_personalized", "tapper"):
        assert metrics <= set(saved["methods"][name])
        rows = preds[name]
        # the saved metrics are the task's LaMP metrics of exactly the saved predictions
        golds, answers = [r["gold"] for r in rows], [r["pred"] for r in rows]
        expect = (classification_metrics(answers, golds, get_task(task).labels) if task == "LaMP-2M"
                  else rouge_metrics(answers, golds))
        for k, v in expect.items():
            assert saved["methods"][name][k] == pytest.approx(v)
        outputs = json.loads((tmp_path / "run" / f"{name}_outputs.json").read_text())
        assert outputs["task"] == task
        assert {g["id"]: g["output"] for g in outputs["golds"]} == {r["id"]: r["pred"] for r in rows}


def test_task_report_counts_out_of_set_answers_as_wrong():
    task = get_task("LaMP-2M")
    rows = [{"gold": "comedy", "pred": "comedy"}, {"gold": "comedy", "pred": "funny"},
            {"gold": "sci-fi", "pred": "sci-fi"}, {"gold": "romance", "pred": "comedy"}]
    rep = task_report(task, rows)
    assert rep["accuracy"] == 0.5 and rep["out_of_label_set_frac"] == 0.25 and rep["n"] == 4


def test_task_report_refuses_rows_without_golds():
    with pytest.raises(ValueError, match="have no gold output"):
        task_report(get_task("LaMP-4"), [{"gold": None, "pred": "x"}])


def test_profiles_without_labels_are_refused_with_the_reason(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.task.name = "LaMP-7"
    with pytest.raises(NotImplementedError, match="carry no label"):
        run(cfg, splits=([], []))


def test_generate_matches_step_by_step_argmax_with_a_prefix():
    """model.generate (left-padded, KV cache) == re-running the full sequence and taking the argmax each step."""
    from embeddings.record_bank import RecordBank
    from llm_bridge.backbone import BackboneConfig, load_backbone
    from llm_bridge.encoder import TextEncoder
    from recsys_tapper.features import FeatureBuilder
    from recsys_tapper.pipeline import build_tapper
    from recsys_tapper.users import UserIndex

    torch.manual_seed(0)
    _, test = synthetic_headline_task(n_users=3, n_records=6, n_test=1, seed=1)
    lm, tok = load_backbone(BackboneConfig(name_or_path="tiny-random-llama"))
    users = UserIndex(sorted({ex.user_id for ex in test}))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task("LaMP-4"), RecordBank(lm.config.hidden_size), users)
    fb.register(test)
    batch = fb.collate(fb.question_samples(test), with_labels=False)
    model = build_tapper(tiny_config("unused", slots=2), lm, len(users)).eval()
    bank = fb.bank.vectors
    toks = model.generate(batch, bank, max_new_tokens=3, eos_token_id=-1)
    with torch.no_grad():
        prefix = model.prefix(batch, bank)
        emb = model.lm.get_input_embeddings()
        for i, last in enumerate(batch.last_prompt.tolist()):
            seq = torch.cat([prefix[i], emb(batch.input_ids[i, : last + 1])])
            for t in toks[i]:
                nxt = int(model.lm(inputs_embeds=seq[None]).logits[0, -1].argmax())
                assert nxt == t
                seq = torch.cat([seq, emb(torch.tensor([t]))])
