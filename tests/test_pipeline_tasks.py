"""The pipeline on classification and generation tasks (greedy decoding, LaMP metrics, outputs layout)."""

import json

import pytest
import torch

from recsys_tapper.evaluation import task_report
from recsys_tapper.job import run
from recsys_tapper.metrics import classification_metrics, rouge_metrics
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


def _unlabelled_profile_task(task: str, train_users, test_users, n_questions: int = 3):
    """Tiny LaMP-1 / LaMP-7 style data: profile records without labels, gold-labelled questions."""
    from recsys_tapper.data import LampExample, ProfileRecord

    def profile(user):
        if task == "LaMP-7":
            return tuple(ProfileRecord(f"{user}-r{i}", {"text": f"{user} tweet number {i} lol"}, float(i))
                         for i in range(4))
        return tuple(ProfileRecord(f"{user}-r{i}", {"title": f"paper {i} of {user}", "abstract": f"we study {i}"},
                                   float(i)) for i in range(4))

    def question(user, j):
        if task == "LaMP-7":
            return (f"Paraphrase the following tweet without any explanation before or after it: note {j}",
                    f"{user} says note {j} lol")
        prompt = (f'For an author who has written the paper with the title "t{j}", which reference is related? '
                  f'Just answer with [1] or [2] without explanation. [1]: "a{j}" [2]: "b{j}"')
        return prompt, ["[1]", "[2]"][j % 2]

    def examples(users, split):
        out = []
        for u in users:
            for j in range(n_questions):
                text, gold = question(u, j)
                out.append(LampExample(f"{split}-{u}-{j}", u, text, profile(u), 10.0 + j, gold))
        return out

    return examples(train_users, "train"), examples(test_users, "test")


@pytest.mark.parametrize("task", ["LaMP-1", "LaMP-7"])
def test_unlabelled_profiles_train_on_gold_questions_and_new_users_are_cold(tmp_path, task):
    """Stage 2 trains rows for the test users with gold train questions; a new test user is served cold."""
    cfg = tiny_config(tmp_path / "run", n_users=3, stage1_examples=4, stage2_per_user=2)
    cfg.task.name = task
    cfg.trainer.eval_max_new_tokens = 4
    train, test = _unlabelled_profile_task(task, ["u0", "u1", "u2", "u3"], ["u0", "u1", "new"])
    result = run(cfg, splits=(train, test))
    assert result["n_users"] == 3 and result["n_trained_users"] == 2
    assert result["n_stage2_examples"] == 4  # 2 latest gold questions each of u0 and u1
    assert result["n_cold_test_queries"] == 3  # the new user's questions
    metric = "accuracy" if task == "LaMP-1" else "rouge1"
    assert metric in result["methods"]["tapper"]
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())["tapper"]
    assert {r["user"] for r in preds if r["cold"]} == {"new"}


def test_user_based_split_trains_the_train_users_and_serves_every_test_user_cold(tmp_path):
    cfg = tiny_config(tmp_path / "run", n_users=2, stage1_examples=4, stage2_per_user=1)
    cfg.task.name = "LaMP-7"
    cfg.trainer.eval_max_new_tokens = 3
    train, test = _unlabelled_profile_task("LaMP-7", ["a", "b", "c"], ["x", "y"], n_questions=2)
    result = run(cfg, splits=(train, test))
    assert result["n_trained_users"] == 2 and result["n_stage2_examples"] == 2
    assert result["n_cold_test_queries"] == result["n_test_queries"] == 4


def test_unlabelled_profiles_without_train_golds_are_refused(tmp_path):
    from dataclasses import replace

    cfg = tiny_config(tmp_path / "run")
    cfg.task.name = "LaMP-7"
    train, test = _unlabelled_profile_task("LaMP-7", ["u0"], ["u0"])
    with pytest.raises(ValueError, match="the train split has none"):
        run(cfg, splits=([replace(ex, output=None) for ex in train], test))


