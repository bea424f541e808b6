"""The main job: Stage 1, Stage 2, and the non-personalized vs TAP-PER comparison.

Single process::

    tapper demo                                   # SmolLM2 + MovieLens-100K, the 100 most active users
    tapper demo model=tiny trainer=smoke data.n_users=5

``run(cfg)`` is importable; tests call it with the tiny backbone.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import get_peft_model_state_dict
from tqdm.auto import tqdm

from embeddings.jagged import segment_ids, segment_sum
from embeddings.record_bank import RecordBank
from llm_bridge.backbone import fingerprint, load_backbone
from llm_bridge.encoder import TextEncoder
from llm_bridge.lora import add_lora, lora_parameters, merge_lora
from llm_bridge.trunk import TrunkCache
from recsys_tapper.build import build_tapper, build_trunk
from recsys_tapper.checkpoint import save_model
from recsys_tapper.config import RunConfig
from recsys_tapper.data import LampExample, build_movielens_lamp, load_lamp, write_predictions
from recsys_tapper.errors import InputError
from recsys_tapper.evaluation import predict_labels, predict_texts, task_report
from recsys_tapper.features import FeatureBuilder, Sample
from recsys_tapper.io import atomic_write_text
from recsys_tapper.label_scoring import classify
from recsys_tapper.model import TapperModel
from recsys_tapper.tasks import CLASSIFICATION, RATING, get_task
from recsys_tapper.training import train_loop
from recsys_tapper.users import UserIndex
from recsys_tapper.warm_start import fit_mf, init_rows, item_index


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_splits(cfg: RunConfig, reports: list | None = None) -> tuple[list[LampExample], list[LampExample]]:
    """(train-split questions, test-split questions), validated; each file's LoadReport goes to ``reports``."""
    if cfg.data.source == "ml100k":
        paths = build_movielens_lamp()
        train_q, train_o = paths[cfg.data.train_split]
        test_q, test_o = paths[cfg.data.test_split]
    elif cfg.data.source == "lamp":
        if not cfg.data.dir:
            raise ValueError("data.source=lamp needs data.dir, the folder with the LaMP JSON files")
        d = Path(cfg.data.dir)
        train_q, train_o = d / f"{cfg.data.train_split}_questions.json", d / f"{cfg.data.train_split}_outputs.json"
        test_q, test_o = d / f"{cfg.data.test_split}_questions.json", d / f"{cfg.data.test_split}_outputs.json"
    else:
        raise ValueError(f"unknown data.source {cfg.data.source!r}: use ml100k or lamp")
    kw = {"task": cfg.task.name, "strict": cfg.data.strict, "max_text_chars": cfg.data.max_text_chars}
    train, train_report = load_lamp(train_q, train_o if Path(train_o).exists() else None, **kw)
    test, test_report = load_lamp(test_q, test_o, **kw)
    if reports is not None:
        reports += [train_report, test_report]
    return train, test


def data_report(reports: list, encoder: TextEncoder) -> dict:
    """What validation skipped, fixed or truncated, for the run's metrics."""
    keys = ("n_examples", "n_skipped_examples", "n_skipped_records", "n_missing_dates", "n_bad_dates",
            "n_truncated_texts", "n_short_profiles")
    out = {r.path: {k: getattr(r, k) for k in keys} for r in reports}
    out["n_texts_truncated_to_max_record_tokens"] = encoder.n_truncated
    return out


def select_users(test: list[LampExample], n_users: int | None) -> list[str]:
    """The ``n_users`` users with the longest visible histories (ties: user id)."""
    longest: dict[str, int] = {}
    for ex in test:
        longest[ex.user_id] = max(longest.get(ex.user_id, 0), len(ex.profile))
    ranked = sorted(longest, key=lambda u: (-longest[u], u))
    return ranked if n_users is None else ranked[:n_users]


def question_trainees(train: list[LampExample], chosen: list[str], n_users: int | None) -> list[str]:
    """For tasks whose profile records carry no label: the users Stage 2 trains rows for, i.e. the chosen test
    users that have gold-labelled train questions, or (user-based LaMP: test users are new) the most active
    train users. Test users without a row are served cold (P_u = 0; P_q still reads their profile)."""
    gold = [ex for ex in train if ex.output is not None]
    if not gold:
        raise InputError("this task's profile records carry no label, so Stage 1 and Stage 2 train on the train "
                         "split's questions and their gold outputs; the train split has none (give its "
                         "outputs file)")
    have = {ex.user_id for ex in gold}
    return [u for u in chosen if u in have] or select_users(gold, n_users)


