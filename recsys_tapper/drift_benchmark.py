"""``tapper benchmark drift``: each method's metric against how much of the profile follows a drifted rule.

The SYNTHETIC generator (``recsys_tapper.synthetic``) plants a per-user rule that changes at a known point; with
``drift_frac`` = f the last f of each profile (and every test query) follows the new rule. Smaller f is a more
recent drift: fewer records show the new rule and more show the old one. For each task and each f:

| task       | generator                  | layout (prompts, templates) | metric (table, plot)            |
|------------|----------------------------|-----------------------------|---------------------------------|
| ``tagging``  | ``synthetic_tagging_task``  | LaMP-2M, label-set scoring  | accuracy (+ F1, out-of-label-set) |
| ``rating``   | ``synthetic_rating_task``   | movielens, 1-5              | MAE (+ RMSE)                    |
| ``headline`` | ``synthetic_headline_task`` | LaMP-4, greedy decoding     | ROUGE-L (+ ROUGE-1)             |

Methods: ``non_personalized`` (the Stage-1 model), ``rag_recency_k4`` (the 4 latest records in the prompt),
``tapper_no_time`` (TAP-PER without lambda_t, lambda_o) and ``tapper``. One Stage-1 task LoRA per task, trained on
``stage1_users`` other users of the same generator without drift (their records do not depend on f), is shared by
every fraction and method of the task (cached beside the results). TAP-PER rows report lambda_t, lambda_o and
where Stage 2 started them. The defaults (configs/benchmark_drift.yaml) start the lambdas at the data's recency
prior (``model.lambda_init=data``), train them at their own rate (``trainer.lr_lambda``) and add each record's
label embedding to its vector (``model.record_label_weight=1``); ``tapper_random_lambda`` and
``tapper_no_label_weight`` (optional methods) undo one each; ``tapper_pq_only`` (optional) drops the static
``P_u`` row. The rating defaults also turn on SIF-weighted record and question vectors and the pooling's content
term (``model.text_weighting=sif``, ``model.pooling.content_beta``); ``tapper_no_content`` (optional) turns both
off. Stage 2 trains on every profile record after the first (``per_user=null``) for 3 epochs.

Results go to ``results_dir/drift.json`` after every row, each row's answers to
``results_dir/predictions/<task>_<f>_<method>.jsonl`` (a killed run resumes; a row is reused only when every
setting it depends on is unchanged; ``rerun=[tapper]`` recomputes), then ``drift.md`` and ``drift.png``. Two
invocations can fill one table side by side, split by task or fraction: start the second with ``resume=true`` once
the first has written its table (before its first Stage 1); each save merges, under the table's lock, the rows the
other wrote, and invocations sharing a task train its Stage 1 once (a lock per task)::

    tapper benchmark drift                                        # SmolLM2, the defaults (estimate printed)
    tapper benchmark drift tasks=[tagging] fractions=[0.1,0.5] methods=[tapper,tapper_no_time]
    tapper benchmark drift model=tiny trainer=smoke n_users=4 ~task_overrides results_dir=runs/drift  # smoke run
    tapper benchmark drift resume=false 'tasks=[rating,headline]' &  # then, once it has written drift.json:
    tapper benchmark drift 'tasks=[tagging]'                             # (resume=true, the default)
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from embeddings.jagged import segment_ids, segment_sum
from embeddings.record_bank import RecordBank
from llm_bridge.backbone import SMOLLM2_LAYERS, load_backbone
from llm_bridge.encoder import TextEncoder
from llm_bridge.lora import add_lora, merge_lora
from recsys_tapper.baselines.rag import RAG_METHODS, rag_samples
from recsys_tapper.benchmark import ABLATIONS, file_digest, merge_runs, method_settings, table_lock
from recsys_tapper.build import build_trunk
from recsys_tapper.checks import check_prefix_layer, check_readout
from recsys_tapper.config import RunConfig
from recsys_tapper.errors import InputError
from recsys_tapper.executors import LocalExecutor
from recsys_tapper.features import FeatureBuilder, bank_key, check_text_weighting, feature_builder
from recsys_tapper.io import atomic_write_text, load_resumable
from recsys_tapper.job import score, train_stage1, train_stage2
from recsys_tapper.model import TapperModel, lambda_report
from recsys_tapper.pipeline import personal_splits, prefill_trunk
from recsys_tapper.runmeta import run_meta
from recsys_tapper.synthetic import (
    RECORD_DAYS,
    drift_point,
    synthetic_headline_task,
    synthetic_rating_task,
    synthetic_tagging_task,
)
from recsys_tapper.tasks import RATING, get_task
from recsys_tapper.users import UserIndex

# task -> (generator, layout task, headline metric, higher is better)
DRIFT_TASKS = {"tagging": (synthetic_tagging_task, "LaMP-2M", "accuracy", True),
               "rating": (synthetic_rating_task, "movielens", "mae", False),
               "headline": (synthetic_headline_task, "LaMP-4", "rougeL", True)}
# bumped when a task's generator changes what it writes, so that older rows of that task are recomputed
# (headline 2: habits that rouge-score can see; version 1's ALL CAPS, lower case and "!!!" it could not)
GENERATOR_VERSION = {"tagging": 1, "rating": 1, "headline": 2}
DRIFT_METHODS = ["non_personalized", "rag_recency_k4", "tapper_no_time", "tapper"]
# ablations of the drift defaults: the paper's record vectors; lambdas started at N(0, 0.02), not the data's prior
DRIFT_ABLATIONS = {"tapper_no_label_weight": {"model": {"record_label_weight": 0.0}},
                   "tapper_random_lambda": {"model": {"lambda_init": None}},
                   # P_q alone: no static P_u row (a row trained on the whole profile also holds the old rule)
                   "tapper_pq_only": ABLATIONS["tapper_pq_only"],
                   # the paper's plain-mean vectors and DIN score (what the rating defaults turn on)
                   "tapper_no_content": {"model": {"text_weighting": "mean", "pooling": {"content_beta": None}}}}
OPTIONAL_METHODS = list(DRIFT_ABLATIONS)
# SmolLM2-135M on this project's 2-core CPU (README, perf.json), per 40-token example: forward + backward through
# all layers (Stage 1), one forward; one greedy step (assumed).
# Stage 2 per example and decoder layer above the prefix layer: train_layer + train_layer_token x tokens, fitted to
# two layer-20 rows on the 2-core AMD machine (rating: 1,500 examples of 25 tokens in 89 s; tagging: 5,400 of 94
# tokens in ~700 s); at layer 28 it gives 0.015 s per 40-token example (0.019 measured on the Intel machine)
COST_S = {"train_full": 0.24, "train_layer": 0.0033, "train_layer_token": 1.03e-4, "forward": 0.06,
          "decode_step": 0.01}
# tokens per example, measured with SmolLM2's tokenizer on the generator's text: prompt, answer (+EOS), RAG-k4
# prompt (cut at rag_max_prompt_tokens), extra label tokens of label-set scoring
TOKENS = {"tagging": (91, 3, 200, 25), "rating": (24, 1, 83, 0), "headline": (30, 11, 166, 0)}


@dataclass
class DriftBenchmarkConfig(RunConfig):
    """Args:
    target: ``drift``.
    tasks / fractions / methods: what to run (see the module docstring); fractions are ``drift_frac`` values.
    n_users: scored users per task and fraction (each with ``n_test`` test queries).
    n_records: profile records per user; stage1_users: the other users Stage 1 trains on (no drift).
    per_user: Stage-2 targets per user (the most recent profile records); null: every profile record after the
        first (record i the target, the records before it its history), the paper's full-history regime.
    task_overrides: per-task settings merged over the rest, e.g. ``{rating: {per_user: 5}}`` (Stage-2 settings
        only: what a row's settings record, never Stage 1, the data or the prompts every row shares).
    results_dir: where drift.json/.md/.png go. resume / rerun: as ``tapper benchmark ml100k``.
    rag_max_prompt_tokens: RAG prompts keep their k records whole up to this many tokens.
    """

    target: str = "drift"
    tasks: list[str] = field(default_factory=lambda: list(DRIFT_TASKS))
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    methods: list[str] = field(default_factory=lambda: list(DRIFT_METHODS))
    n_users: int = 100
    n_records: int = 20
    n_test: int = 1
    stage1_users: int = 40
    per_user: int | None = None
    task_overrides: dict[str, Any] = field(default_factory=dict)
    results_dir: str = "benchmarks/results"
    resume: bool = True
    rerun: list[str] = field(default_factory=list)
    rag_max_prompt_tokens: int = 192


def check_drift_config(cfg) -> None:
    """Names and sizes, before any work."""
    bad = ([f"task {t!r}" for t in cfg.tasks if t not in DRIFT_TASKS]
           + [f"method {m!r}" for m in [*cfg.methods, *cfg.rerun] if m not in DRIFT_METHODS + OPTIONAL_METHODS]
           + [f"fraction {f}" for f in cfg.fractions if not 0.0 <= f <= 1.0])
    if bad:
        raise InputError(f"unknown or invalid {', '.join(bad)}; tasks: {list(DRIFT_TASKS)}, "
                         f"methods: {DRIFT_METHODS + OPTIONAL_METHODS}, fractions in [0, 1]")
    check_readout(cfg.trainer)
    unknown = [t for t in cfg.task_overrides if t not in DRIFT_TASKS]
    if unknown:
        raise InputError(f"task_overrides names unknown task(s) {unknown}; tasks: {list(DRIFT_TASKS)}")
    for where, c in [("", cfg), *((f"task_overrides.{t}: ", task_config(cfg, t)) for t in cfg.task_overrides)]:
        try:
            check_prefix_layer(c.model)
            check_text_weighting(c.model.text_weighting)
        except InputError as e:  # e.g. the defaults' tagging layer 20 under model=tiny (2 layers)
            raise InputError(f"{where}{e}") from None
        per_user = 1 if c.per_user is None else c.per_user
        if min(c.n_users, c.n_records - 1, c.n_test, c.stage1_users, per_user) < 1:
            raise InputError("n_users, n_test, stage1_users and per_user (or null: every record) must be >= 1, "
                             "n_records >= 2")


def targets_per_user(cfg: DriftBenchmarkConfig) -> int:
    """Stage-2 targets per user: ``per_user``, or every profile record after the first (the train question's
    profile holds ``n_records - 1`` records)."""
    return cfg.n_records - 2 if cfg.per_user is None else min(cfg.per_user, cfg.n_records - 2)


def estimate_seconds(cfg: DriftBenchmarkConfig) -> dict[str, float]:
    """SmolLM2 wall time of ``cfg`` on the 2-core CPU, per task, from :data:`COST_S` and :data:`TOKENS`
    (Stage 2 runs the layers from each task's prefix layer up; scoring runs every layer). An estimate: batching
    and thread contention move it."""
    out = {}
    n_q = cfg.n_users * cfg.n_test
    n_tapper = sum(m.startswith("tapper") for m in cfg.methods)
    for t in cfg.tasks:
        prompt, answer, rag, label_extra = TOKENS[t]
        seq = (prompt + answer) / 40
        s = cfg.trainer.stage1_examples * cfg.trainer.stage1.epochs * COST_S["train_full"] * seq  # Stage 1, once
        tc = task_config(cfg, t)
        n2 = cfg.n_users * targets_per_user(tc)
        per_frac = n2 * COST_S["forward"] * seq if n_tapper else 0.0  # trunk prefill, shared by the variants
        upper = max(1, SMOLLM2_LAYERS - tc.model.prefix_layer)
        per_example = (COST_S["train_layer"] + COST_S["train_layer_token"] * (prompt + answer)) * upper
        per_frac += n_tapper * n2 * tc.trainer.stage2.epochs * per_example
        for m in cfg.methods:
            p = min(rag, cfg.rag_max_prompt_tokens) if m in RAG_METHODS else prompt
            q = COST_S["forward"] * (p + label_extra) / 40  # one forward (rating; label-set scoring)
            if t == "headline":
                q += answer * COST_S["decode_step"]
            dev = 2 if t == "rating" and not m.startswith("rag") else 1  # rating also scores dev queries
            per_frac += dev * n_q * q
        out[t] = s + len(cfg.fractions) * per_frac
    return out


def _settings(cfg: DriftBenchmarkConfig) -> dict:
    """What every row depends on: data sizes, backbone, Stage 1, prompts, readouts."""
    m, t = cfg.model, cfg.trainer
    return {"n_users": cfg.n_users, "n_records": cfg.n_records, "n_test": cfg.n_test,
            "stage1_users": cfg.stage1_users, "seed": t.seed, "backbone": m.backbone.name_or_path,
            "stage1_examples": t.stage1_examples, "stage1": asdict(t.stage1), "task_lora": asdict(m.task_lora),
            "max_prompt_tokens": m.max_prompt_tokens, "max_record_tokens": m.max_record_tokens,
            "class_readout": t.class_readout, "eval_max_new_tokens": t.eval_max_new_tokens,
            **({"label_norm": t.label_norm} if t.label_norm != "mean" else {})}


def row_settings(cfg: RunConfig, name: str, task: str | None = None) -> dict:
    """A row's own settings (``benchmark.method_settings``, and the task's generator version when it is past
    1): a row is reused only when they match."""
    version = GENERATOR_VERSION.get(task, 1)
    gen = {"generator_version": version} if version > 1 else {}
    if name in DRIFT_ABLATIONS:
        return {**method_settings(cfg, "tapper"), "overrides": DRIFT_ABLATIONS[name], **gen}
    return {**method_settings(cfg, name), **gen}


def variant(cfg: DriftBenchmarkConfig, name: str) -> DriftBenchmarkConfig:
    """``cfg`` with TAP-PER variant ``name``'s overrides (``benchmark.ABLATIONS`` or :data:`DRIFT_ABLATIONS`)."""
    merged = OmegaConf.merge(OmegaConf.structured(cfg), {**ABLATIONS, **DRIFT_ABLATIONS}[name])
    return OmegaConf.to_object(merged)


def task_config(cfg: DriftBenchmarkConfig, task: str) -> DriftBenchmarkConfig:
    """The config of one task: ``task_overrides[task]`` merged in, its layout's task name, Stage-2 targets per
    user. Overrides that would change what every row shares (:func:`_settings`) are refused."""
    tcfg = copy.deepcopy(cfg)
    over = cfg.task_overrides.get(task)
    if over:
        try:
            tcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), over))
        except OmegaConfBaseException as e:  # an unknown key or a wrong type, named by OmegaConf
            raise InputError(f"task_overrides.{task}: {e}".splitlines()[0]) from None
        changed = sorted(k for k, v in _settings(tcfg).items() if _settings(cfg)[k] != v)
        if changed:
            raise InputError(f"task_overrides.{task} may set Stage-2 settings only, not {changed} "
                             "(Stage 1, the data and the prompts are shared by every row)")
    tcfg.task.name = DRIFT_TASKS[task][1]
    tcfg.trainer.stage2_per_user = tcfg.per_user
    return tcfg


