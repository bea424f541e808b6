"""Label-set scoring for classification (recsys_tapper/label_scoring.py) against per-label HF forwards."""

from dataclasses import replace

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from embeddings.record_bank import RecordBank
from llm_bridge.encoder import TextEncoder
from llm_bridge.lora import LoraSpec, add_lora
from llm_bridge.tiny import tiny_llama
from llm_bridge.trunk import decoder
from recsys_tapper.build import build_tapper, build_trunk
from recsys_tapper.config import RunConfig, TrainerConfig
from recsys_tapper.evaluation import predict_labels, predict_texts
from recsys_tapper.executors import LocalExecutor
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.job import score
from recsys_tapper.label_scoring import classify, label_scores, predict_label_set, tree_layout
from recsys_tapper.metrics import classification_metrics
from recsys_tapper.model import TapperModel, TapperTrain
from recsys_tapper.synthetic import synthetic_rating_task, synthetic_tagging_task
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

N_LAYERS, SLOTS = 4, 2


def _setup(k: int, personalized: bool = True, task: str = "LaMP-2M"):
    """A tiny 4-layer model (prefix at layer k, a non-zero bridge LoRA), a feature builder and question samples.

    The random model is sharpened (q/k and the final norm scaled up): at its init scale it attends almost
    uniformly and its next-token distribution is almost flat, so a wrong mask or position would hide below the
    tolerance. The questions are cut to their descriptions (the char tokenizer spends a token per character)."""
    torch.manual_seed(0)
    make = synthetic_tagging_task if task == "LaMP-2M" else synthetic_rating_task
    train, test = make(n_users=3, n_records=6, n_test=2, seed=1)
    lm, tok = tiny_llama(layers=N_LAYERS)
    inner, _ = decoder(lm)
    for layer in inner.layers:
        layer.self_attn.q_proj.weight.mul_(8.0)
        layer.self_attn.k_proj.weight.mul_(8.0)
    inner.norm.weight.mul_(20.0)
    users = UserIndex(sorted({ex.user_id for ex in test}))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task(task), RecordBank(lm.config.hidden_size), users,
                        max_prompt_tokens=128)
    fb.register(train + test)
    samples = [replace(s, question=s.question.rsplit(": ", 1)[1]) for s in fb.question_samples(test)]
    if not personalized:
        return TapperModel(lm, None, None).eval(), fb, samples
    m = tiny_config("unused", slots=SLOTS).model
    m.prefix_layer = k
    trunk = build_trunk(m, lm, None)
    plm = add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.0), first_layer=k)
    for n, p in plm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return build_tapper(m, plm, len(users), trunk=trunk, bank=fb.bank).eval(), fb, samples