def personal_splits(train: list[LampExample], test: list[LampExample], n_users: int | None, task) -> tuple:
    """Who is personalized, and on what: (chosen test users, their test questions, the users Stage 2 trains
    rows for, the questions whose profiles or golds give those users' Stage-2 targets)."""
    chosen = select_users(test, n_users)
    chosen_set = set(chosen)
    test = [ex for ex in test if ex.user_id in chosen_set]
    if task.input_template is not None:  # Stage 2 trains on the chosen users' own profile records
        return chosen, test, chosen, personal_history(train, test)
    trainees = question_trainees(train, chosen, n_users)  # LaMP-1/-7: on gold-labelled train questions
    return chosen, test, trainees, [ex for ex in train if ex.user_id in set(trainees)]


def personal_history(train: list[LampExample], test: list[LampExample]) -> list[LampExample]:
    """Questions whose profiles give each test user's Stage-2 targets: the user's train-split questions, or,
    for a user without any (user-based LaMP: test users are new), the user's test questions themselves:
    their profiles are history that precedes the query, never the query's answer."""
    users = {ex.user_id for ex in test}
    own = [ex for ex in train if ex.user_id in users]
    have = {ex.user_id for ex in own}
    return own + [ex for ex in test if ex.user_id not in have]


def stage1_samples(fb: FeatureBuilder, train: list[LampExample], users: set[str], n: int, seed: int) -> list[Sample]:
    """Non-personalized (query -> answer) pairs from other users' records (or, for tasks whose records carry no
    label, other users' gold-labelled questions); no history."""
    if fb.task.input_template is None:
        gold = [ex for ex in train if ex.output is not None]
        qpool = [ex for ex in gold if ex.user_id not in users] or gold  # all personalized: share the questions
        picked_q = random.Random(seed).sample(qpool, min(n, len(qpool)))
        return [Sample(ex.id, f"stage1/{ex.user_id}", [], [], ex.date, ex.input, ex.output) for ex in picked_q]
    pool = [(ex, r) for ex in train if ex.user_id not in users for r in ex.profile]
    if not pool:  # every user is personalized: use records that are never Stage-2 targets
        pool = [(ex, r) for ex in train for r in ex.profile[:1]]
    rng = random.Random(seed)
    picked = rng.sample(pool, min(n, len(pool)))
    out = []
    for ex, r in picked:
        q, a = fb.task.record_example(r.fields)
        out.append(Sample(f"{ex.user_id}/{r.id}", f"stage1/{ex.user_id}", [], [], r.date, q, a))
    return out


def prefill_trunk(trunk: TrunkCache | None, fb: FeatureBuilder, samples: list[Sample], with_labels: bool,
                  desc: str = "trunk cache") -> None:
    """Compute the cached states of every distinct sequence ``samples`` will run (batched, progress bar)."""
    if trunk is None:
        return
    rows = list(dict.fromkeys(tuple(r) for r in fb.trunk_rows(samples, with_labels)))
    step = 256
    for i in tqdm(range(0, len(rows), step), desc=f"{desc} (layers 0..{trunk.k - 1})", leave=False):
        trunk.states(rows[i : i + step])


def evaluate(model, fb, samples, task, batch_size, desc, max_new_tokens: int = 32,
             class_readout: str = "both") -> tuple[dict, list[dict], float]:
    """Rating tasks: one forward pass over the label tokens; classification: ``label_scoring.classify`` under
    ``class_readout``; generation: greedy decoding."""
    t0 = time.perf_counter()
    if task.kind == CLASSIFICATION:
        rep, rows = classify(model, fb, samples, task, class_readout, batch_size, desc, max_new_tokens)
        return rep, rows, time.perf_counter() - t0
    if task.kind == RATING:
        rows = predict_labels(model, fb, samples, task.labels, batch_size=batch_size, desc=desc)
    else:
        rows = predict_texts(model, fb, samples, max_new_tokens, batch_size=batch_size, desc=desc)
    return task_report(task, rows), rows, time.perf_counter() - t0


def train_stage1(cfg: RunConfig, lm, fb: FeatureBuilder, train: list[LampExample], personalized: set[str]):
    """Stage 1: a task LoRA on other users' (query -> answer) pairs, no history; merged and frozen.

    Returns (merged lm, the LoRA's state dict, the samples, seconds)."""
    t0 = time.perf_counter()
    seed_everything(cfg.trainer.seed)
    s1 = stage1_samples(fb, train, personalized, cfg.trainer.stage1_examples, cfg.trainer.seed)
    lm = add_lora(lm, cfg.model.task_lora)
    train_loop(TapperModel(lm, None, None), s1, fb, [{"params": lora_parameters(lm)}], cfg.trainer.stage1,
               desc="stage 1 (task LoRA)")
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(lm).items()}
    return merge_lora(lm), state, s1, time.perf_counter() - t0