def test_generate_matches_step_by_step_argmax_with_a_prefix():
    """model.generate (left-padded, KV cache) == re-running the full sequence and taking the argmax each step."""
    from embeddings.record_bank import RecordBank
    from llm_bridge.backbone import BackboneConfig, load_backbone
    from llm_bridge.encoder import TextEncoder
    from recsys_tapper.build import build_tapper
    from recsys_tapper.features import FeatureBuilder
    from recsys_tapper.users import UserIndex

    torch.manual_seed(0)
    _, test = synthetic_headline_task(n_users=3, n_records=6, n_test=1, seed=1)
    lm, tok = load_backbone(BackboneConfig(name_or_path="tiny-random-llama"))
    users = UserIndex(sorted({ex.user_id for ex in test}))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task("LaMP-4"), RecordBank(lm.config.hidden_size), users)
    fb.register(test)
    batch = fb.collate(fb.question_samples(test), with_labels=False)
    model = build_tapper(tiny_config("unused", slots=2).model, lm, len(users), bank=fb.bank).eval()
    toks = model.generate(batch, max_new_tokens=3, eos_token_id=-1)
    with torch.no_grad():
        prefix = model.prefix(batch)
        emb = model.lm.get_input_embeddings()
        for i, last in enumerate(batch.last_prompt.tolist()):
            seq = torch.cat([prefix[i], emb(batch.input_ids[i, : last + 1])])
            for t in toks[i]:
                nxt = int(model.lm(inputs_embeds=seq[None]).logits[0, -1].argmax())
                assert nxt == t
                seq = torch.cat([seq, emb(torch.tensor([t]))])


def _lamp7_under_torchrun(root: str) -> dict:
    import torch.distributed as dist

    from recsys_tapper.dist_train import DistConfig, DistRunConfig, train_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r = train_distributed(_lamp7_config(DistRunConfig(dist=DistConfig(save_model=False)), root),
                          splits=_unlabelled_profile_task("LaMP-7", ["u0", "u1", "u2", "u3"], ["u0", "u1", "new"]))
    dist.destroy_process_group()
    return {k: r[k] for k in ("n_trained_users", "n_stage2_examples", "n_cold_test_queries", "predictions", "losses")}


def _lamp7_config(cfg, root: str):
    base = tiny_config(root, n_users=3, stage1_examples=4, stage2_per_user=2)
    cfg.model, cfg.data, cfg.trainer, cfg.out_dir = base.model, base.data, base.trainer, str(root)
    cfg.task.name = "LaMP-7"
    cfg.trainer.eval_max_new_tokens = 4
    cfg.trainer.table_optimizer, cfg.trainer.table_lr = "sgd", 1.0  # FBGEMM's fused SGD == local torch SGD
    cfg.model.task_lora.dropout = cfg.model.bridge_lora.dropout = 0.0  # masks would differ with the batch split
    return cfg


@pytest.mark.slow
def test_lamp7_runs_under_torchrun_as_it_runs_locally(tmp_path):
    """A task whose records carry no label (gold-question targets, a cold new user, generation) under torchrun at
    world size 2: the same samples, losses and greedy answers as the local executor."""
    from recsys_tapper.config import RunConfig
    from tests.test_distributed import launch

    two = launch(_lamp7_under_torchrun, 2, str(tmp_path / "w2"))
    threads = torch.get_num_threads()
    try:
        local = run(_lamp7_config(RunConfig(), str(tmp_path / "local")),
                    splits=_unlabelled_profile_task("LaMP-7", ["u0", "u1", "u2", "u3"], ["u0", "u1", "new"]))
    finally:
        torch.set_num_threads(threads)
    r0, r1 = two[0], two[1]
    assert (r0["n_trained_users"], r0["n_stage2_examples"], r0["n_cold_test_queries"]) == (2, 4, 3)
    assert (local["n_trained_users"], local["n_stage2_examples"], local["n_cold_test_queries"]) == (2, 4, 3)
    assert r1["predictions"] is None and r0["losses"] == r1["losses"]
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(local["losses"]), atol=1e-5, rtol=1e-4)
    ours = local["predictions"]["tapper"]
    assert [(r["id"], r["pred"], r["cold"]) for r in r0["predictions"]] == [(r["id"], r["pred"], r["cold"]) for r in ours]