def _naive_logits(model, prefix: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """(L+n, V) logits of ``prefix`` (1, L, d) | None followed by token ids ``ids``, no padding, no packing: HF's
    own forward at k = 0; at k > 0 HF's hidden states entering layer k, then the upper layers on [P | states]."""
    n_slots = 0 if prefix is None else prefix.shape[1]
    x = torch.tensor([ids])
    k = model.prefix_layer
    if k == 0:
        embeds = model.lm.get_input_embeddings()(x)
        if prefix is not None:
            embeds = torch.cat([prefix, embeds], dim=1)
        return model.lm(inputs_embeds=embeds).logits[0]
    inner, lm_head = decoder(model.lm)
    pos = torch.arange(n_slots, n_slots + len(ids))[None]
    hs = model.lm.get_base_model().model(input_ids=x, position_ids=pos, output_hidden_states=True)
    h = torch.cat([prefix, hs.hidden_states[k]], dim=1)  # (1, L+n, d)
    p = torch.arange(h.shape[1])[None]
    rope = inner.rotary_emb(h, position_ids=p)
    for layer in inner.layers[k:]:
        h = layer(h, attention_mask=None, position_ids=p, position_embeddings=rope)
    return lm_head(inner.norm(h))[0]


def _naive_scores(model, fb, batch, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) mean and (B, K) summed log-probability of each label's answer tokens, one full forward of
    prompt + label per (question, label): log_softmax, gather, mean."""
    prefix = model.prefix(batch) if model.personalized else None  # (B, L, d)
    n_slots = SLOTS if model.personalized else 0
    means, sums = [], []
    for i, last in enumerate(batch.last_prompt.tolist()):
        prompt = batch.input_ids[i, : last + 1].tolist()
        row_m, row_s = [], []
        for lab in labels:
            ans = fb.answer_ids(lab)
            p_i = None if prefix is None else prefix[i : i + 1]
            logp = torch.log_softmax(_naive_logits(model, p_i, prompt + ans), dim=-1)
            read = torch.arange(len(ans)) + n_slots + len(prompt) - 1  # target m is read one position earlier
            lp = logp[read, torch.tensor(ans)]
            row_m.append(lp.mean())
            row_s.append(lp.sum())
        means.append(torch.stack(row_m))
        sums.append(torch.stack(row_s))
    return torch.stack(means), torch.stack(sums)


def test_tree_layout_by_hand():
    # prompts of 3 and 1 tokens; labels "8"+EOS and "99"+EOS (targets [8, 1] and [9, 9, 1])
    lay = tree_layout([[5, 6, 7], [4]], [[8, 1], [9, 9, 1]], pad_id=0)
    assert lay.ids.tolist() == [[5, 6, 7, 8, 9, 9], [4, 8, 9, 9, 0, 0]]
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 3, 4]
    assert lay.positions[1, :4].tolist() == [0, 1, 1, 2]
    # target order: 8, EOS | 9, 9, EOS. "8" and the first "9" are both read at the last prompt token.
    assert lay.read_pos.tolist() == [[2, 3, 2, 4, 5], [0, 1, 0, 2, 3]]
    assert lay.targets.tolist() == [8, 1, 9, 9, 1] and lay.label_of.tolist() == [0, 0, 1, 1, 1]
    assert lay.n_targets.tolist() == [2, 3]
    want0 = torch.tensor([[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0],   # "8" sees the prompt and itself
                          [1, 1, 1, 0, 1, 0],   # first "9" does not see "8"
                          [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    want1 = torch.tensor([[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 0, 1, 0, 0, 0],
                          [1, 0, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 0],   # padding sees only itself (never read)
                          [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(lay.allowed[0], want0) and torch.equal(lay.allowed[1], want1)


@pytest.mark.parametrize(("k", "personalized"), [(0, True), (0, False), (1, True), (3, True)])
def test_label_scores_equal_a_per_label_full_forward(k, personalized):
    model, fb, samples = _setup(k, personalized)
    labels = get_task("LaMP-2M").labels  # 15 tags of 6..17 characters (+ EOS)
    batch = fb.collate(samples, with_labels=False)
    assert len(set(batch.last_prompt.tolist())) > 1  # right padding is exercised
    got = label_scores(model, batch, [fb.answer_ids(lab) for lab in labels])  # (B, K)
    with torch.no_grad():
        want, _ = _naive_scores(model, fb, batch, labels)
    assert got.shape == (len(samples), len(labels))
    assert_close(got, want, atol=1e-5, rtol=1e-4)  # fp32; packed vs per-label, other padding


def test_scores_are_length_normalised_over_the_answer_tokens_and_eos():
    """Labels of 1 and 3 characters: n = 2 and 4 targets (EOS included); score = summed log-prob / n."""
    model, fb, samples = _setup(0)
    labels = ("x", "xyz")
    assert [len(fb.answer_ids(lab)) for lab in labels] == [2, 4]
    batch = fb.collate(samples[:2], with_labels=False)
    got = label_scores(model, batch, [fb.answer_ids(lab) for lab in labels])
    with torch.no_grad():
        _, sums = _naive_scores(model, fb, batch, labels)
    assert_close(got, sums / torch.tensor([2.0, 4.0]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[:, 1], sums[:, 1], atol=1e-3)  # not the unnormalised sum
    # norm="sum" (trainer.label_norm=sum): the label's own log-probability, no division
    assert_close(label_scores(model, batch, [fb.answer_ids(lab) for lab in labels], norm="sum"), sums,
                 atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown label score norm 'max'"):
        label_scores(model, batch, [fb.answer_ids(lab) for lab in labels], norm="max")


@pytest.mark.parametrize("k", [0, 2])
def test_a_label_score_is_minus_the_training_loss_on_that_label(k):
    """The readout scores exactly what Stage 1/Stage 2 train on: mean token CE of (prompt -> label + EOS)."""
    model, fb, samples = _setup(k)
    labels = get_task("LaMP-2M").labels
    s = samples[0]
    scores = label_scores(model, fb.collate([s], with_labels=False),
                          [fb.answer_ids(lab) for lab in labels])[0]
    with torch.no_grad():
        losses = torch.stack([TapperTrain(model)(fb.collate([Sample(s.id, s.user, s.history_rows, s.history_days,
                                                                    s.query_day, s.question, lab)]))[0]
                              for lab in labels])
    assert_close(scores, -losses, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [0, 2])
def test_answers_are_the_best_label_and_always_in_the_label_set(k):
    model, fb, samples = _setup(k)
    labels = get_task("LaMP-2M").labels
    rows = predict_label_set(model, fb, samples, labels, batch_size=4)  # two batches
    # one batch of all questions (label_scores == the naive per-label forward: the test above)
    want = label_scores(model, fb.collate(samples, with_labels=False),
                        [fb.answer_ids(lab) for lab in labels])
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert [r["gold"] for r in rows] == [s.answer for s in samples]
    assert all(r["pred"] in labels for r in rows)
    assert [r["pred"] for r in rows] == [labels[int(i)] for i in want.argmax(1)]
    assert_close(torch.tensor([[r["label_scores"][lab] for lab in labels] for r in rows]), want,
                 atol=1e-5, rtol=1e-4)


def test_single_token_labels_without_eos_agree_with_the_rating_readout():
    """A rating task appends no EOS: its label-set answer is the argmax of the next-token distribution."""
    model, fb, samples = _setup(0, task="movielens")
    labels = get_task("movielens").labels
    got = predict_label_set(model, fb, samples, labels)
    want = predict_labels(model, fb, samples, labels)
    assert [r["pred"] for r in got] == [r["pred"] for r in want]


def test_evaluate_answers_by_label_set_and_reports_generation_beside_it():
    model, fb, samples = _setup(0)
    task = get_task("LaMP-2M")
    assert TrainerConfig().class_readout == "both"
    cfg = RunConfig()
    cfg.trainer.eval_batch_size, cfg.trainer.eval_max_new_tokens = 4, 3
    rep, rows, _ = score(LocalExecutor(), model, fb, samples, task, cfg, "eval")  # what the job runs
    gen = predict_texts(model, fb, samples, max_new_tokens=3, batch_size=4)
    golds = [s.answer for s in samples]
    assert [r["pred"] for r in rows] == [r["pred"] for r in predict_label_set(model, fb, samples, task.labels)]
    assert [r["pred_generate"] for r in rows] == [g["pred"] for g in gen]
    for name, v in classification_metrics([r["pred"] for r in rows], golds, task.labels).items():
        assert rep[name] == pytest.approx(v)
    for name, v in classification_metrics([g["pred"] for g in gen], golds, task.labels).items():
        assert rep[f"{name}_generate"] == pytest.approx(v)
    assert rep["out_of_label_set_frac"] == 0.0 and rep["readout"] == "label_set" and rep["n"] == len(samples)
    # a random tiny model's 3 greedy characters are not a tag
    assert rep["out_of_label_set_frac_generate"] == 1.0
    only_gen, gen_rows = classify(model, fb, samples, task, "generate", batch_size=4, max_new_tokens=3)
    assert [r["pred"] for r in gen_rows] == [g["pred"] for g in gen] and only_gen["readout"] == "generate"
    assert "accuracy_generate" not in only_gen
    with pytest.raises(ValueError, match="unknown classification readout"):
        classify(model, fb, samples, task, "sample")