def mean_histories(bank: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
    """(N, d): each sample's mean visible record vector (uniform attention), samples without history skipped."""
    rows = [s.history_rows for s in samples if s.history_rows]
    if not rows:
        raise ValueError("no sample has a visible history to fit the context standardizer on")
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.tensor([i for r in rows for i in r])
    return segment_sum(bank[ids], segment_ids(lengths), len(rows)) / lengths[:, None]


def frozen_digest(lm) -> str:
    """A hash of every decoder layer's attention and MLP weights (first rows): tells one merged Stage-1
    LoRA from another, which the backbone fingerprint (config + input embeddings) does not."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(lm.named_parameters()):
        if "layers." in name and "lora_" not in name:
            h.update(p.detach()[:2].float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def train_stage2(cfg: RunConfig, lm, fb: FeatureBuilder, users: UserIndex, train: list[LampExample],
                 trunk: TrunkCache | None = None, resume: str | Path | None = None):
    """Stage 2: P_u rows, scorer, lambdas, projection and a fresh bridge LoRA on the users' own histories
    (plus the item table when ``model.item_dim`` is set; rows warm-started from MF with ``model.warm_start``).

    ``resume``: a file where the loop saves its state every 200 steps and resumes from (``train_loop``).
    Returns (model, samples, per-step losses, seconds). ``lm`` gains the bridge LoRA layers (peft); call
    ``model.lm.unload()`` to get the plain backbone back."""
    t0 = time.perf_counter()
    m = cfg.model
    seed_everything(cfg.trainer.seed + 1)
    plm = add_lora(lm, m.bridge_lora, first_layer=m.prefix_layer)
    s2 = fb.stage2_samples(train, per_user=cfg.trainer.stage2_per_user, seed=cfg.trainer.seed)
    if not s2:
        raise InputError("Stage 2 has no training examples: no personalized user has a profile record after "
                         "their first (or, for tasks without labelled records, a gold-labelled train question)")
    if m.item_dim is not None:
        fb.items = item_index(s2)
    model = build_tapper(m, plm, len(users), len(fb.items or ()) if m.item_dim is not None else 0, trunk)
    model.item_index = fb.items if m.item_dim is not None else None
    if m.warm_start == "mf":
        mf = fit_mf(train, m.warm_start_rank, cfg.trainer.seed, fb.task.output_field or "score")
        init_rows(model.tower.table.weight, users, mf.users, mf.P, mf.bu)
        if model.items is not None:
            init_rows(model.items.table.weight, fb.items, mf.items, mf.Q, mf.bi)
    if m.projector.standardize_context:
        model.projector.fit_context(mean_histories(fb.bank.vectors, s2))
    prefill_trunk(trunk, fb, s2, with_labels=True)
    rows = list(model.tower.table.parameters()) + (list(model.items.table.parameters()) if model.items else [])
    dense = list(model.tower.pooling.parameters()) + list(model.projector.parameters())
    dense += list(model.items.up.parameters()) if model.items else []
    groups = [
        {"params": rows, "lr": cfg.trainer.lr_user, "weight_decay": cfg.trainer.wd_user},
        {"params": dense, "lr": cfg.trainer.lr_dense},
        {"params": lora_parameters(plm), "lr": cfg.trainer.lr_bridge},
    ]
    tag = json.dumps([OmegaConf.to_container(OmegaConf.structured(cfg.model)),
                      OmegaConf.to_container(OmegaConf.structured(cfg.trainer)), fingerprint(lm), frozen_digest(lm),
                      fb.bank.keys[:3], len(fb.bank)], default=str)
    losses = train_loop(model, s2, fb, groups, cfg.trainer.stage2, desc="stage 2 (personalization)", resume=resume,
                        resume_tag=tag)
    return model, s2, losses, time.perf_counter() - t0


def run(cfg: RunConfig, splits: tuple[list[LampExample], list[LampExample]] | None = None) -> dict:
    """Train Stage 1 and Stage 2, evaluate both models on the test questions, write metrics.json."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    task = get_task(cfg.task.name)
    t_start = time.perf_counter()
    reports: list = []
    train, test = splits if splits is not None else load_splits(cfg, reports)
    chosen, test, trainees, train_chosen = personal_splits(train, test, cfg.data.n_users, task)
    chosen_set = set(chosen)

    lm, tok = load_backbone(cfg.model.backbone)
    encoder = TextEncoder(lm, tok, cfg.model.max_record_tokens)
    users = UserIndex(trainees)
    fb = FeatureBuilder(tok, encoder, task, RecordBank(lm.config.hidden_size), users,
                        cfg.model.max_prompt_tokens, cfg.model.max_history)
    fb.register(train_chosen + test, progress=True)
    test_samples = fb.question_samples(test)

    lm, task_lora_state, s1, stage1_s = train_stage1(cfg, lm, fb, train, set(trainees) | chosen_set)
    base = TapperModel(lm, None, None)
    new_tokens = cfg.trainer.eval_max_new_tokens
    np_rep, np_rows, np_eval_s = evaluate(base, fb, test_samples, task, cfg.trainer.eval_batch_size,
                                          "eval non-personalized", new_tokens, cfg.trainer.class_readout)
    trunk = build_trunk(cfg.model, lm, task_lora_state)
    model, s2, losses, stage2_s = train_stage2(cfg, lm, fb, users, train_chosen, trunk,
                                               resume=Path(cfg.out_dir) / "stage2_resume.safetensors")
    prefill_trunk(trunk, fb, test_samples, with_labels=False, desc="trunk cache, test prompts")
    tp_rep, tp_rows, tp_eval_s = evaluate(model, fb, test_samples, task, cfg.trainer.eval_batch_size, "eval TAP-PER",
                                          new_tokens, cfg.trainer.class_readout)

    user_dim = model.tower.table.cfg.dim
    result = {
        "task": task.name,
        "n_users": len(chosen),
        "n_trained_users": len(users),
        "n_cold_test_queries": sum(r["cold"] for r in tp_rows),
        "n_test_queries": len(test_samples),
        "n_stage1_examples": len(s1),
        "n_stage2_examples": len(s2),
        "stage2_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "lambda_t": model.tower.pooling.lambda_t.detach().item(),
        "lambda_o": model.tower.pooling.lambda_o.detach().item(),
        "methods": {
            "non_personalized": {**np_rep, "params_per_user": 0, "train_s": stage1_s, "eval_s": np_eval_s,
                                 "wall_s": stage1_s + np_eval_s},
            "tapper": {**tp_rep, "params_per_user": user_dim, "train_s": stage2_s, "eval_s": tp_eval_s,
                       "wall_s": stage1_s + stage2_s + tp_eval_s},
        },
        "total_wall_s": time.perf_counter() - t_start,
        "data_report": data_report(reports, encoder),
        "references": rating_references(test, task.output_field) if task.kind == RATING else {},
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)) if not isinstance(cfg, dict) else cfg,
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    save_model(out / "model", model, task_lora_state, users, fb.bank, cfg, histories=train_chosen + test)
    for name, rows in (("non_personalized", np_rows), ("tapper", tp_rows)):  # LaMP's outputs layout
        write_predictions({r["id"]: r["pred"] for r in rows}, out / f"{name}_outputs.json", task.name)
    atomic_write_text(out / "predictions.json", json.dumps({"non_personalized": np_rows, "tapper": tp_rows}))
    return result


