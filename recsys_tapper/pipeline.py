"""What the job (``recsys_tapper.job``) is made of: splits, personalized users, Stage-1 samples, the trunk cache
prefill, the no-LLM references and the results table.

    train, test = load_splits(cfg)
    chosen, test, trainees, train_chosen = personal_splits(train, test, n_users=100, task=task)
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from embeddings.jagged import segment_ids, segment_sum
from llm_bridge.encoder import TextEncoder
from llm_bridge.trunk import TrunkCache
from recsys_tapper.config import RunConfig
from recsys_tapper.data import LampExample, build_movielens_lamp, load_lamp
from recsys_tapper.errors import InputError
from recsys_tapper.features import FeatureBuilder, Sample


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