def drift_splits(cfg: DriftBenchmarkConfig, task: str, frac: float):
    """(train, test) questions of ``n_users`` users whose last ``frac`` of the profile drifted."""
    build = DRIFT_TASKS[task][0]
    return build(n_users=cfg.n_users, n_records=cfg.n_records, n_test=cfg.n_test, seed=cfg.trainer.seed,
                 drift=True, drift_frac=frac)


def stage1_train(cfg: DriftBenchmarkConfig, task: str) -> list:
    """Stage 1's questions: ``stage1_users`` other users (ids ``s1_syn*``), another seed, no drift."""
    train, _ = DRIFT_TASKS[task][0](n_users=cfg.stage1_users, n_records=cfg.n_records, n_test=cfg.n_test,
                                    seed=cfg.trainer.seed + 1000)
    return [replace(ex, user_id=f"s1_{ex.user_id}") for ex in train]


def row_key(task: str, frac: float, method: str) -> str:
    return f"{task}|{frac:g}|{method}"


def benchmark_drift(cfg: DriftBenchmarkConfig, command: str = "tapper benchmark drift") -> dict:
    """Run every missing (task, fraction, method) row; returns the results dict written to drift.json."""
    from recsys_tapper.drift_report import write_drift_report

    check_drift_config(cfg)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    out_dir = Path(cfg.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "drift.json"
    settings, meta = _settings(cfg), run_meta(command)
    backbone = cfg.model.backbone.name_or_path
    est = estimate_seconds(cfg) if backbone.lower().startswith("smollm2") else {}  # COST_S are SmolLM2's
    if est:
        print(f"[drift] estimated SmolLM2 wall time on 2 CPU cores: {sum(est.values()) / 60:.0f} min ("
              + ", ".join(f"{t} {s / 60:.1f}" for t, s in est.items())
              + " min; rows already in the table are skipped)", flush=True)
    else:
        print(f"[drift] no wall-time estimate for backbone {backbone!r} (the measured costs are SmolLM2's)",
              flush=True)
    result: dict = {"rows": {}, "stage1": {}, "table_started": meta["date"]}
    if (old := load_resumable(json_path, settings, cfg.resume)) is not None:
        result = {"table_started": old.get("date"), **old}
    keys = ("command", "git_sha", "date", "machine")
    result.update(meta, settings=settings, runs=[*result.get("runs", []), {k: meta[k] for k in keys}],
                  estimate_s=est, tasks=cfg.tasks, fractions=cfg.fractions, methods=cfg.methods)
    mine: set[str] = set()  # the rows and Stage-1 tasks this invocation computed

    tcfgs = {t: task_config(cfg, t) for t in DRIFT_TASKS}  # each task's config, composed once

    def reusable(row: dict | None) -> bool:
        """What resume reuses: a row of a known task and method whose own settings this config reproduces."""
        return (row is not None and row.get("task") in DRIFT_TASKS
                and row.get("method") in DRIFT_METHODS + OPTIONAL_METHODS
                and row.get("settings") == row_settings(tcfgs[row["task"]], row["method"], row["task"]))

    def save(key: str | None = None) -> None:
        """Write the table; under its lock, with what a concurrent invocation of the same table (another
        ``tasks=[...]``, started with resume=true on this one's table) wrote meanwhile."""
        if key:
            mine.add(key)
        with table_lock(json_path):
            if json_path.exists():
                merge_drift(result, json.loads(json_path.read_text()), mine, reusable)
            atomic_write_text(json_path, json.dumps(result, indent=2))
            write_drift_report(result, out_dir)

    for task in cfg.tasks:
        todo = [(f, m) for f in cfg.fractions for m in cfg.methods
                if m in cfg.rerun or not reusable(result["rows"].get(row_key(task, f, m)))]
        if todo:
            _run_task(tcfgs[task], task, todo, result, out_dir, meta, save)
    save()
    return result


def merge_drift(result: dict, disk: dict, mine: set[str], reusable) -> None:
    """Take into ``result`` what a concurrent invocation of the same table wrote to ``disk``: its rows that
    ``reusable(row)`` accepts (what resume would reuse) except those this invocation computed (``mine``), its
    Stage-1 entries (except ``stage1|<task>`` in ``mine``) and its runs. A disk table started by another run (an
    older table replaced by resume=false) or of other shared settings gives nothing."""
    if disk.get("table_started") != result.get("table_started") or disk.get("settings") != result.get("settings"):
        return
    theirs = {k: v for k, v in disk.get("rows", {}).items() if k not in mine and reusable(v)}
    result["rows"] = {**theirs, **{k: v for k, v in result["rows"].items() if k in mine or k not in theirs}}
    result["stage1"] = {**{t: v for t, v in disk.get("stage1", {}).items() if f"stage1|{t}" not in mine},
                        **{t: v for t, v in result["stage1"].items() if f"stage1|{t}" in mine
                           or t not in disk.get("stage1", {})}}
    merge_runs(result, disk)
    result["tasks"] = [t for t in DRIFT_TASKS if t in result.get("tasks", []) or t in disk.get("tasks", [])]


def _stage1(tcfg: DriftBenchmarkConfig, task: str, result: dict, out_dir: Path):
    """(lm with the task's Stage-1 LoRA merged, tokenizer, the LoRA file): trained once, then loaded."""
    lm, tok = load_backbone(tcfg.model.backbone)
    cache = out_dir / f"drift_{task}_stage1_lora.safetensors"  # git-ignored, like every results safetensors
    version = GENERATOR_VERSION[task]  # a LoRA trained on an older generator's records is retrained
    if cache.exists() and task in result["stage1"] and result["stage1"][task].get("generator_version", 1) == version:
        lm = add_lora(lm, tcfg.model.task_lora)
        set_peft_model_state_dict(lm, load_file(cache))
        return merge_lora(lm), tok, cache
    train = stage1_train(tcfg, task)
    fb = FeatureBuilder(tok, TextEncoder(lm, tok, tcfg.model.max_record_tokens), get_task(tcfg.task.name),
                        RecordBank(lm.config.hidden_size), UserIndex([]), tcfg.model.max_prompt_tokens)
    lm, state, s1, seconds, losses, _ = train_stage1(tcfg, lm, fb, train, set())
    save_file(state, cache)
    result["stage1"][task] = {"seconds": seconds, "n_examples": len(s1), "final_loss": losses[-1] if losses else None,
                              **({"generator_version": version} if version > 1 else {})}
    return lm, tok, cache


def _features(builders: dict, spec, m, lm, tok, users: UserIndex, examples: list) -> FeatureBuilder:
    """The fraction's feature builder for model config ``m``'s record vectors (``features.bank_key``), its record
    bank encoded once; a row whose vectors differ (``tapper_no_content``, ``tapper_no_label_weight``) gets a bank
    of its own, with the same rows."""
    key = bank_key(m)
    if key not in builders:
        builders[key] = feature_builder(m, lm, tok, spec, users, examples)
    return builders[key]


def write_predictions(path: Path, rows: list[dict]) -> None:
    """One JSON line per test query: id, user, gold, the answer (``pred``; ``pred_generate`` beside it when
    generated too) and, for label-set scoring, every label's score (3 decimals), to see which errors a row makes."""
    keep = ("id", "user", "gold", "pred", "pred_generate")
    lines = []
    for r in rows:
        out = {k: r[k] for k in keep if k in r}
        if "label_scores" in r:
            out["label_scores"] = {lab: round(v, 3) for lab, v in r["label_scores"].items()}
        lines.append(json.dumps(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


@torch.no_grad()
def attention_after(model: TapperModel, fb: FeatureBuilder, samples: list, day: float, batch_size: int = 64) -> float:
    """The mean share of P_q's attention on records dated ``day`` or later (after the drift point), over the
    samples with a history: where the pooling looks, apart from how the LLM reads the prefix."""
    shares = []
    for i in range(0, len(samples), batch_size):
        part = [s for s in samples[i : i + batch_size] if s.history_rows]
        if not part:
            continue
        b = fb.collate(part, with_labels=False)
        _, _, alpha = model.tower(b.users, b.history, b.q, b.extra_records)  # (T,)
        after = torch.tensor([d is not None and d >= day for s in part for d in s.history_days], dtype=alpha.dtype)
        lengths = torch.tensor([len(s.history_rows) for s in part])
        shares += segment_sum((alpha * after)[:, None], segment_ids(lengths), len(part))[:, 0].tolist()
    return sum(shares) / len(shares) if shares else float("nan")


def _run_task(tcfg, task: str, todo: list, result: dict, out_dir: Path, meta: dict, save) -> None:
    # One task's Stage 1 at a time across the invocations of this table: an invocation of the same task that
    # started meanwhile waits, takes the entry the first wrote (save merges it from disk) and loads its LoRA.
    with table_lock(out_dir / f"drift_{task}_stage1.lock"):
        save()
        lm, tok, cache = _stage1(tcfg, task, result, out_dir)
        save(f"stage1|{task}")
    spec = get_task(tcfg.task.name)
    trunk = build_trunk(tcfg.model, lm, {"stage1": file_digest(cache)})  # one per task: rows repeat across f
    ex = LocalExecutor()
    base = TapperModel(lm, None, None)
    for frac in dict.fromkeys(f for f, _ in todo):
        train, test = drift_splits(tcfg, task, frac)
        at = drift_point(tcfg.n_records, tcfg.n_test, True, frac)  # the first drifted record
        _, test, trainees, train_chosen = personal_splits(train, test, None, spec)
        users = UserIndex(trainees)
        builders: dict[tuple, FeatureBuilder] = {}  # one per kind of record vector the rows use
        fb = _features(builders, spec, tcfg.model, lm, tok, users, train_chosen + test)
        test_samples = fb.question_samples(test)
        dev = fb.question_samples(train_chosen) if spec.kind == RATING else []  # never Stage-2 targets
        for name in [m for f, m in todo if f == frac]:
            t0 = time.perf_counter()
            extra: dict = {}
            if name == "non_personalized":
                rep, preds, eval_s = score(ex, base, fb, test_samples, spec, tcfg, name, dev)
                train_s = 0.0
            elif name in RAG_METHODS:
                method, k = RAG_METHODS[name]
                fb_rag = FeatureBuilder(tok, fb.encoder, spec, fb.bank, users, tcfg.rag_max_prompt_tokens)
                rep, preds, eval_s = score(ex, base, fb_rag, rag_samples(fb_rag, test, k=k, method=method), spec,
                                       tcfg, name)
                train_s = 0.0
            else:
                vcfg = variant(tcfg, name)
                vfb = _features(builders, spec, vcfg.model, lm, tok, users, train_chosen + test)
                resume = out_dir / f"drift_{task}_{frac:g}_{name}_stage2_resume.safetensors"
                model, s2, losses, train_s, _ = train_stage2(vcfg, lm, vfb, users, train_chosen, trunk, resume=resume)
                vtest, vdev = vfb.question_samples(test), vfb.question_samples(train_chosen) if dev else []
                prefill_trunk(trunk, vfb, vtest + vdev, with_labels=False, desc="trunk cache, queries")
                rep, preds, eval_s = score(ex, model, vfb, vtest, spec, vcfg, name, vdev)
                extra = {**lambda_report(model),
                         "attention_after_drift": attention_after(model, vfb, vtest, at * RECORD_DAYS),
                         "n_stage2_examples": len(s2),
                         "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
                model.lm.unload()
            result["rows"][row_key(task, frac, name)] = {
                "task": task, "layout": spec.name, "drift_frac": frac, "method": name,
                "metric": DRIFT_TASKS[task][2], "higher_is_better": DRIFT_TASKS[task][3],
                "drift_at": at, **rep, **extra,
                "n_users": len(users), "n_queries": len(test_samples), "train_s": train_s, "eval_s": eval_s,
                "wall_s": time.perf_counter() - t0, "settings": row_settings(tcfg, name, task),
                "git_sha": meta["git_sha"], "dirty": meta.get("dirty"), "date": meta["date"],
                "machine": meta["machine"]}  # a resumed table's rows can come from several machines
            write_predictions(out_dir / "predictions" / f"{task}_{frac:g}_{name}.jsonl", preds)
            save(row_key(task, frac, name))
            metric = DRIFT_TASKS[task][2]
            print(f"[drift] {task} f={frac:g} {name}: {metric} {rep.get(metric, float('nan')):.3f}", flush=True)


def drift_config(overrides: list[str] | None = None) -> DriftBenchmarkConfig:
    """The config ``tapper benchmark drift <overrides>`` runs with (configs/benchmark_drift.yaml, composed)."""
    from hydra import compose, initialize_config_dir

    from recsys_tapper.runner import CONFIG_DIR

    register_drift()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("benchmark_drift", overrides=list(overrides or [])))


def register_drift() -> None:
    from hydra.core.config_store import ConfigStore

    from recsys_tapper.config import register

    register()
    ConfigStore.instance().store(name="drift_benchmark_schema", node=DriftBenchmarkConfig)