def rating_references(test: list[LampExample], field: str = "score") -> dict:
    """No-LLM references on the same test questions, from each question's visible history only:
    the most frequent rating of all visible histories (one constant), and each user's median rating."""
    from collections import Counter
    from statistics import median

    golds = [int(ex.output) for ex in test]
    seen = Counter(int(r.fields[field]) for ex in test for r in ex.profile)
    mode = seen.most_common(1)[0][0] if seen else 3
    user_median = [int(median([int(r.fields[field]) for r in ex.profile]) + 0.5) if ex.profile else mode
                   for ex in test]

    def mae(preds: list[int]) -> float:
        return sum(abs(a - b) for a, b in zip(preds, golds)) / max(1, len(golds))

    return {"constant_history_mode": {"value": mode, "mae": mae([mode] * len(golds))},
            "user_median": {"mae": mae(user_median)}}


TABLE_METRICS = {"mae": "MAE", "rmse": "RMSE", "mae_expected": "MAE(E)", "accuracy": "Acc", "f1": "F1",
                 "rouge1": "ROUGE-1", "rougeL": "ROUGE-L"}


def format_table(result: dict) -> str:
    first = next(iter(result["methods"].values()))
    cols = [k for k in TABLE_METRICS if k in first]
    head = f"{'method':<18}" + "".join(f"{TABLE_METRICS[k]:>9}" for k in cols) + f"{'params/user':>13}{'wall s':>9}"
    lines = [head, "-" * len(head)]
    for name, m in result["methods"].items():
        lines.append(f"{name:<18}" + "".join(f"{m.get(k, float('nan')):>9.3f}" for k in cols)
                     + f"{m['params_per_user']:>13,}{m['wall_s']:>9.1f}")
    lines.append(f"{result['n_users']} users, {result['n_test_queries']} test queries, "
                 f"total {result['total_wall_s']:.0f} s")
    return "\n".join(lines)
